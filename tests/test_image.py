"""The image for real: ``docker build`` of the Dockerfile, then ``--help``, ``demo`` and a tiny ``run``
against a loopback S3, each as the image's own user with a read-only root filesystem, every capability
dropped and no privilege escalation (what ``k8s/`` asks of a pod).

Needs a Docker engine (skipped with the reason when there is none). ``KOLORS_TEST_BASE_IMAGE`` names the
base image (the Dockerfile's ``BASE_IMAGE`` build argument; default: the Dockerfile's own), e.g. a Debian
bookworm made with ``debootstrap --include=python3,python3-venv,ca-certificates`` and ``docker import``
where no registry is reachable. ``DOCKER_BUILDKIT=0`` in the environment builds with the legacy builder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from kolors_job.demo import build_demo_dataset, tiny_job

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TAG = "kolors-job:image-test"
BUILD_TIMEOUT = 3600  # the first build downloads torch and the CUDA wheels (~4 GB)
HARDENED = [
    "--read-only",
    "--cap-drop", "ALL",
    "--security-opt", "no-new-privileges",
    "--tmpfs", "/tmp:rw,exec",
    "--tmpfs", "/home/kolors:rw,uid=1000,gid=1000",
]


def _docker() -> str:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker CLI on PATH: the image test needs a Docker engine")
    r = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"no Docker engine answers ({r.stderr.strip().splitlines()[-1] if r.stderr.strip() else 'docker info failed'})")
    return docker


@pytest.fixture(scope="module")
def image() -> str:
    docker = _docker()
    cmd = [docker, "build", "-t", TAG]
    if base := os.environ.get("KOLORS_TEST_BASE_IMAGE"):
        cmd += ["--build-arg", f"BASE_IMAGE={base}"]
    started = time.monotonic()
    r = subprocess.run([*cmd, str(ROOT)], capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    print(f"\nbuilt {TAG} in {time.monotonic() - started:.0f} s ({' '.join(cmd[2:])})")
    return TAG


def _run(docker: str, image: str, *args: str, extra: list[str] | None = None, env: dict[str, str] | None = None,
         timeout: float = 900) -> subprocess.CompletedProcess[str]:
    cmd = [docker, "run", "--rm", *HARDENED, *(extra or []), image, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_image_user_is_non_root(image: str) -> None:
    r = subprocess.run([_docker(), "image", "inspect", image], capture_output=True, text=True, check=True)
    config = json.loads(r.stdout)[0]["Config"]
    assert config["User"] == "1000:1000" and config["WorkingDir"] == "/home/kolors"
    assert config["Entrypoint"] == ["tini", "--", "python", "/app/entrypoint.py"]


def test_help_is_prose(image: str) -> None:
    r = _run(_docker(), image, "--help")
    assert r.returncode == 0, r.stderr
    assert "usage: kolors-job" in r.stdout and "``" not in r.stdout and ":mod:" not in r.stdout
    print(r.stdout)


def test_demo_runs_in_a_read_only_container(image: str) -> None:
    """``docker run IMAGE demo``: the tiny job on CPU, its outputs in the user's home (a tmpfs here)."""
    script = "python /app/entrypoint.py demo && test -s demo-output/demo/report.json && ls demo-output/demo"
    r = _run(_docker(), image, "-c", script, extra=["--entrypoint", "sh"])
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    assert "images" in r.stdout and "report.html" in r.stdout
    assert "demo finished" in r.stderr
    print(r.stderr[-1500:])


def test_tiny_run_against_loopback_s3(image: str, s3_server, tmp_path: Path) -> None:
    """``run`` as in a pod: the manifest and dataset mounted read-only, the output an S3 bucket on
    127.0.0.1 (host network), credentials from the environment, JSON logs."""
    data = build_demo_dataset(tmp_path / "ds", n=4)
    bucket = s3_server.create_bucket()
    doc = tiny_job(Path("/data"), f"s3://{bucket}/runs/", {
        "dataset.caption": {"fixed": None}, "train.steps": 2, "train.batch_size": 1,
        "train.checkpoint_every": 2, "story.steps": 2,
    }, name="in-image")
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    env = {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}
    extra = [
        "--network", "host",
        "-v", f"{data}:/data:ro", "-v", f"{manifest}:/job/manifest.yaml:ro",
        "-e", "KOLORS_JOB_MANIFEST_URI=/job/manifest.yaml",
        "-e", f"KOLORS_JOB_S3_ENDPOINT_URL={s3_server.endpoint_url}",
        "-e", f"KOLORS_JOB_S3_REGION={s3_server.region}",
        "-e", "KOLORS_JOB_S3_ADDRESSING_STYLE=path",
        "-e", "KOLORS_JOB_WORK_DIR=/tmp/kolors-job-work",
        "-e", "KOLORS_JOB_LOG_FORMAT=json",
        "-e", "AWS_ACCESS_KEY_ID", "-e", "AWS_SECRET_ACCESS_KEY",  # values from env, not the command line
    ]
    r = _run(_docker(), image, "run", extra=extra, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    assert s3_server.secret_key not in r.stdout + r.stderr
    client = s3_server.client()
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="runs/in-image/").get("Contents", [])}
    assert {"runs/in-image/_SUCCESS", "runs/in-image/report.json", "runs/in-image/images/08.png"} <= keys, keys
    status = json.loads(client.get_object(Bucket=bucket, Key="runs/in-image/status.json")["Body"].read())
    assert status["state"] == "succeeded"
    print(r.stderr.strip().splitlines()[-1])
