"""The output prefix's exclusive, leased claim (kolors_job.job.claim) on file://, S3 and OSS.

Races are real: threads start together on the loopback servers and every one tries the conditional
create; exactly one must win, whatever the interleaving.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from kolors_job.core.errors import ExitCode, OutputConflictError
from kolors_job.job.claim import ClaimHeldError, ClaimRecord, OutputClaim
from kolors_job.storage import open_store
from tests.cli_lines import json_records, last_message


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

    from kolors_job.core.settings import Settings
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

    from kolors_job.manifest.spec import Manifest

    digests = {Manifest.model_validate(yaml.safe_load(store.read_bytes("manifest.resolved.yaml"))).digest()}
    digests.add(json.loads(store.read_bytes("status.json"))["manifest_digest"])
    digests.add(json.loads(store.read_bytes("report.json"))["manifest_digest"])
    return digests


@pytest.mark.parametrize("backend", ["file", "s3", "oss"])
def test_concurrent_runs_never_mix_a_prefix_nor_exit_1(backend, tmp_path, shared_cache, storage_env, request):
    from kolors_job.manifest.spec import Manifest

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


# -- the fence: a holder that lost its claim writes and deletes nothing, whatever it believes -------
def _objects(store) -> dict[str, bytes]:
    """Every object of the prefix but the claim's own bookkeeping, with its bytes."""
    return {k: store.read_bytes(k) for k in store.list() if not k.startswith("_claim/")}


def test_a_sealed_generation_writes_and_deletes_nothing(prefix_store, tmp_path, monkeypatch):
    """Run A holds the claim and writes through its fence; it is paused in the middle of a write (its data
    staged, the publishing step not yet made) and past its lease; run B takes the prefix over. Then A goes
    on: the pending publish, a new write, an upload, a delete and a heartbeat are all refused by the store
    (ClaimLostError, exit 75) and the prefix holds exactly what B wrote."""
    from kolors_job.core.errors import ClaimLostError
    from kolors_job.storage import fence as fence_mod

    lost: list[str] = []
    a = _claim(prefix_store, "d", lease_s=0.5, on_lost=lost.append)
    a.acquire()
    a.fenced.write_bytes("status.json", b"A: running")
    a.fenced.write_bytes("checkpoints/step-2/COMPLETE", b"step 2\n")
    a.fenced.delete("checkpoints/step-2/COMPLETE")  # a delete while live lands
    assert not prefix_store.exists("checkpoints/step-2/COMPLETE")
    assert prefix_store.read_bytes("status.json") == b"A: running"

    # pause A inside a write, between staging its data and the request that publishes it
    staged, resume = threading.Event(), threading.Event()
    if isinstance(a.fence, fence_mod.DirFence):
        real_rename = fence_mod.os.rename

        def paused_rename(src, dst, *args, **kw):
            if ".stage" in str(src) and str(dst).endswith("_SUCCESS"):
                staged.set()
                resume.wait(30)
            return real_rename(src, dst, *args, **kw)

        monkeypatch.setattr(fence_mod.os, "rename", paused_rename)
    else:
        real_copy = prefix_store.copy_if

        def paused_copy(src, dst, token, size):
            if dst == "_SUCCESS":
                staged.set()
                resume.wait(30)
            return real_copy(src, dst, token, size)

        monkeypatch.setattr(prefix_store, "copy_if", paused_copy)
    errors: list[BaseException] = []

    def publish() -> None:
        try:
            a.fenced.write_bytes("_SUCCESS", b"")
        except BaseException as e:  # collected for the assertion below
            errors.append(e)

    writer = threading.Thread(target=publish)
    writer.start()
    assert staged.wait(30)
    time.sleep(0.6)  # A's lease runs out; B takes over (B's own writes land)
    b = _claim(prefix_store, "d", lease_s=30.0)
    b.acquire(poll_s=0.05)
    assert b.generation == 2
    b.fenced.write_bytes("status.json", b"B: running")
    b.fenced.write_bytes("images/01.png", b"B's frame")
    expected = _objects(prefix_store)

    resume.set()  # A wakes up and goes on as if nothing happened
    writer.join(30)
    assert len(errors) == 1 and isinstance(errors[0], ClaimLostError), errors
    assert errors[0].exit_code == ExitCode.TEMPORARY == 75 and "\n" not in str(errors[0])
    (tmp_path / "ckpt.bin").write_bytes(b"A's checkpoint")
    record = ClaimRecord(a.owner, "d", time.time(), 0.5, time.time())
    attempts = [
        lambda: a.fenced.write_bytes("status.json", b"A: succeeded"),
        lambda: a.fenced.upload_file("checkpoints/step-4/optimizer.bin", tmp_path / "ckpt.bin"),
        lambda: a.fenced.delete("images/01.png"),
        lambda: a.fenced.child("lora").write_bytes("x.safetensors", b"A"),
        lambda: a._write(1, record, create=False),  # its claim record, as its heartbeat renews it
    ]
    refused: list[BaseException] = []

    def attempt(fn) -> None:
        try:
            fn()
        except ClaimLostError as e:
            refused.append(e)

    # all at once, from several threads (a heartbeat renews while the main thread writes): none lands
    burst = [threading.Thread(target=attempt, args=(fn,)) for fn in attempts * 2]
    for t in burst:
        t.start()
    for t in burst:
        t.join(30)
    assert len(refused) == len(burst)
    a.start_heartbeat()  # its heartbeat: refused too, and it says the claim is lost
    assert a.lost.wait(5) and lost and lost[0].startswith("lost the output claim")
    a.release()
    assert _objects(prefix_store) == expected
    assert json.loads(prefix_store.read_bytes("_claim/00000002.json"))["owner"] == b.owner
    assert not json.loads(prefix_store.read_bytes("_claim/00000001.json"))["released"]
    b.release()


def test_a_run_paused_while_staging_its_data_is_refused_with_75(tmp_path, storage_env, monkeypatch):
    """A file:// write paused earlier than the publishing rename — while its data is copied into the
    stage — and sealed meanwhile: the write is refused as a lost claim (75), never a store fault (5).

    CI caught this on 2026-12-07: a run paused at its report stage and resumed after two takeovers set
    its staged file's mode by path, found the stage sealed (ENOTDIR) and exited 5."""
    from kolors_job.core.errors import ClaimLostError
    from kolors_job.storage import fence as fence_mod

    store = open_store(str(tmp_path / "out"), storage_env).child("job")
    a = _claim(store, "d", lease_s=0.5)
    a.acquire()
    copying, resume = threading.Event(), threading.Event()
    real_copy = fence_mod.shutil.copyfileobj

    def paused_copy(src, dst, *args):
        copying.set()
        resume.wait(30)
        return real_copy(src, dst, *args)

    monkeypatch.setattr(fence_mod.shutil, "copyfileobj", paused_copy)
    (tmp_path / "report.json").write_bytes(b"A's report")
    errors: list[BaseException] = []

    def upload() -> None:
        try:
            a.fenced.upload_file("report.json", tmp_path / "report.json")
        except BaseException as e:  # collected for the assertion below
            errors.append(e)

    writer = threading.Thread(target=upload)
    writer.start()
    assert copying.wait(30)
    time.sleep(0.6)
    b = _claim(store, "d", lease_s=30.0)
    b.acquire(poll_s=0.05)
    resume.set()
    writer.join(30)
    assert len(errors) == 1 and isinstance(errors[0], ClaimLostError), errors
    assert not store.exists("report.json")
    b.release()


# -- the fence, whole runs: pauses past the lease on file://, S3 and OSS ---------------------------
LEASE_S = 3.0
CHAIN_STEPS, CHAIN_EVERY = 4, 2
TIME_BEARING = ("status.json", "report.json", "report.html", "manifest.resolved.yaml", "_state/train.json")
"""Files that name times, hosts or the output URI: compared after normalising (``_normalised``)."""


class Proc:
    """``kolors-job run`` in a subprocess: its JSON log records collected as they come, pausable."""

    def __init__(self, manifest: Path, env: dict[str, str], *extra: str) -> None:
        import subprocess
        import sys

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kolors_job", "run", "--manifest", str(manifest), *extra],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, bufsize=1,
        )
        self.lines: list[str] = []
        self.seen = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self.seen:
                self.lines.append(line)
                self.seen.notify_all()

    def records(self, start: int = 0) -> list[dict]:
        return json_records(self.lines[start:])

    def pause_at(self, what, timeout: float = 300) -> None:
        """SIGSTOP the run as soon as a log record satisfies ``what``."""
        import os
        import signal

        deadline = time.monotonic() + timeout
        with self.seen:
            while not any(what(r) for r in self.records()):
                assert self.proc.poll() is None, f"ended before the pause point: {self.tail()}"
                assert time.monotonic() < deadline, f"never reached the pause point: {self.tail()}"
                self.seen.wait(0.5)
            os.kill(self.proc.pid, signal.SIGSTOP)
        # kill() returns before the run is stopped, and a request it sent just before may still be served:
        # wait until the kernel says stopped, then give the loopback server a moment to answer what is in flight
        # (else a snapshot taken now can miss a stage object the store records a few ms later)
        while self.proc.poll() is None:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                    break
            time.sleep(0.01)
        time.sleep(1.0)

    def resume(self) -> int:
        """SIGCONT; returns how many log lines were there before, for :meth:`records` of what follows."""
        import os
        import signal

        n = len(self.lines)
        os.kill(self.proc.pid, signal.SIGCONT)
        return n

    def wait(self, timeout: float = 600) -> int:
        rc = self.proc.wait(timeout=timeout)
        self.reader.join(10)
        return rc

    def tail(self) -> str:
        return "".join(self.lines[-40:])


def _snapshot(store) -> dict[str, bytes]:
    return {k: store.read_bytes(k) for k in store.list()}


def _normalised(key: str, data: bytes) -> object:
    """A time-bearing file without what a second run of the same job changes (times, hosts, the output)."""
    import yaml

    if key == "manifest.resolved.yaml":
        doc = yaml.safe_load(data)
        doc["spec"]["output"].pop("uri")
        return doc
    if key == "status.json":
        doc = json.loads(data)
        return {k: v for k, v in doc.items() if k not in ("started", "updated", "finished", "stages")}
    if key == "_state/train.json":
        doc = json.loads(data)
        doc.pop("seconds")
        return doc
    if key == "report.json":
        doc = json.loads(data)
        for k in ("created", "timings", "output", "device", "versions"):
            doc.pop(k, None)
        doc["manifest"]["spec"]["output"].pop("uri")
        doc["train"].pop("seconds", None)
        return doc
    return None  # report.html: the rendering of report.json (times in it): presence only


def _event_runs(snap: dict[str, bytes]) -> list[str]:
    """TensorBoard's event files, one per run that logged (each also writes an hparams folder)."""
    return [k for k in snap if k.startswith("logs/tensorboard/events.out.tfevents.")]


def _compare_with_lone_run(prefix: dict[str, bytes], lone: dict[str, bytes], *, tensorboard_files: int) -> None:
    """The prefix holds what one uninterrupted run of the job writes: the same keys, the same bytes (time-bearing
    files normalised; TensorBoard event files, named after time and host, counted)."""
    def split(snap: dict[str, bytes]) -> tuple[dict[str, bytes], list[str]]:
        rest = {k: v for k, v in snap.items() if not k.startswith(("_claim/", "logs/tensorboard/"))}
        return rest, _event_runs(snap)

    ours, our_events = split(prefix)
    theirs, their_events = split(lone)
    assert sorted(ours) == sorted(theirs)
    assert len(our_events) == tensorboard_files and len(their_events) == 1, (our_events, their_events)
    differing = [k for k in ours if k not in TIME_BEARING and ours[k] != theirs[k]]
    assert not differing, f"{len(differing)} files differ from a lone run's, e.g. {differing[:5]}"
    for key in TIME_BEARING:
        assert _normalised(key, ours[key]) == _normalised(key, theirs[key]), key


def _chain_env(tmp_path, shared_cache, backend: str, request) -> tuple[str, dict[str, str]]:
    import os

    from kolors_job.core.settings import Settings
    from kolors_job.sources import resolve_model

    for uri, kind in (("tiny://kolors", "pipeline"), ("tiny://aesthetic", "aesthetic")):  # built once, not raced
        resolve_model(uri, kind=kind, settings=Settings(cache_dir=shared_cache))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOLORS_JOB_")}
    env.update(KOLORS_JOB_CACHE_DIR=str(shared_cache), KOLORS_JOB_WORK_DIR=str(tmp_path / "work"),
               KOLORS_JOB_LOG_FORMAT="json", KOLORS_JOB_CLAIM_LEASE_S=str(LEASE_S), OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=os.getcwd())
    if backend == "file":
        return (tmp_path / "out").as_uri(), env
    if backend == "s3":
        s3 = request.getfixturevalue("s3_server")
        env.update(KOLORS_JOB_S3_ENDPOINT_URL=s3.endpoint_url, KOLORS_JOB_S3_REGION=s3.region,
                   KOLORS_JOB_S3_ADDRESSING_STYLE="path")
        return f"s3://{s3.create_bucket()}/runs/", env
    oss = request.getfixturevalue("oss_server")
    env.update(KOLORS_JOB_OSS_ENDPOINT=oss.endpoint, KOLORS_JOB_OSS_REGION=oss.region)
    return f"oss://{oss.create_bucket()}/runs/", env


def _chain_manifest(tiny_s3_job, output: str) -> dict:
    """The shared tiny job's manifest (tests/scenarios.py: 4 steps, a checkpoint every 2) into ``output``."""
    spec = tiny_s3_job.doc["spec"]["train"]
    assert (spec["steps"], spec["checkpoint_every"]) == (CHAIN_STEPS, CHAIN_EVERY)
    return tiny_s3_job.manifest_doc(output)


@pytest.fixture(scope="module")
def lone_run(tiny_s3_job) -> dict[str, bytes]:
    """What a prefix must hold: the chain's job run once, alone and uninterrupted — the session's shared tiny job
    (``tiny_s3_job``, tests/scenarios.py: ``python -m kolors_job run``), its prefix as that run left it."""
    assert tiny_s3_job.returncode == 0, tiny_s3_job.log.decode(errors="replace")[-3000:]
    return dict(tiny_s3_job.objects)


def _stage_keys(snap: dict[str, bytes], generation: int) -> dict[str, bytes]:
    return {k: v for k, v in snap.items() if not k.startswith(f"_claim/{generation:08d}.stage")}


@pytest.mark.parametrize("backend", ["file", "s3", "oss"])
def test_runs_paused_past_their_lease_publish_nothing(backend, tmp_path, shared_cache, storage_env, lone_run,
                                                     tiny_s3_job, request):
    """Issue #31's reproductions, as one chain on each store (lease 3 s):

    1. run A is paused (SIGSTOP) mid-training, at step 3, its step-2 checkpoint uploaded;
    2. run B (the same manifest) waits out A's lease, takes the prefix over, resumes from step 2, and is
       itself paused at the start of its report stage — just before it publishes the report and ``_SUCCESS``;
    3. A is resumed (SIGCONT): it writes and deletes nothing (the prefix is byte for byte as before) and
       exits 75 with one error line; what B wrote so far is what a lone run writes;
    4. run C (``--force``) takes the prefix over from the paused B and runs the job to the end;
    5. B is resumed: it publishes nothing, not even ``status.json`` or ``_SUCCESS``, and exits 75;
    6. the prefix is C's alone: byte for byte what one uninterrupted run writes.
    """
    output, env = _chain_env(tmp_path, shared_cache, backend, request)
    store = open_store(output, storage_env).child(tiny_s3_job.name)
    manifest = tmp_path / "job.json"
    manifest.write_text(json.dumps(_chain_manifest(tiny_s3_job, output)))
    # a resumed run of OSS may drop its own stage object in one window (no conditional DELETE there)
    own_stage = (lambda snap, gen: _stage_keys(snap, gen)) if backend == "oss" else (lambda snap, gen: snap)

    a = Proc(manifest, env)
    a.pause_at(lambda r: r.get("msg") == "step" and r.get("step") == 3)
    b = Proc(manifest, env)
    b.pause_at(lambda r: r.get("msg") == "stage report: started")
    assert any(r.get("msg") == "resumed" and r.get("step") == 2 for r in b.records()), b.tail()
    before = _snapshot(store)

    n = a.resume()
    assert a.wait(120) == 75, a.tail()
    after = _snapshot(store)
    assert own_stage(after, 1) == own_stage(before, 1), "run A changed the prefix after it was resumed"
    said = a.lines[n:]
    last = last_message("".join(said))  # the CLI's last line (a JSON record off a terminal)
    assert "Traceback" not in "".join(said) and last.startswith("error: ") and "claim" in last, said
    # what B wrote so far is what a lone run writes (A's step-2 checkpoint is pruned, its events file stays)
    assert json.loads(after["status.json"])["state"] == "running"  # B's, paused
    partial = {k: v for k, v in after.items() if not k.startswith(("_claim/", "logs/")) and k != "status.json"}
    assert "lora/pytorch_lora_weights.safetensors" in partial and "images/08.png" in partial, sorted(partial)
    for key, data in partial.items():
        assert key in lone_run, key
        if key in TIME_BEARING:
            assert _normalised(key, data) == _normalised(key, lone_run[key]), key
        else:
            assert data == lone_run[key], key
    assert "_SUCCESS" not in after and "report.json" not in after
    assert len(_event_runs(after)) == 2  # A's, up to its step-2 checkpoint, and B's

    c = Proc(manifest, env, "--force")
    assert c.wait() == 0, c.tail()
    final = _snapshot(store)
    assert any("took over the output claim (generation 2" in r.get("msg", "") for r in c.records()), c.tail()

    n = b.resume()
    assert b.wait(120) == 75, b.tail()
    assert own_stage(_snapshot(store), 2) == own_stage(final, 2), "run B changed the prefix after it was resumed"
    said = b.lines[n:]
    last = last_message("".join(said))  # the CLI's last line (a JSON record off a terminal)
    assert "Traceback" not in "".join(said) and last.startswith("error: ") and "claim" in last, said
    assert json.loads(final["status.json"])["state"] == "succeeded" and "_SUCCESS" in final
    _compare_with_lone_run(final, lone_run, tensorboard_files=1)
    print(f"\n{backend}: A resumed after B took over: 0 of {len(before)} objects changed; B resumed after C took "
          f"over: 0 of {len(final)} changed; C's prefix = a lone run's ({len(final)} objects, "
          f"{len(TIME_BEARING)} time-bearing ones compared normalised)")


def test_the_loopback_stores_refuse_a_copy_whose_source_changed(s3_server, oss_server):
    """What the fence relies on, asked of the servers directly with the SDKs: S3 ``x-amz-copy-source-if-match``
    and OSS ``x-oss-copy-source-if-match`` fail (412) once the source was overwritten; create-only writes fail
    on an existing key (412 / 409)."""
    import oss2
    from botocore.exceptions import ClientError

    raw = s3_server.client()
    bucket = s3_server.create_bucket()
    etag = raw.put_object(Bucket=bucket, Key="stage", Body=b"data")["ETag"]
    raw.copy_object(Bucket=bucket, Key="out", CopySource={"Bucket": bucket, "Key": "stage"}, CopySourceIfMatch=etag)
    raw.put_object(Bucket=bucket, Key="stage", Body=b"tombstone")
    for attempt in (
        lambda: raw.copy_object(Bucket=bucket, Key="out", CopySource={"Bucket": bucket, "Key": "stage"},
                                CopySourceIfMatch=etag),
        lambda: raw.put_object(Bucket=bucket, Key="stage", Body=b"again", IfNoneMatch="*"),
    ):
        with pytest.raises(ClientError) as err:
            attempt()
        assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert raw.get_object(Bucket=bucket, Key="out")["Body"].read() == b"data"

    oss = oss_server.raw_bucket(oss_server.create_bucket())
    etag = oss.put_object("stage", b"data").etag
    oss.copy_object(oss.bucket_name, "stage", "out", headers={"x-oss-copy-source-if-match": etag})
    oss.put_object("stage", b"tombstone")
    with pytest.raises(oss2.exceptions.PreconditionFailed):
        oss.copy_object(oss.bucket_name, "stage", "out", headers={"x-oss-copy-source-if-match": etag})
    with pytest.raises(oss2.exceptions.ServerError) as err:
        oss.put_object("stage", b"again", headers={"x-oss-forbid-overwrite": "true"})
    assert (err.value.status, err.value.code) == (409, "FileAlreadyExists")
    assert oss.get_object("out").read() == b"data"


@pytest.mark.parametrize("kind", ["s3", "oss"])
def test_a_stage_upload_in_parts_is_create_only_too(kind, request, storage_env, tmp_path):
    """A large stage object goes up in parts (multipart above 8 MiB here): its completion must be create-only
    too, or an old owner's checkpoint upload could replace the seal's tombstone and then be copied out."""
    import os

    bucket = request.getfixturevalue("s3_server" if kind == "s3" else "oss_server").create_bucket()
    store = open_store(f"{kind}://{bucket}/p/", storage_env)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(9 * 1024 * 1024))
    token = store.put_new("_claim/00000001.stage/data/00000001", big)
    assert token and store.put_new("_claim/00000001.stage/data/00000001", big) == token  # our own, retried
    store.write_bytes("_claim/00000001.stage/data/00000002", b'{"sealed_by": "B"}')
    assert store.put_new("_claim/00000001.stage/data/00000002", big) is None  # the seal's: refused
    assert store.read_bytes("_claim/00000001.stage/data/00000002") == b'{"sealed_by": "B"}'
    assert store.copy_if("_claim/00000001.stage/data/00000001", "out.bin", token, big.stat().st_size)
    assert store.read_bytes("out.bin") == big.read_bytes()
