"""Never lose work: storage and the whole job under injected network faults.

A fault proxy (tests/storage_servers/fault_proxy.py) sits on 127.0.0.1 in front of moto (s3://) and
in front of the OSS proxy (oss://). It drops and resets connections, answers 500/503 (incl.
SlowDown throttling) with real S3/OSS XML bodies, delays, and truncates bodies. Faults under the
retry budget must be survived byte for byte; faults over it must end in ``StorageTemporaryError``
(exit 75) within a bounded time without leaving a multipart upload behind (S3) or leaving exactly
one resumable checkpoint that a rerun completes (OSS); denied/missing buckets must fail at once.
The session prints ``faults: N injected, N survived, 0 bytes lost`` (tests/conftest.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import Counter
from pathlib import Path

import pytest

from kolors_job.core.errors import ExitCode, StorageDeniedError, StorageTemporaryError
from kolors_job.core.settings import Settings
from kolors_job.manifest.spec import Manifest
from kolors_job.storage import open_store, split_uri

try:
    from tests.storage_servers.fault_proxy import LEDGER, Fault, FaultProxy
    from tests.storage_servers.fixtures import pointed, s3_settings
except ModuleNotFoundError:  # tests/ not importable as a package
    from storage_servers.fault_proxy import LEDGER, Fault, FaultProxy
    from storage_servers.fixtures import pointed, s3_settings

MiB = 1024 * 1024
THROTTLED_SHARE, THROTTLE_PER_REQUEST = 0.3, 4
BUDGET = 3  # storage_max_attempts in these tests: at most BUDGET - 1 failures per request are survivable

# one of each survivable fault, used in rotation
ROTATION = [
    Fault("reset"),
    Fault("status", status=503, code="ServiceUnavailable", message="Service is unavailable (injected)"),
    Fault("truncate"),
    Fault("drop"),
    Fault("status", status=500, code="InternalError", message="We encountered an internal error (injected)"),
    Fault("reset_mid_body"),
    Fault("delay", seconds=0.05),
    Fault("status", status=503, code="SlowDown", message="Please reduce your request rate (injected)"),
]


@pytest.fixture(params=["s3", "oss"])
def faulty(request, storage_env, s3_server, oss_server, tmp_path):
    """(scheme, proxy, settings, bucket uri, raw upstream S3 client) with the proxy in the path."""
    scheme = request.param
    upstream = s3_server.endpoint_url if scheme == "s3" else oss_server.endpoint
    proxy = FaultProxy(upstream, flavour=scheme).start()
    settings = pointed(storage_env, scheme, proxy.endpoint, storage_max_attempts=BUDGET, cache_dir=tmp_path / "cache")
    bucket = s3_server.create_bucket()
    yield scheme, proxy, settings, f"{scheme}://{bucket}/run/", s3_server.client()
    proxy.stop()


def _store(uri: str, settings):
    store = open_store(uri, settings)
    if hasattr(store, "retry_base_delay"):  # OSS: our own backoff; keep the tests quick
        store.retry_base_delay, store.retry_max_delay = 0.02, 0.2
    return store


def _make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "big.bin": os.urandom(21 * MiB),  # > 20 MB: multipart (threshold 8 MiB, parts 5 MiB)
        "small.txt": "二次元 ünïcode\n".encode() * 100,
        "nested/deeper/mid.bin": os.urandom(300_000),
        "nested/empty.bin": b"",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _uploads(raw, uri: str) -> list[dict]:
    _, bucket, _ = split_uri(uri)
    return raw.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


# -- storage level ------------------------------------------------------------------------------
def test_directory_round_trip_survives_faults_under_the_budget(faulty, tmp_path):
    _scheme, proxy, settings, uri, raw = faulty
    src, dst = tmp_path / "src", tmp_path / "dst"
    files = _make_tree(src)
    store = _store(uri, settings)
    # every distinct request fails once (a rotation of all kinds), and one part of the big file
    # fails BUDGET - 1 times: the most a request may fail and still get through
    proxy.add(ROTATION[::-1], method="PUT", path=r"partNumber=2\b", per_request=BUDGET - 1, times=None)
    proxy.add(ROTATION, when=lambda m, t: not (m == "PUT" and "partNumber=2" in t), per_request=1, times=None)

    keys = store.upload_dir(src, "tree/")
    assert keys == sorted(f"tree/{k}" for k in files)
    got = store.download_dir("tree/", dst)
    assert len(got) == len(files)
    assert store.read_bytes("tree/small.txt") == files["small.txt"]

    kinds = set(proxy.by_kind)
    assert {"reset", "drop", "status", "truncate", "reset_mid_body", "delay"} <= kinds, proxy.by_kind
    part2 = [t for k, m, t in proxy.events if m == "PUT" and "partNumber=2&" in t + "&"]
    assert len(part2) >= BUDGET - 1, proxy.events
    for rel, data in files.items():
        back = (dst / rel).read_bytes()
        LEDGER.record_bytes(data, back)
        assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest(), rel
    assert _uploads(raw, uri) == []  # nothing half-done left behind
    LEDGER.record_survived(proxy.injected)


@pytest.mark.parametrize("faulty", ["s3"], indirect=True)
def test_s3_faults_over_the_budget_fail_fast_and_leave_no_multipart_upload(faulty, tmp_path):
    _scheme, proxy, settings, uri, raw = faulty
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(21 * MiB))
    store = _store(uri, settings)
    proxy.add(Fault("status", status=500, code="InternalError"), method="PUT", path=r"partNumber=3\b", times=None)
    t0 = time.monotonic()
    with pytest.raises(StorageTemporaryError, match="InternalError") as err:
        store.upload_file("big.bin", big)
    assert time.monotonic() - t0 < 30
    assert err.value.exit_code == ExitCode.TEMPORARY == 75
    part3 = [t for _, m, t in proxy.events if m == "PUT" and "partNumber=3" in t]
    assert len(part3) == BUDGET  # retried exactly up to the budget, then given up
    assert _uploads(raw, uri) == []  # s3transfer aborted the multipart upload
    assert not store.exists("big.bin")

    # an outage: every request reset; a small write is tried BUDGET times, then gives up
    proxy.clear()
    proxy.fail_all("reset")
    n0 = len(proxy.requests)
    t0 = time.monotonic()
    with pytest.raises(StorageTemporaryError):
        store.write_bytes("k", b"v")
    assert len(proxy.requests) - n0 == BUDGET
    # a GET whose body is always cut short: retried within the budget, then temporary
    proxy.clear()
    store.write_bytes("k", os.urandom(100_000))
    proxy.fail_all("truncate", method="GET")
    with pytest.raises(StorageTemporaryError):
        store.read_bytes("k")
    with pytest.raises(StorageTemporaryError):
        store.download_file("k", tmp_path / "k.out")
    assert not (tmp_path / "k.out").exists()  # no partial file in place
    assert time.monotonic() - t0 < 60


@pytest.mark.parametrize("faulty", ["oss"], indirect=True)
def test_oss_upload_over_the_budget_keeps_a_resumable_checkpoint(faulty, tmp_path):
    _scheme, proxy, settings, uri, raw = faulty
    big = tmp_path / "big.bin"
    data = os.urandom(21 * MiB)
    big.write_bytes(data)
    store = _store(uri, settings)
    proxy.add(Fault("status", status=503, code="ServiceUnavailable"), method="PUT", path=r"partNumber=3\b",
              times=None)
    t0 = time.monotonic()
    with pytest.raises(StorageTemporaryError, match="ServiceUnavailable"):
        store.upload_file("big.bin", big)
    assert time.monotonic() - t0 < 30
    part3 = [t for _, m, t in proxy.events if "partNumber=3" in t]
    assert len(part3) == BUDGET
    # the documented resumable checkpoint: one upload on the server, its id in the checkpoint file
    uploads = _uploads(raw, uri)
    assert len(uploads) == 1
    checkpoints = list((settings.cache_dir / "oss-checkpoints").iterdir())
    assert len(checkpoints) == 1
    record = json.loads(checkpoints[0].read_text())
    assert record["upload_id"] == uploads[0]["UploadId"]
    assert not store.exists("big.bin")

    # the outage is over: a retry (e.g. the rerun of the job) resumes the same upload
    proxy.clear()
    n0 = len(proxy.requests)
    store.upload_file("big.bin", big)
    after = proxy.requests[n0:]
    resumed = [t for m, t in after if m == "PUT" and "partNumber=" in t]
    assert not any(m == "POST" and t.endswith("?uploads") for m, t in after)  # no new upload
    assert resumed and all(uploads[0]["UploadId"] in t for t in resumed)
    assert len(resumed) < 5  # only the missing part(s), not all five
    assert _uploads(raw, uri) == [] and not any((settings.cache_dir / "oss-checkpoints").iterdir())
    store.download_file("big.bin", tmp_path / "back.bin")
    back = (tmp_path / "back.bin").read_bytes()
    LEDGER.record_bytes(data, back)
    assert back == data  # (these faults are not counted as survived: the first upload did fail, exit 75)


def test_checkpoint_cut_off_by_an_outage_never_looks_complete(faulty, tmp_path):
    """``checkpoints/step-N/COMPLETE`` must be the last object written: ``COMPLETE`` sorts before
    ``custom_checkpoint_0.pkl`` & co., so a plain sorted upload would write it first."""
    _scheme, proxy, settings, uri, _raw = faulty
    ckpt = tmp_path / "step-4"
    ckpt.mkdir()
    for name in ("COMPLETE", "custom_checkpoint_0.pkl", "optimizer.bin", "pytorch_lora_weights.safetensors",
                 "random_states_0.pkl", "state.json"):
        (ckpt / name).write_bytes(os.urandom(1000))
    store = _store(uri, settings)
    proxy.fail_all(Fault("reset"), method="PUT", skip=2)  # the outage starts with the third file
    with pytest.raises(StorageTemporaryError):
        store.upload_dir(ckpt, "checkpoints/step-4/")
    proxy.clear()
    written = store.list("checkpoints/step-4/")
    assert len(written) == 2 and "checkpoints/step-4/COMPLETE" not in written, written
    store.upload_dir(ckpt, "checkpoints/step-4/")  # the rerun's upload completes it
    assert len(store.list("checkpoints/step-4/")) == 6


def test_denied_and_missing_bucket_fail_at_once_without_retries(faulty, tmp_path):
    scheme, proxy, settings, uri, _raw = faulty
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(9 * MiB))  # multipart: the first request (initiate) is denied
    store = _store(uri, settings)
    proxy.fail_all(Fault("status", status=403, code="AccessDenied", message="Access Denied"))
    for op in (
        lambda: store.write_bytes("k", b"1"),
        lambda: store.read_bytes("k"),
        lambda: store.list(),
        lambda: store.upload_file("big", big),
    ):
        n0, t0 = len(proxy.requests), time.monotonic()
        with pytest.raises(StorageDeniedError) as err:
            op()
        assert err.value.exit_code == ExitCode.STORAGE_DENIED == 5
        assert len(proxy.requests) - n0 == 1, proxy.requests[n0:]  # no retry of a permanent error
        assert time.monotonic() - t0 < 2

    proxy.clear()
    missing = _store(f"{scheme}://kolors-missing-{os.getpid()}/p/", settings)
    for op in (lambda: missing.write_bytes("k", b"1"), lambda: missing.read_bytes("k"), lambda: missing.exists("k")):
        n0, t0 = len(proxy.requests), time.monotonic()
        with pytest.raises(StorageDeniedError, match="NoSuchBucket"):
            op()
        assert len(proxy.requests) - n0 <= 2  # HEAD has no body: one extra HEAD of the bucket
        assert time.monotonic() - t0 < 2


# -- job level ----------------------------------------------------------------------------------
def _bucket_objects(raw, bucket: str, prefix: str) -> dict[str, bytes]:
    out = {}
    for page in raw.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", ()):
            out[obj["Key"][len(prefix):]] = raw.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def _outputs(objects: dict[str, bytes]) -> dict[str, object]:
    """What must not change under faults: LoRA tensors, frame bytes, scores."""
    from safetensors.torch import load

    report = json.loads(objects["report.json"])
    lora = load(objects["lora/pytorch_lora_weights.safetensors"])
    return {
        "lora": {k: v.numpy().tobytes() for k, v in sorted(lora.items())},
        "images": {k: v for k, v in objects.items() if k.startswith("images/")},
        "scores": (report["score"]["per_image"], report["score"]["mean"]),
        "prompts": objects["prompts.json"],
    }


@pytest.fixture(scope="module")
def job_runs(tiny_s3_job, s3_server, shared_cache, tmp_path_factory):
    """The shared tiny job (``tiny_s3_job``, tests/scenarios.py) is the clean run, through a recording proxy; this
    runs it three more times on s3:// behind one fault proxy: under faults, throttled, in an outage."""
    from kolors_job.job.context import Job
    from kolors_job.runner import run_job

    work = tmp_path_factory.mktemp("fault-jobs")
    proxy = FaultProxy(s3_server.endpoint_url, flavour="s3").start()
    raw = s3_server.client()
    bucket = s3_server.create_bucket()
    runs = {"clean": {
        "returncode": tiny_s3_job.returncode, "log": tiny_s3_job.log.decode(errors="replace")[-3000:],
        "requests": tiny_s3_job.requests, "faults": 0, "kinds": Counter(), "seconds": tiny_s3_job.seconds,
        "objects": tiny_s3_job.objects,
    }}  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
        mp.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
        settings = Settings(
            cache_dir=shared_cache, work_dir=work / "work", log_format="json",
            backends={"s3": s3_settings(proxy.endpoint, s3_server.region)}, storage_max_attempts=BUDGET,
        )
        for name, schedule in (("faulty", "rotation"), ("throttled", "throttle"), ("outage", "outage")):
            proxy.clear()
            run_settings = settings
            if schedule == "rotation":
                proxy.add(ROTATION, every=2, per_request=1, times=None)
            elif schedule == "throttle":  # 30 % of all requests throttled, with the default retry budget (8 tries)
                proxy.throttle(THROTTLED_SHARE, seed=31, per_request=THROTTLE_PER_REQUEST)
                run_settings = settings.model_copy(update={"storage_max_attempts": Settings().storage_max_attempts})
            elif schedule == "outage":  # everything fails from the middle of the clean run's traffic on
                proxy.fail_all(Fault("reset"), skip=runs["clean"]["requests"] // 2)
            manifest = Manifest.model_validate(tiny_s3_job.manifest_doc(f"s3://{bucket}/{name}/"))
            n0, f0, t0 = len(proxy.requests), proxy.injected, time.monotonic()
            outcome = run_job(Job(manifest, settings=run_settings))
            requests = proxy.requests[n0:]
            first_submission = next((i for i, (_, t) in enumerate(requests) if "/submission/" in t), len(requests))
            card = next((i for i, (_, t) in enumerate(requests) if "lora/README.md" in t), len(requests))
            runs[name] = {
                "outcome": outcome,
                # report.json counts the retries made before it is assembled: after the model card's upload (the
                # report stage's first), before the submission's; a fault in between may fall on either side
                "faults_before_card": sum(1 for i in proxy.fault_at[f0:] if i - n0 < card),
                "faults_before_report": sum(1 for i in proxy.fault_at[f0:] if i - n0 < first_submission),
                "requests": len(proxy.requests) - n0,
                "faults": proxy.injected - f0,
                "kinds": Counter(k for k, _, _ in proxy.events[f0:]),
                "seconds": time.monotonic() - t0,
                "objects": _bucket_objects(raw, bucket, f"{name}/{manifest.job_id}/"),
            }
    proxy.stop()
    return runs


def test_job_under_faults_gives_the_same_outputs_as_a_clean_run(job_runs):
    clean, faulty = job_runs["clean"], job_runs["faulty"]
    assert clean["returncode"] == 0, clean["log"]
    assert faulty["outcome"].exit_code == 0, faulty["outcome"].message
    assert clean["faults"] == 0 and faulty["faults"] >= 20, faulty["kinds"]
    assert set(faulty["kinds"]) >= {"reset", "drop", "status", "truncate", "reset_mid_body", "delay"}
    assert "_SUCCESS" in faulty["objects"] and json.loads(faulty["objects"]["status.json"])["state"] == "succeeded"
    expected, got = _outputs(clean["objects"]), _outputs(faulty["objects"])
    assert len(expected["images"]) == 8 and expected["lora"]
    for name in ("lora", "images"):
        for key, data in expected[name].items():
            LEDGER.record_bytes(data, got[name].get(key))
    assert got == expected
    # the same set of files, apart from the ones named after the run (TensorBoard's: time and host)
    def files(objects: dict[str, bytes]) -> list[str]:
        return sorted(re.sub(r"[0-9]{9,}(\.[0-9]+)?", "<time>", k) for k in objects)

    assert files(faulty["objects"]) == files(clean["objects"])
    assert any(k.startswith("logs/tensorboard/events.out.tfevents.") for k in faulty["objects"])
    LEDGER.record_survived(faulty["faults"])


def test_job_under_30_percent_throttling_finishes_with_identical_outputs(job_runs):
    """Issue #31 (4): a throttling storm — 30 % of all requests answered 503 SlowDown, 500 or reset (one request
    at most 4 times) — and the job still finishes within the storage deadline with the clean run's LoRA, frames and
    scores; every throttled request was retried after a jittered backoff, and report.json counts the retries."""
    clean, throttled = job_runs["clean"], job_runs["throttled"]
    assert throttled["outcome"].exit_code == 0, throttled["outcome"].message
    share = throttled["faults"] / throttled["requests"]
    assert 0.2 < share < 0.4 and set(throttled["kinds"]) == {"status", "reset"}, (share, throttled["kinds"])
    assert _outputs(throttled["objects"]) == _outputs(clean["objects"])
    retries = json.loads(throttled["objects"]["report.json"])["storage"]["retries"]
    # each injected fault cost one retry; those after report.json was made (its uploads, status, _SUCCESS) are not in it
    counted = (throttled["faults_before_card"], retries, throttled["faults_before_report"], throttled["faults"])
    assert throttled["faults_before_card"] <= retries <= throttled["faults_before_report"], counted
    assert json.loads(clean["objects"]["report.json"])["storage"]["retries"] == 0
    deadline = Settings().storage_deadline_s
    assert throttled["seconds"] < clean["seconds"] + deadline  # no operation waited out its deadline
    print(f"\nthrottled job: {throttled['requests']} requests, {throttled['faults']} throttled ({share:.0%}), "
          f"{retries} retries in report.json, {throttled['seconds']:.1f}s vs {clean['seconds']:.1f}s clean")
    LEDGER.record_survived(throttled["faults"])


def test_backoff_is_exponential_with_full_jitter() -> None:
    """Retries of many clients after one throttling answer must not come back in lockstep: each delay is drawn
    uniformly below an exponentially growing cap (S3's and OSS's own loops; botocore's is wrapped to cap at 2 s)."""
    from kolors_job.storage.base import backoff_delay

    for attempt in range(1, 6):
        cap = min(2.0, 0.05 * 2**attempt)
        draws = [backoff_delay(attempt, 0.05, 2.0) for _ in range(400)]
        assert all(0 <= d <= cap for d in draws)
        assert len(set(draws)) == len(draws) and max(draws) - min(draws) > 0.8 * cap  # spread over the range


@pytest.mark.parametrize("flavour", ["s3", "oss"])
def test_both_loopback_stores_throttle_a_share_of_requests(flavour, storage_env, s3_server, oss_server, tmp_path):
    """The OSS side of the storm (ServerBusy) at the storage level: a directory round trip survives it byte for
    byte, and the retries are counted."""
    from kolors_job.storage.base import RETRIES

    upstream = s3_server.endpoint_url if flavour == "s3" else oss_server.endpoint
    with FaultProxy(upstream, flavour=flavour) as proxy:
        settings = pointed(storage_env, flavour, proxy.endpoint, storage_max_attempts=8, cache_dir=tmp_path / "cache")
        store = _store(f"{flavour}://{s3_server.create_bucket()}/t/", settings)
        files = {f"f{i:02d}.bin": os.urandom(1000 + i) for i in range(30)}
        for rel, data in files.items():
            (tmp_path / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "src" / rel).write_bytes(data)
        before = RETRIES.value
        proxy.throttle(THROTTLED_SHARE, seed=7, per_request=THROTTLE_PER_REQUEST)
        store.upload_dir(tmp_path / "src", "d/")
        store.download_dir("d/", tmp_path / "back")
        busy = "SlowDown" if flavour == "s3" else "ServerBusy"
        assert any(kind == "status" for kind, _, _ in proxy.events) and proxy.injected >= 10, proxy.by_kind
    for rel, data in files.items():
        assert (tmp_path / "back" / rel).read_bytes() == data
    assert RETRIES.value - before == proxy.injected
    assert busy in repr([f.code for r in proxy.rules for f in r.faults])
    LEDGER.record_survived(proxy.injected)


def test_job_in_an_outage_fails_cleanly_with_exit_75(job_runs):
    outage = job_runs["outage"]
    outcome = outage["outcome"]
    assert outcome.exit_code == ExitCode.TEMPORARY == 75, outcome.message
    assert outcome.state == "interrupted"
    assert "_SUCCESS" not in outage["objects"]
    assert outage["faults"] > 0
    # bounded: each request is tried BUDGET times, then the job gives up (no endless loop)
    assert outage["requests"] < job_runs["clean"]["requests"] + 20 * BUDGET
    assert outage["seconds"] < job_runs["clean"]["seconds"] + 60
    if "status.json" in outage["objects"]:
        assert json.loads(outage["objects"]["status.json"])["state"] != "succeeded"
    # a checkpoint the outage cut off never looks complete: COMPLETE is uploaded last
    def checkpoints(objects: dict[str, bytes]) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for key in objects:
            if key.startswith("checkpoints/"):
                _, step, name = key.split("/", 2)
                out.setdefault(step, set()).add(name)
        return out

    full = next(iter(checkpoints(job_runs["clean"]["objects"]).values()))  # every checkpoint has these files
    for step, names in checkpoints(outage["objects"]).items():
        if "COMPLETE" in names:
            assert names == full, step
