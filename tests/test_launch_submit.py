"""``kolors-job submit``, the CI trigger, against a real S3 server (moto on 127.0.0.1).

The test plays the job: it writes what a finished (or failing, or stuck) run leaves under
``<output>/<job id>/`` — status.json, report.json, _SUCCESS — and checks that submit uploads the
manifest, reads those outputs back over S3 and exits with the right code for CI.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from kolors_job.core.errors import ExitCode
from kolors_job.launch import register_cli, submit
from kolors_job.manifest.fields import JOB_ID_PATTERN
from kolors_job.storage import open_store

SCORES = [6.41, 6.12, 5.98, 6.33, 6.05, 6.27, 6.5, 6.2]
MEAN = sum(SCORES) / len(SCORES)


def report(passed: bool, threshold: float = 6.0) -> dict[str, Any]:
    per_image = [{"file": f"images/{i:02d}.png", "score": s} for i, s in enumerate(SCORES, 1)]
    mean = sum(SCORES) / len(SCORES)
    return {"score": {"per_image": per_image, "mean": mean, "threshold": threshold, "passed": passed}}


def run_cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kolors-job")
    register_cli(p.add_subparsers(dest="command", required=True))
    ns = p.parse_args(argv)
    return ns.func(ns)


@pytest.fixture
def bucket(s3_backend: Any, s3_bucket_uri: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket; KOLORS_JOB_S3_* point the storage layer (and child processes) at the server."""
    monkeypatch.setenv("KOLORS_JOB_S3_ENDPOINT_URL", s3_backend.endpoint_url)
    monkeypatch.setenv("KOLORS_JOB_S3_REGION", s3_backend.region)
    monkeypatch.setenv("KOLORS_JOB_S3_ADDRESSING_STYLE", "path")
    monkeypatch.setenv("KOLORS_JOB_STORAGE_MAX_ATTEMPTS", "2")
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    return s3_bucket_uri.rstrip("/")


@pytest.fixture
def manifest(tmp_path: Path, bucket: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kolors-job/v1",
                "kind": "LoraStoryJob",
                "metadata": {"name": "ci-story"},
                "spec": {"output": {"uri": f"{bucket}/out/"}},
            }
        ),
        encoding="utf-8",
    )
    return path


def plant(
    root: str,
    *,
    status: dict[str, Any] | None = None,
    rep: dict[str, Any] | None = None,
    success: bool = False,
) -> None:
    """Write a run's outputs the way the job does: report, status, then _SUCCESS last."""
    store = open_store(root)
    if rep is not None:
        store.write_bytes("report.json", json.dumps(rep).encode())
    if status is not None:
        store.write_bytes("status.json", json.dumps(status).encode())
    if success:
        store.write_bytes("_SUCCESS", b"")


def submit_args(manifest: Path, bucket: str, job_id: str, *extra: str, target: str = "k8s") -> list[str]:
    return [
        "submit",
        target,
        "--manifest",
        str(manifest),
        "--bucket",
        f"{bucket}/jobs",
        "--job-id",
        job_id,
        "--poll",
        "0.05",
        "--timeout",
        "20",
        *extra,
    ]


def test_success_uploads_the_manifest_and_reports_scores(
    manifest: Path,
    bucket: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    plant(
        f"{bucket}/out/ok-1",
        status={"state": "succeeded", "stage": "report", "exit_code": 0},
        rep=report(True),
        success=True,
    )
    assert run_cli(submit_args(manifest, bucket, "ok-1", "--no-start")) == 0
    out = capsys.readouterr().err
    assert open_store(f"{bucket}/jobs/ok-1").read_bytes("manifest.yaml") == manifest.read_bytes()
    for i, s in enumerate(SCORES, 1):
        assert f"images/{i:02d}.png  {s:.3f}" in out
    assert f"mean {MEAN:.3f} vs threshold 6.000: PASSED" in out
    assert "result: succeeded (exit 0)" in out
    md = summary.read_text(encoding="utf-8")
    assert "| images/01.png | 6.410 |" in md and "PASSED" in md


def test_job_failure_returns_the_jobs_exit_code(
    manifest: Path, bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    plant(
        f"{bucket}/out/bad-1",
        status={
            "state": "failed",
            "stage": "dataset",
            "exit_code": 4,
            "error": {"type": "InputError", "message": "no images left after filters"},
        },
    )
    assert run_cli(submit_args(manifest, bucket, "bad-1", "--no-start")) == int(ExitCode.INVALID_INPUT)
    out = capsys.readouterr().err
    assert "job failed (exit 4): InputError: no images left after filters" in out
    assert "no report.json" in out


def test_failure_without_an_exit_code_is_1(manifest: Path, bucket: str) -> None:
    plant(f"{bucket}/out/bad-2", status={"state": "failed", "error": "boom"})
    assert run_cli(submit_args(manifest, bucket, "bad-2", "--no-start")) == 1


def test_quality_gate_failure_exits_3_with_the_scores(
    manifest: Path, bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    plant(
        f"{bucket}/out/gate-1",
        status={"state": "failed", "stage": "score", "exit_code": 3},
        rep=report(False, 6.5),
    )
    assert run_cli(submit_args(manifest, bucket, "gate-1", "--no-start")) == int(ExitCode.QUALITY_GATE)
    out = capsys.readouterr().err
    assert f"mean {MEAN:.3f} vs threshold 6.500: FAILED" in out and "images/08.png  6.200" in out
    # A job run with the gate off still succeeds, but CI is told the story would be rejected.
    plant(f"{bucket}/out/gate-2", status={"state": "succeeded"}, rep=report(False, 6.5), success=True)
    assert run_cli(submit_args(manifest, bucket, "gate-2", "--no-start")) == int(ExitCode.QUALITY_GATE)


def test_timeout_exits_75(manifest: Path, bucket: str, capsys: pytest.CaptureFixture[str]) -> None:
    plant(f"{bucket}/out/slow-1", status={"state": "running", "stage": "train", "step": 40, "total": 500})
    t0 = time.monotonic()
    rc = run_cli([*submit_args(manifest, bucket, "slow-1", "--no-start"), "--timeout", "0.5"])
    assert rc == int(ExitCode.TEMPORARY) and time.monotonic() - t0 < 10
    out = capsys.readouterr().err
    assert "state running, stage train, step 40/500" in out and "timed out" in out


def test_waits_for_outputs_that_arrive_later(manifest: Path, bucket: str, capsys: pytest.CaptureFixture[str]) -> None:
    root = f"{bucket}/out/later-1"

    def job() -> None:
        time.sleep(0.3)
        plant(root, status={"state": "running", "stage": "story"})
        time.sleep(0.3)
        plant(root, status={"state": "succeeded", "stage": "report"}, rep=report(True), success=True)

    t = threading.Thread(target=job)
    t.start()
    try:
        assert run_cli(submit_args(manifest, bucket, "later-1", "--no-start")) == 0
    finally:
        t.join()
    out = capsys.readouterr().err
    assert out.index("state running, stage story") < out.index("result: succeeded")


def finish_when_started(monkeypatch: pytest.MonkeyPatch, starter: str, root: str) -> None:
    """Play the job: once submit has started it, its outputs appear."""
    original = getattr(submit, starter)

    def start(*args: Any) -> Any:
        result = original(*args)
        plant(root, status={"state": "succeeded"}, rep=report(True), success=True)
        return result

    monkeypatch.setattr(submit, starter, start)


def test_k8s_without_kubectl_prints_the_yaml_and_waits(
    manifest: Path, bucket: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    finish_when_started(monkeypatch, "_start_k8s", f"{bucket}/out/k-1")
    argv = submit_args(manifest, bucket, "k-1", "--kubectl", "", "--image", "reg/kj:1", "--gpus", "2")
    assert run_cli(argv) == 0
    captured = capsys.readouterr()
    docs = list(yaml.safe_load_all(captured.out))  # stdout: the objects and nothing else
    assert [d["kind"] for d in docs] == ["PersistentVolumeClaim", "Job"]
    env = {e["name"]: e["value"] for e in docs[-1]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KOLORS_JOB_MANIFEST_URI"] == f"{bucket}/jobs/k-1/manifest.yaml"
    assert "apply it yourself; waiting for its outputs" in captured.err and "result: succeeded" in captured.err
    assert run_cli(submit_args(manifest, bucket, "k-2", "--kubectl", "")) == int(ExitCode.INVALID_MANIFEST)


@pytest.mark.parametrize("manifest_uri", ["local", "s3://unreachable-bucket/jobs/dry-1/manifest.yaml"])
def test_k8s_dry_run_pipes_into_kubectl_and_never_touches_storage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, manifest_uri: str
) -> None:
    """``submit k8s --kubectl '' --no-wait | kubectl apply -f -``: stdout is only the objects, each valid
    against the Kubernetes schema (strict: an unknown field fails), the notes are on stderr, and neither
    the manifest's nor the output's bucket is contacted (its S3 endpoint refuses connections)."""
    import kubernetes_validate

    if manifest_uri == "local":
        manifest_uri = str(tmp_path / "job.yaml")
        Path(manifest_uri).write_text(yaml.safe_dump({"spec": {"output": {"uri": "s3://unreachable-bucket/out/"}}}))
    env = {**os.environ, "KOLORS_JOB_S3_ENDPOINT_URL": "http://127.0.0.1:9", "KOLORS_JOB_STORAGE_DEADLINE_S": "20"}
    argv = [sys.executable, "-m", "kolors_job", "submit", "k8s", "--manifest-uri", manifest_uri, "--job-id", "dry-1",
            "--image", "reg/kj:1", "--namespace", "kolors", "--kubectl", "", "--no-wait"]  # fmt: skip
    started = time.monotonic()
    res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    assert time.monotonic() - started < 20, "no storage deadline was waited out"
    docs = list(yaml.safe_load_all(res.stdout))
    assert [d["kind"] for d in docs] == ["Namespace", "PersistentVolumeClaim", "Job"]
    for doc in docs:
        kubernetes_validate.validate(doc, kubernetes_validate.utils.latest_version(), strict=True)
    assert "job id    dry-1" in res.stderr and "apply it yourself" in res.stderr
    assert "waiting" not in res.stderr, "--no-wait never waits"


def test_fresh_job_id_and_manifest_checks(
    manifest: Path, bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "submit",
        "k8s",
        "--manifest",
        str(manifest),
        "--bucket",
        f"{bucket}/jobs",
        "--no-start",
        "--no-wait",
    ]
    assert run_cli(argv) == 0
    job_id = capsys.readouterr().err.split("job id", 1)[1].split()[0]
    assert job_id.startswith("ci-story-") and re.fullmatch(JOB_ID_PATTERN, job_id)
    assert open_store(f"{bucket}/jobs/{job_id}").exists("manifest.yaml")
    # Same id, same manifest: fine (a rerun resumes). Same id, another manifest: refused.
    assert run_cli([*argv, "--job-id", job_id]) == 0
    other = tmp_path / "other.yaml"
    other.write_text(manifest.read_text().replace("ci-story", "other-story"), encoding="utf-8")
    argv_other = [*argv, "--job-id", job_id]
    argv_other[argv_other.index(str(manifest))] = str(other)
    assert run_cli(argv_other) == int(ExitCode.OUTPUT_CONFLICT)
    # An invalid manifest is refused before anything is uploaded.
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec:\n  output:\n    uri: s3://x/\n  train: {rnak: 4}\n", encoding="utf-8")
    argv_broken = [*argv, "--job-id", "broken-1"]
    argv_broken[argv_broken.index(str(manifest))] = str(broken)
    assert run_cli(argv_broken) == int(ExitCode.INVALID_MANIFEST)
    assert "spec.train.rnak" in capsys.readouterr().err
    assert not open_store(f"{bucket}/jobs/broken-1").exists("manifest.yaml")
    assert run_cli(["submit", "local", "--manifest", str(manifest)]) == int(ExitCode.INVALID_MANIFEST)  # no bucket


# ------------------------------------------------------------------------------------ local target

FAKE_JOB = textwrap.dedent(
    """
    import json, sys, time
    from kolors_job.storage import open_store
    manifest_uri, job_id, root, mode = sys.argv[1:5]
    assert open_store(manifest_uri.rsplit("/", 1)[0]).exists("manifest.yaml")
    store = open_store(f"{root}/{job_id}")
    store.write_bytes("status.json", json.dumps({"state": "running", "stage": "train"}).encode())
    time.sleep(0.3)
    if mode == "crash":
        sys.exit(75)
    if mode == "retry":  # attempt 1 fails retryably, the scheduler's attempt 2 succeeds
        store.write_bytes("status.json", json.dumps({"state": "failed", "exit_code": 75}).encode())
        time.sleep(0.5)
    report = json.loads(sys.argv[5])
    store.write_bytes("report.json", json.dumps(report).encode())
    store.write_bytes("status.json", json.dumps({"state": "succeeded", "stage": "report", "exit_code": 0}).encode())
    store.write_bytes("_SUCCESS", b"")
    """
)


def _fake_local(monkeypatch: pytest.MonkeyPatch, root: str, mode: str) -> None:
    def command(manifest_uri: str, job_id: str, output: str | None) -> list[str]:
        return [sys.executable, "-c", FAKE_JOB, manifest_uri, job_id, root, mode, json.dumps(report(True))]

    monkeypatch.setattr(submit, "local_command", command)


def test_local_target_runs_the_job_and_ignores_a_previous_attempts_status(
    manifest: Path, bucket: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # An earlier attempt of this job id failed; the new run must not be judged by that.
    plant(f"{bucket}/out/loc-1", status={"state": "failed", "exit_code": 75})
    _fake_local(monkeypatch, f"{bucket}/out", "ok")
    assert run_cli(submit_args(manifest, bucket, "loc-1", target="local")) == 0
    out = capsys.readouterr().err
    assert "started: local process" in out and "result: succeeded (exit 0)" in out


def test_local_target_that_dies_without_a_final_status(
    manifest: Path, bucket: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_local(monkeypatch, f"{bucket}/out", "crash")
    assert run_cli(submit_args(manifest, bucket, "loc-2", target="local")) == int(ExitCode.TEMPORARY)
    assert "ended without a final status.json" in capsys.readouterr().err


def test_a_retryable_failure_is_not_final_while_the_scheduler_runs(
    manifest: Path, bucket: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_local(monkeypatch, f"{bucket}/out", "retry")
    assert run_cli(submit_args(manifest, bucket, "loc-3", target="local")) == 0
    out = capsys.readouterr().err
    assert "state failed" in out and "result: succeeded (exit 0)" in out


def test_local_command_runs_kolors_job_run() -> None:
    cmd = submit.local_command("s3://b/j/manifest.yaml", "j", "s3://o/")
    assert cmd[1:] == [
        "-m",
        "kolors_job",
        "run",
        "--manifest",
        "s3://b/j/manifest.yaml",
        "--job-id",
        "j",
        "--output",
        "s3://o/",
    ]


# ------------------------------------------------------------------------------------ dlc target


class _FakeDlc(BaseHTTPRequestHandler):
    """The DLC OpenAPI's two calls submit makes, as the pinned SDK sends them (ROA JSON: POST /api/v1/jobs,
    GET /api/v1/jobs/<id>). ``statuses``: what each GetJob answers, the last one repeated — a Status, a
    ``(Status, ReasonCode)`` pair, or an HTTP error status (404: the job was deleted, 403, 503)."""

    created: ClassVar[list[dict[str, Any]]] = []
    statuses: ClassVar[list[str | tuple[str, str] | int]] = []
    fail: ClassVar[tuple[int, str] | None] = None
    gets: ClassVar[int] = 0
    ERRORS: ClassVar[dict[int, tuple[str, str]]] = {
        404: ("100400027", "The job dlcjob1 does not exist"),
        403: ("Forbidden.RAM", "kolors-test-secret is not allowed to GetJob"),
        503: ("ServiceUnavailable", "The request has failed due to a temporary failure of the server."),
    }

    def _reply(self, obj: dict[str, Any], status: int = 200) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        type(self).created.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        if type(self).fail:
            status, code = type(self).fail
            body = json.dumps({"Code": code, "Message": "kolors-test-secret is not allowed", "RequestId": "r"})
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())
            return
        self._reply({"JobId": "dlcjob1", "RequestId": "r"})

    def do_GET(self) -> None:
        cls, st = type(self), type(self).statuses
        cls.gets += 1
        answer = st.pop(0) if len(st) > 1 else st[0]
        if isinstance(answer, int):
            code, message = cls.ERRORS[answer]
            self._reply({"Code": code, "Message": message, "RequestId": "r"}, status=answer)
            return
        status, reason = answer if isinstance(answer, tuple) else (answer, "")
        self._reply({"JobId": "dlcjob1", "Status": status, "ReasonCode": reason, "RequestId": "r"})

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def dlc_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_ID", "kolors-test-ak")
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "kolors-test-secret")
    for var in ("ALIBABA_CLOUD_REGION_ID", "ALIBABACLOUD_REGION_ID"):
        monkeypatch.delenv(var, raising=False)  # the job's region comes from the spec's mount here
    _FakeDlc.created, _FakeDlc.statuses, _FakeDlc.fail, _FakeDlc.gets = [], ["Running"], None, 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeDlc)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


DLC_SETS = [
    "--set",
    "WorkspaceId=42",
    "--set",
    "DataSources.0.Uri=oss://c.oss-cn-hangzhou-internal.aliyuncs.com/x/",
    "--set",
    "CredentialConfig.CredentialConfigItems.0.Roles.0.RoleArn=acs:ram::1:role/k",
]


def test_dlc_target_creates_the_job_and_reports(
    manifest: Path,
    bucket: str,
    dlc_endpoint: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    finish_when_started(monkeypatch, "_start_dlc", f"{bucket}/out/dlc-1")
    argv = submit_args(
        manifest, bucket, "dlc-1", "--endpoint", dlc_endpoint, "--image", "reg/kj:1", *DLC_SETS, target="dlc"
    )
    assert run_cli(argv) == 0
    (body,) = _FakeDlc.created
    assert body["Envs"]["KOLORS_JOB_MANIFEST_URI"] == f"{bucket}/jobs/dlc-1/manifest.yaml"
    assert body["UserCommand"] == "python /app/entrypoint.py run --job-id dlc-1" and body["WorkspaceId"] == "42"
    assert "started: PAI-DLC job dlcjob1" in capsys.readouterr().err


def _dlc_argv(manifest: Path, bucket: str, job_id: str, endpoint: str) -> list[str]:
    return submit_args(manifest, bucket, job_id, "--endpoint", endpoint, "--image", "reg/kj:1", *DLC_SETS, target="dlc")


def plant_after_start(monkeypatch: pytest.MonkeyPatch, root: str, **outputs: Any) -> None:
    """Play a job that got as far as writing ``outputs`` once submit created it."""
    original = submit._start_dlc

    def start(*args: Any) -> Any:
        probe = original(*args)
        plant(root, **outputs)
        return probe

    monkeypatch.setattr(submit, "_start_dlc", start)


@pytest.mark.parametrize(
    ("statuses", "outputs", "code", "says"),
    [
        # Failed before the job wrote anything: it never started (image, quota, node) — Kubernetes gives 7 too
        (["Queuing", ("Failed", "JobFailed.ImagePullFailed")], {}, 7,
         "the job could not start: PAI-DLC job dlcjob1 Failed: JobFailed.ImagePullFailed — it wrote no status.json"),
        (["EnvPreparing", "FailedReserving"], {}, 7, "could not start: PAI-DLC job dlcjob1 FailedReserving"),
        # Failed mid-run without a final status (killed: OOM, node lost): retryable, a rerun resumes
        (["Running", "Failed"], {"status": {"state": "running", "stage": "train"}}, 75,
         "ended without a final status.json/_SUCCESS (PAI-DLC job dlcjob1 Failed)"),
        # the job's own final status wins over the platform's word
        (["Running", "Failed"], {"status": {"state": "failed", "exit_code": 4, "error": "no images"}}, 4,
         "job failed (exit 4): no images"),
        (["Running", "Failed"], {"status": {"state": "interrupted", "exit_code": 75}}, 75, "Failed"),
        # stopped by a person or JobMaxRunningTimeMinutes: resume with the same job id
        (["Running", ("Stopped", "JobStoppedByUser")], {}, 75,
         "PAI-DLC job dlcjob1 Stopped: JobStoppedByUser; submit again with the same --job-id to resume"),
        (["Running", "Stopping", "Stopped"], {"status": {"state": "running"}}, 75, "Stopped"),
        # Succeeded: the outputs decide; none at all would be a bug
        (["Running", "SucceededReserving"], {"status": {"state": "succeeded"}, "rep": report(True), "success": True},
         0, "result: succeeded (exit 0)"),
        (["Running", "Succeeded"], {"status": {"state": "succeeded"}, "rep": report(False), "success": True},
         3, "FAILED"),
        (["Succeeded"], {}, 1, "ended without a final status.json/_SUCCESS (PAI-DLC job dlcjob1 Succeeded)"),
    ],
)
def test_every_dlc_end_maps_to_a_documented_exit_code(
    manifest: Path, bucket: str, dlc_endpoint: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, statuses: list[Any], outputs: dict[str, Any], code: int, says: str,
) -> None:
    _FakeDlc.statuses = list(statuses)  # the server pops from its copy
    job_id = f"dlc-end-{len(statuses)}-{code}-{abs(hash(says)) % 10_000}"
    if outputs:
        plant_after_start(monkeypatch, f"{bucket}/out/{job_id}", **outputs)
    assert run_cli(_dlc_argv(manifest, bucket, job_id, dlc_endpoint)) == code
    err = capsys.readouterr().err
    assert says in err, err
    if not outputs:  # with none, every state GetJob answered is shown once, as it changes
        first = statuses[0] if isinstance(statuses[0], str) else statuses[0][0]
        assert err.splitlines().count(f"PAI-DLC job dlcjob1 {first}") == 1, err


def test_a_deleted_dlc_job_ends_at_once_with_its_id(
    manifest: Path, bucket: str, dlc_endpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """GetJob 404 (deleted in the console): exit 75 after two answers, not seven retries and the 6 h timeout."""
    from kolors_job.launch.watch import DLC_GONE_AFTER

    _FakeDlc.statuses = ["Running", 404]
    started = time.monotonic()
    argv = [*_dlc_argv(manifest, bucket, "dlc-gone", dlc_endpoint), "--timeout", "3600"]
    assert run_cli(argv) == int(ExitCode.TEMPORARY)
    assert time.monotonic() - started < 30
    assert _FakeDlc.gets == 1 + DLC_GONE_AFTER
    assert DLC_GONE_AFTER * submit_parser_default("poll") < 60, "under a minute at the default poll interval"
    err = capsys.readouterr().err
    assert "PAI-DLC job dlcjob1 no longer exists (deleted?): 100400027: The job dlcjob1 does not exist" in err
    assert err.count("GetJob failed, will retry") == 1 and "result: failed (exit 75)" in err


def test_dlc_getjob_denied_is_5_and_a_flaky_getjob_is_retried(
    manifest: Path, bucket: str, dlc_endpoint: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _FakeDlc.statuses = ["Running", 403]
    assert run_cli(_dlc_argv(manifest, bucket, "dlc-denied", dlc_endpoint)) == int(ExitCode.STORAGE_DENIED)
    err = capsys.readouterr().err
    assert "GetJob denied: Forbidden.RAM" in err and "kolors-test-secret" not in err
    _FakeDlc.statuses, _FakeDlc.gets = [503, 503, 503, "Running", "Succeeded"], 0
    plant_after_start(monkeypatch, f"{bucket}/out/dlc-flaky", status={"state": "succeeded"}, rep=report(True),
                      success=False)  # fmt: skip
    assert run_cli(_dlc_argv(manifest, bucket, "dlc-flaky", dlc_endpoint)) == 1  # Succeeded, no _SUCCESS: a bug
    err = capsys.readouterr().err
    assert err.count("GetJob failed, will retry: ServiceUnavailable") == 1, "the same error is shown once"
    assert _FakeDlc.gets >= 5


def submit_parser_default(dest: str) -> Any:
    p = argparse.ArgumentParser(prog="kolors-job")
    register_cli(p.add_subparsers(dest="command", required=True))
    return p.parse_args(["submit", "dlc", "--manifest-uri", "x"]).__dict__[dest]


def test_a_dlc_spec_with_placeholders_left_creates_nothing(manifest: Path, bucket: str, dlc_endpoint: str) -> None:
    argv = submit_args(manifest, bucket, "dlc-3", "--endpoint", dlc_endpoint, "--image", "reg/kj:1", target="dlc")
    assert run_cli(argv) == int(ExitCode.INVALID_MANIFEST) and not _FakeDlc.created


# ------------------------------------------------------------------------------------ CI example


def test_example_workflow_pins_actions_uses_oidc_and_valid_submit_flags() -> None:
    path = Path(__file__).resolve().parents[1] / "examples" / "ci" / "github-actions.yml"
    wf = yaml.safe_load(path.read_text(encoding="utf-8"))
    p = argparse.ArgumentParser(prog="kolors-job")
    register_cli(p.add_subparsers(dest="command", required=True))
    submits = 0
    for name, job in wf["jobs"].items():
        for step in job["steps"]:
            if "uses" in step:
                action, _, ref = step["uses"].partition("@")
                assert re.fullmatch(r"v\d+\.\d+\.\d+|[0-9a-f]{40}", ref), f"{name}: pin {action} exactly, not @{ref}"
            run = step.get("run", "")
            if run.startswith("kolors-job submit"):
                submits += 1
                assert job["permissions"]["id-token"] == "write", f"{name}: OIDC needs id-token: write"
                argv = shlex.split(re.sub(r"\$\{\{[^}]*\}\}|\$[A-Z_]+", "X", run))[1:]
                ns = p.parse_args(argv)  # every flag the example uses exists
                assert ns.target in ("dlc", "k8s") and ns.job_id == "X" and ns.timeout > 3600
    assert submits == 2


# The current major of every action the example uses, its newest release tag and the inputs its action.yml
# documents there (read from each action's repository at that tag, 2026-12; ``runs.using`` noted: node24 for all
# but the Aliyun action, whose newest release, v1.0.7, still says node20).
CURRENT_ACTIONS: dict[str, tuple[str, set[str]]] = {
    "actions/checkout": ("v7.0.1", {"repository", "ref", "token", "ssh-key", "persist-credentials", "path",
                                    "clean", "filter", "sparse-checkout", "fetch-depth", "fetch-tags", "lfs",
                                    "submodules", "set-safe-directory", "github-server-url"}),
    "actions/setup-python": ("v7.0.0", {"python-version", "python-version-file", "cache", "architecture",
                                        "check-latest", "token", "cache-dependency-path", "update-environment",
                                        "allow-prereleases", "freethreaded", "pip-version"}),
    "docker/setup-buildx-action": ("v4.3.0", {"version", "driver", "driver-opts", "buildkitd-flags", "platforms",
                                              "use", "endpoint", "cleanup", "name"}),
    "docker/login-action": ("v4.1.0", {"registry", "username", "password", "ecr", "logout", "scope"}),
    "docker/build-push-action": ("v7.3.0", {"context", "file", "push", "tags", "cache-from", "cache-to", "labels",
                                            "build-args", "platforms", "load", "outputs", "provenance", "sbom"}),
    "aliyun/configure-aliyun-credentials-action": ("v1.0.7", {"oidc-provider-arn", "role-to-assume", "audience",
                                                              "role-session-expiration", "role-session-name",
                                                              "role-chaining"}),
    "aws-actions/configure-aws-credentials": ("v6.2.3", {"aws-region", "role-to-assume", "role-duration-seconds",
                                                         "role-session-name", "audience", "web-identity-token-file"}),
}  # fmt: skip
"""Only the inputs the example may use are listed for the larger actions (all of them exist at that tag)."""


def test_example_workflow_uses_each_actions_current_major_and_documented_inputs() -> None:
    path = Path(__file__).resolve().parents[1] / "examples" / "ci" / "github-actions.yml"
    wf = yaml.safe_load(path.read_text(encoding="utf-8"))
    used = set()
    for job in wf["jobs"].values():
        for step in job["steps"]:
            if "uses" not in step:
                continue
            action, _, ref = step["uses"].partition("@")
            assert action in CURRENT_ACTIONS, f"{action}: record its current major here"
            tag, inputs = CURRENT_ACTIONS[action]
            assert ref == tag, f"{action}@{ref}: the current release is {tag}"
            assert set(step.get("with") or {}) <= inputs, (action, set(step["with"]) - inputs)
            used.add(action)
    assert used == set(CURRENT_ACTIONS)


def test_the_example_dlc_job_gets_its_regions_internal_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue: examples/ci never gave the DLC job its region's endpoint (the job read Hangzhou's). The CI step's
    ALIBABA_CLOUD_REGION_ID is submit's default --region, which now sets the job's endpoint."""
    from kolors_job.launch import dlc

    path = Path(__file__).resolve().parents[1] / "examples" / "ci" / "github-actions.yml"
    (step,) = [s for s in yaml.safe_load(path.read_text(encoding="utf-8"))["jobs"]["dlc"]["steps"]
               if s.get("run", "").startswith("kolors-job submit dlc")]  # fmt: skip
    assert step["env"]["ALIBABA_CLOUD_REGION_ID"] == "${{ vars.ALIYUN_REGION }}"
    for region in ("cn-beijing", "ap-southeast-1"):
        monkeypatch.setenv("ALIBABA_CLOUD_REGION_ID", region)
        p = argparse.ArgumentParser(prog="kolors-job")
        register_cli(p.add_subparsers(dest="command", required=True))
        values = {"vars.DLC_CACHE_URI": f"oss://cache.oss-{region}-internal.aliyuncs.com/kolors-job-cache/",
                  "vars.PAI_WORKSPACE_ID": "42", "vars.DLC_JOB_ROLE_ARN": "acs:ram::1:role/k"}  # fmt: skip
        run = re.sub(r"\$\{\{ *([^} ]*) *\}\}", lambda m, v=values: v.get(m.group(1), "X"), step["run"])
        ns = p.parse_args(shlex.split(run.replace('"$MANIFEST"', "m.yaml").replace('"$JOB_ID"', "ci-1"))[1:])
        request = dlc.build_request(dlc.load_spec(Path(__file__).resolve().parents[1] / ns.spec),
                                    manifest_uri="oss://bkt/jobs/ci-1/manifest.yaml", job_id="ci-1", image=ns.image,
                                    overrides=ns.set, region=ns.region).to_map()  # fmt: skip
        assert request["Envs"]["KOLORS_JOB_OSS_ENDPOINT"] == f"https://oss-{region}-internal.aliyuncs.com"


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [(403, "Forbidden.RAM", 5), (503, "ServiceUnavailable", 75), (400, "InvalidParameter.EcsSpec", 1)],
)
def test_dlc_create_failures_map_to_contract_exit_codes(
    manifest: Path,
    bucket: str,
    dlc_endpoint: str,
    capsys: pytest.CaptureFixture[str],
    status: int,
    code: str,
    expected: int,
) -> None:
    _FakeDlc.fail = (status, code)
    argv = submit_args(
        manifest, bucket, f"dlc-f{status}", "--endpoint", dlc_endpoint, "--image", "reg/kj:1", *DLC_SETS, target="dlc"
    )
    assert run_cli(argv) == expected
    err = capsys.readouterr().err
    assert f"PAI-DLC CreateJob failed: {code}" in err and "kolors-test-secret" not in err


# What aliyun/configure-aliyun-credentials-action documents in its action.yml at v1.0.7 (inputs and
# outputs). v1.0.1 had only role-to-assume/oidc-provider-arn/audience and exported ALIBABACLOUD_* alone.
ALIYUN_ACTION_INPUTS = {
    "v1.0.7": {"oidc-provider-arn", "role-to-assume", "role-session-expiration", "role-session-name",
               "audience", "role-chaining"},
    "v1.0.1": {"oidc-provider-arn", "role-to-assume", "audience"},
}
ALIYUN_ACTION_OUTPUTS = {"aliyun-access-key-id", "aliyun-access-key-secret", "aliyun-security-token"}


def test_example_workflow_hands_the_aliyun_actions_documented_outputs_to_the_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only documented inputs (else the 6 h session silently falls back to 30 min) and the job's
    ALIBABA_CLOUD_* keys wired from documented outputs (else DLC says "accessKeyId cannot be empty")."""
    from alibabacloud_credentials.client import Client as CredentialClient

    from kolors_job.launch import dlc

    path = Path(__file__).resolve().parents[1] / "examples" / "ci" / "github-actions.yml"
    steps = yaml.safe_load(path.read_text(encoding="utf-8"))["jobs"]["dlc"]["steps"]
    (cred,) = [s for s in steps if s.get("uses", "").startswith("aliyun/configure-aliyun-credentials-action@")]
    ref = cred["uses"].partition("@")[2]
    assert ref in ALIYUN_ACTION_INPUTS, f"inputs of {ref} not recorded here"
    assert set(cred["with"]) <= ALIYUN_ACTION_INPUTS[ref], set(cred["with"]) - ALIYUN_ACTION_INPUTS[ref]
    assert int(cred["with"]["role-session-expiration"]) >= 6 * 3600
    (job_step,) = [s for s in steps if s.get("run", "").startswith("kolors-job submit dlc")]
    wired = {}
    for name, value in job_step["env"].items():
        m = re.fullmatch(r"\$\{\{ steps\.(\S+)\.outputs\.(\S+) \}\}", str(value))
        if m:
            assert m.group(1) == cred["id"] and m.group(2) in ALIYUN_ACTION_OUTPUTS, value
            wired[name] = m.group(2)
    assert wired == {"ALIBABA_CLOUD_ACCESS_KEY_ID": "aliyun-access-key-id",
                     "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "aliyun-access-key-secret",
                     "ALIBABA_CLOUD_SECURITY_TOKEN": "aliyun-security-token"}
    # What the job then builds from those three variables: an STS credential, not the empty default chain.
    for var in [v for v in os.environ if v.startswith(("ALIBABA_CLOUD_", "ALIBABACLOUD_"))]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_ID", "STS.kolors-ak")
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "kolors-sk-value")
    monkeypatch.setenv("ALIBABA_CLOUD_SECURITY_TOKEN", "kolors-token-value")
    got = dlc._credentials(CredentialClient).get_credential()
    assert (got.access_key_id, got.security_token, got.type) == ("STS.kolors-ak", "kolors-token-value", "sts")


# ------------------------------------------------------------------------------------ k8s: fake kubectl

FAKE_KUBECTL = r'''#!PYTHON
"""A kubectl that answers from a JSON state file and logs every call (one JSON argv per line)."""
import json, os, sys
import yaml

state_path, log_path = os.environ["FAKE_KUBECTL_STATE"], os.environ["FAKE_KUBECTL_LOG"]
argv = sys.argv[1:]
with open(log_path, "a") as log:
    log.write(json.dumps(argv) + "\n")
state = json.load(open(state_path))
verb, rest = argv[0], argv[1:]
if verb == "apply":
    docs = [d for d in yaml.safe_load_all(sys.stdin.read()) if d]
    state.setdefault("applied", []).append(docs)
    json.dump(state, open(state_path, "w"))
    for d in docs:
        print(f"{d['kind'].lower()}/{d['metadata']['name']} created")
    sys.exit(0)
if verb == "delete":
    sys.exit(0)
if verb == "get":
    what = rest[0]
    if "-o" in rest and rest[rest.index("-o") + 1] == "name":
        sys.exit(0 if what in state.get("existing", []) else 1)
    if "/" in what:
        kind, name = what.split("/")
        print(json.dumps(state.get("workloads", {}).get(name, {"kind": kind.capitalize(), "status": {}})))
    elif what == "events":
        sel = rest[rest.index("--field-selector") + 1].split("=", 1)[1]
        print(json.dumps({"items": state.get("events", {}).get(sel, [])}))
    elif what == "pods":
        print(json.dumps({"items": state.get("pods", [])}))
    else:
        print(json.dumps({"items": state.get("listed", [])}))
    sys.exit(0)
sys.exit(f"fake kubectl: unsupported {argv}")
'''


class FakeKubectl:
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.binary = tmp_path / "bin" / "kubectl"
        self.binary.parent.mkdir()
        self.binary.write_text(FAKE_KUBECTL.replace("PYTHON", sys.executable, 1))
        self.binary.chmod(0o755)
        self.state_path, self.log_path = tmp_path / "kubectl-state.json", tmp_path / "kubectl.log"
        self.state_path.write_text("{}")
        self.log_path.write_text("")
        monkeypatch.setenv("FAKE_KUBECTL_STATE", str(self.state_path))
        monkeypatch.setenv("FAKE_KUBECTL_LOG", str(self.log_path))

    def set(self, **state: Any) -> None:
        self.state_path.write_text(json.dumps(state))

    @property
    def state(self) -> dict[str, Any]:
        return json.loads(self.state_path.read_text())

    @property
    def calls(self) -> list[list[str]]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines()]


@pytest.fixture
def kubectl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeKubectl:
    return FakeKubectl(tmp_path, monkeypatch)


def _k8s_argv(manifest: Path, bucket: str, job_id: str, kubectl: FakeKubectl, *extra: str) -> list[str]:
    return submit_args(manifest, bucket, job_id, "--kubectl", str(kubectl.binary), "--image", "reg/kj:1",
                       "--namespace", "kolors", "--timeout", "60", *extra)  # fmt: skip


def _pod(reason: str | None = None, message: str = "", *, scheduled: dict[str, str] | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": "Pending", "conditions": []}
    if reason:
        status["containerStatuses"] = [{"name": "kolors-job", "state": {"waiting": {"reason": reason,
                                                                                   "message": message}}}]  # fmt: skip
    if scheduled:
        status["conditions"].append({"type": "PodScheduled", "status": "False", **scheduled})
    return {"metadata": {"name": "kolors-k-pod"}, "status": status}


@pytest.mark.parametrize(
    ("pod", "reason"),
    [
        (_pod("ImagePullBackOff", 'Back-off pulling image "reg/kj:1"'), "ImagePullBackOff"),
        (_pod("CreateContainerConfigError", 'secret "kolors-job-storage" not found'), "CreateContainerConfigError"),
        (_pod(scheduled={"reason": "Unschedulable",
                         "message": '0/3 nodes are available: persistentvolumeclaim "kolors-job-cache" not found.'}),
         "persistentvolumeclaim"),
    ],
)
def test_k8s_pod_that_cannot_start_fails_fast_with_the_reason(
    manifest: Path, bucket: str, kubectl: FakeKubectl, capsys: pytest.CaptureFixture[str],
    pod: dict[str, Any], reason: str,
) -> None:
    """Not the 6 h deadline and "timeout" (75): exit 7 within a poll or two, the reason, the Job deleted."""
    kubectl.set(pods=[pod], existing=["namespace/kolors", "persistentvolumeclaim/kolors-job-cache"])
    started = time.monotonic()
    assert run_cli(_k8s_argv(manifest, bucket, "k-bad", kubectl)) == int(ExitCode.NOT_STARTED)
    assert time.monotonic() - started < 30
    out = capsys.readouterr().err
    assert "the job could not start: pod kolors-k-pod: " in out and reason in out
    (applied,) = kubectl.state["applied"]
    assert [d["kind"] for d in applied] == ["Job"], "an existing Namespace/PVC is not re-applied"
    name = applied[0]["metadata"]["name"]
    assert ["delete", f"job/{name}", "--ignore-not-found", "--wait=false", "-n", "kolors"] in kubectl.calls
    pod_queries = [c for c in kubectl.calls if c[:2] == ["get", "pods"]]
    assert pod_queries[0][3] == f"kolors-job/job-id=k-bad,kolors-job/attempt={applied[0]['metadata']['labels']['kolors-job/attempt']}"


def test_k8s_unschedulable_pod_gets_start_timeout_then_exit_7(
    manifest: Path, bucket: str, kubectl: FakeKubectl, capsys: pytest.CaptureFixture[str]
) -> None:
    kubectl.set(pods=[_pod(scheduled={"reason": "Unschedulable", "message": "0/3 nodes: Insufficient nvidia.com/gpu."})])
    started = time.monotonic()
    assert run_cli(_k8s_argv(manifest, bucket, "k-full", kubectl, "--start-timeout", "1")) == 7
    assert 1 <= time.monotonic() - started < 30, "waits --start-timeout for capacity, then gives up"
    out = capsys.readouterr().err
    assert "Unschedulable for" in out and "Insufficient nvidia.com/gpu" in out
    # The first run applies the Namespace and PVC it needs (none exists in this cluster).
    assert [d["kind"] for d in kubectl.state["applied"][0]] == ["Namespace", "PersistentVolumeClaim", "Job"]


def test_k8s_missing_secret_volume_event_fails_fast(
    manifest: Path, bucket: str, kubectl: FakeKubectl, capsys: pytest.CaptureFixture[str]
) -> None:
    event = {"reason": "FailedMount", "message": 'MountVolume.SetUp failed for volume "creds": secret "x" not found'}
    kubectl.set(pods=[_pod()], events={"kolors-k-pod": [event]})
    assert run_cli(_k8s_argv(manifest, bucket, "k-mount", kubectl)) == 7
    assert 'FailedMount: MountVolume.SetUp failed for volume "creds": secret "x" not found' in capsys.readouterr().err


def test_k8s_rerun_after_a_failed_job_applies_a_new_attempt_and_attaches_to_a_running_one(
    manifest: Path, bucket: str, kubectl: FakeKubectl, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CI's "re-run" on a failed Job: a fresh Job name (applying the old one says "unchanged"), the same job id,
    so the job resumes from the output bucket; while an attempt still runs, the rerun waits on that one."""
    failed = {"kind": "Job", "metadata": {"name": "kolors-k-re-aaaaaa"},
              "status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}}
    kubectl.set(listed=[failed], workloads={"kolors-k-re-aaaaaa": failed})
    finish_when_started(monkeypatch, "_start_k8s", f"{bucket}/out/k-re")
    assert run_cli(_k8s_argv(manifest, bucket, "k-re", kubectl)) == 0
    (applied,) = kubectl.state["applied"]
    job = applied[-1]
    assert job["metadata"]["name"].startswith("kolors-k-re-") and job["metadata"]["name"] != "kolors-k-re-aaaaaa"
    assert job["metadata"]["labels"]["kolors-job/job-id"] == "k-re"
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["run", "--job-id", "k-re"]

    running = {"kind": "Job", "metadata": {"name": "kolors-k-run-bbbbbb"}, "status": {"active": 1}}
    kubectl.set(listed=[running], workloads={"kolors-k-run-bbbbbb": running})
    finish_when_started(monkeypatch, "_start_k8s", f"{bucket}/out/k-run")
    assert run_cli(_k8s_argv(manifest, bucket, "k-run", kubectl)) == 0
    assert "applied" not in kubectl.state
    assert "attaching to Job kolors-k-run-bbbbbb, still running for this job id" in capsys.readouterr().err


def test_example_workflow_names_the_image_in_lower_case() -> None:
    """``ghcr.io/${{ github.repository }}`` keeps the owner's capitals ("Octo-Org/Repo"): an invalid reference."""
    path = Path(__file__).resolve().parents[1] / "examples" / "ci" / "github-actions.yml"
    text = path.read_text(encoding="utf-8")
    assert "${{ github.repository }}" not in text
    wf = yaml.safe_load(text)
    (name_step,) = [s for s in wf["jobs"]["image"]["steps"] if s.get("id") == "name"]
    script = name_step["run"].replace("${GITHUB_SHA}", "0123abc")
    out = subprocess.run(["bash", "-c", script.replace('"$GITHUB_OUTPUT"', "/dev/stdout")], capture_output=True,
                         text=True, check=True, env={**os.environ, "GITHUB_REPOSITORY": "Octo-Org/Kolors-Repo"})  # fmt: skip
    assert out.stdout.strip() == "image=ghcr.io/octo-org/kolors-repo:0123abc"
    assert wf["jobs"]["image"]["outputs"]["image"] == "${{ steps.name.outputs.image }}"
    for job in ("dlc", "k8s"):
        (submit_step,) = [s for s in wf["jobs"][job]["steps"] if s.get("run", "").startswith("kolors-job submit")]
        assert "needs.image.outputs.image" in submit_step["run"]
