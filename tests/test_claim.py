"""The output prefix's exclusive, leased claim (kolors_job.claim) on file://, S3 and OSS.

Races are real: threads start together on the loopback servers and every one tries the conditional
create; exactly one must win, whatever the interleaving.
"""

from __future__ import annotations

import threading
import time

import pytest

from kolors_job.claim import ClaimHeldError, OutputClaim
from kolors_job.errors import ExitCode, OutputConflictError
from kolors_job.storage import open_store
from tests.cli_lines import last_message


@pytest.fixture(params=["file", "s3", "oss"])
def prefix_store(request, tmp_path, storage_env):
    if request.param == "file":
        return open_store(str(tmp_path / "out"), storage_env).child("job")
    bucket = request.getfixturevalue("s3_server" if request.param == "s3" else "oss_server").create_bucket()
    return open_store(f"{request.param}://{bucket}/runs/", storage_env).child("job")


def _claim(store, digest: str, **kw) -> OutputClaim:
    return OutputClaim(store, digest, **{"lease_s": 30.0, "wait_s": 0.0, **kw})


def test_concurrent_claims_have_exactly_one_winner(prefix_store):
    n = 6
    start = threading.Barrier(n)
    results: list[object] = [None] * n

    def contend(i: int) -> None:
        claim = _claim(prefix_store, f"digest-{i}")
        start.wait()
        try:
            claim.acquire(poll_s=0.05)
            results[i] = claim
        except OutputConflictError as e:
            results[i] = e

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    winners = [r for r in results if isinstance(r, OutputClaim)]
    assert len(winners) == 1, results
    assert all(isinstance(r, OutputConflictError) and r.exit_code == ExitCode.OUTPUT_CONFLICT == 6
               for r in results if r is not winners[0])
    assert winners[0].generation == 1


def test_same_manifest_waits_then_takes_over_a_released_claim(prefix_store):
    first = _claim(prefix_store, "same")
    first.acquire()
    second = _claim(prefix_store, "same", wait_s=20.0)
    threading.Timer(1.0, first.release).start()
    t0 = time.monotonic()
    second.acquire(poll_s=0.1)
    assert 0.9 < time.monotonic() - t0 < 15
    assert second.generation == 2


def test_same_manifest_gives_up_with_75_while_the_holder_lives(prefix_store):
    _claim(prefix_store, "same").acquire()
    with pytest.raises(ClaimHeldError) as err:
        _claim(prefix_store, "same", wait_s=0.5).acquire(poll_s=0.1)
    assert err.value.exit_code == ExitCode.TEMPORARY == 75


def test_an_expired_lease_is_taken_over_and_its_holder_learns_it_lost(prefix_store):
    lost: list[str] = []
    old = _claim(prefix_store, "d", lease_s=1.0, on_lost=lost.append)
    old.acquire()
    # a live, heartbeating holder is never joined, however long its lease has run
    old.start_heartbeat()
    time.sleep(1.6)
    with pytest.raises(ClaimHeldError):
        _claim(prefix_store, "d", wait_s=0.3).acquire(poll_s=0.1)
    # a preempted holder: its heartbeat stops, the lease runs out, the rerun takes over
    old._stop_heartbeat.set()
    old._thread.join()
    time.sleep(1.2)
    new = _claim(prefix_store, "d", lease_s=1.0)
    new.acquire(poll_s=0.1)
    assert new.generation == 2
    # the old holder, were it only paused, finds the higher generation at its next heartbeat
    old._stop_heartbeat.clear()
    old.start_heartbeat()
    assert old.lost.wait(5) and lost == ["another run took over the output prefix"]
    old.release()  # a lost claim is not released: that would free the new owner's prefix
    with pytest.raises(ClaimHeldError):
        _claim(prefix_store, "d", wait_s=0.2).acquire(poll_s=0.1)
    new.release()


def test_a_heartbeat_that_cannot_renew_gives_the_claim_up_when_the_lease_runs_out(tmp_path, storage_env):
    """The volume under the prefix goes away (here: the prefix becomes a plain file): every renewal fails,
    each is logged, and once a whole lease has passed without one the run stops (on_lost → exit 75)
    rather than go on writing into a prefix another run may take over."""
    import shutil

    store = open_store(str(tmp_path / "out"), storage_env).child("job")
    lost: list[str] = []
    claim = _claim(store, "d", lease_s=1.0, on_lost=lost.append)
    claim.acquire()
    claim.start_heartbeat()
    time.sleep(0.4)  # at least one renewal succeeded
    assert not claim.lost.is_set()
    shutil.rmtree(tmp_path / "out" / "job")
    (tmp_path / "out" / "job").write_text("not a directory any more")
    t0 = time.monotonic()
    assert claim.lost.wait(10), "the heartbeat kept the claim without renewing it"
    assert 0.5 < time.monotonic() - t0 < 5
    assert lost == ["could not renew the output claim before its lease expired"]
    claim.release()  # a lost claim is not released (nothing to write to anyway), and this does not raise


# -- whole runs, as separate processes -----------------------------------------------------------
def _run_pair(tmp_path, shared_cache, output: str, manifests: list[dict], env_extra: dict[str, str]):
    """Start one `kolors-job run` per manifest at the same moment; return [(exit code, stderr)]."""
    import json
    import os
    import subprocess
    import sys

    from kolors_job.settings import Settings
    from kolors_job.sources import resolve_model

    for uri, kind in (("tiny://kolors", "pipeline"), ("tiny://aesthetic", "aesthetic")):  # built once, not raced
        resolve_model(uri, kind=kind, settings=Settings(cache_dir=shared_cache))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOLORS_JOB_")}
    env.update(KOLORS_JOB_CACHE_DIR=str(shared_cache), KOLORS_JOB_WORK_DIR=str(tmp_path / "work"),
               KOLORS_JOB_LOG_FORMAT="json", OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd(), **env_extra)
    procs = []
    for i, doc in enumerate(manifests):
        path = tmp_path / f"m{i}.json"
        path.write_text(json.dumps(doc))
        procs.append(subprocess.Popen([sys.executable, "-m", "kolors_job", "run", "--manifest", str(path)],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    return [(p.wait(timeout=600), p.stderr.read()) for p in procs]


def _pair_manifests(shared_cache, output: str, same: bool) -> list[dict]:
    from kolors_job.demo import build_demo_dataset, tiny_job

    data = build_demo_dataset(shared_cache / "demo-dataset")
    base = {"train.steps": 2, "train.checkpoint_every": 1, "story.steps": 1, "story.batch_size": 8,
            "score.gate": False, "output.lora_formats": ["diffusers"]}
    lrs = (1e-3, 1e-3) if same else (1e-3, 2e-3)
    return [tiny_job(data, output, {**base, "train.learning_rate": lr}, name="pair") for lr in lrs]


def _prefix_digests(store) -> set[str]:
    """Every manifest digest the prefix's files name: one, unless two runs mixed their outputs."""
    import json

    import yaml

    from kolors_job.manifest import Manifest

    digests = {Manifest.model_validate(yaml.safe_load(store.read_bytes("manifest.resolved.yaml"))).digest()}
    digests.add(json.loads(store.read_bytes("status.json"))["manifest_digest"])
    digests.add(json.loads(store.read_bytes("report.json"))["manifest_digest"])
    return digests


@pytest.mark.parametrize("backend", ["file", "s3", "oss"])
def test_concurrent_runs_never_mix_a_prefix_nor_exit_1(backend, tmp_path, shared_cache, storage_env, request):
    from kolors_job.manifest import Manifest

    if backend == "file":
        output, extra = (tmp_path / "out").as_uri(), {}
    elif backend == "s3":
        s3 = request.getfixturevalue("s3_server")
        output = f"s3://{s3.create_bucket()}/runs/"
        extra = {"KOLORS_JOB_S3_ENDPOINT_URL": s3.endpoint_url, "KOLORS_JOB_S3_REGION": s3.region,
                 "KOLORS_JOB_S3_ADDRESSING_STYLE": "path"}
    else:
        oss = request.getfixturevalue("oss_server")
        output = f"oss://{oss.create_bucket()}/runs/"
        extra = {"KOLORS_JOB_OSS_ENDPOINT": oss.endpoint, "KOLORS_JOB_OSS_REGION": oss.region}
    store = open_store(output, storage_env).child("pair")

    # two different manifests, one job id: one runs, the other exits 6 with one line
    docs = _pair_manifests(shared_cache, output, same=False)
    results = _run_pair(tmp_path, shared_cache, output, docs, extra)
    codes = [code for code, _ in results]
    assert sorted(codes) == [0, 6], results
    loser_err = results[codes.index(6)][1]
    assert "Traceback" not in loser_err and last_message(loser_err).startswith("error: "), loser_err
    winner = Manifest.model_validate(docs[codes.index(0)]).digest()
    assert _prefix_digests(store) == {winner}
    # rerunning the loser is a conflict again, never "skipped" with the other manifest's model
    again = _run_pair(tmp_path, shared_cache, output, [docs[codes.index(6)]], extra)
    assert again[0][0] == 6, again

    # the same manifest twice at once, on a fresh job id: one runs, the other waits and then skips (0)
    docs = [{**d, "metadata": {"name": "twin"}} for d in _pair_manifests(shared_cache, output, same=True)]
    results = _run_pair(tmp_path, shared_cache, output, docs, extra)
    assert [code for code, _ in results] == [0, 0], results
    assert sum("skipped:" in err for _, err in results) == 1, results
    assert _prefix_digests(open_store(output, storage_env).child("twin")) == {Manifest.model_validate(docs[0]).digest()}
    assert not any((tmp_path / "work").rglob("*.safetensors"))  # per-run scratch, removed after the run
