"""Whole-job scenarios run once per test session and shared by every file that asserts on them.

A tiny job costs a test session seconds of CPU (a subprocess most of it in its imports): the scenarios below run
once and every test that only needs to look at such a run reads the same one. A test whose subject is a run of its
own (another manifest, a fault schedule, a kill, a race) keeps it.

- ``tiny_s3_job``: one successful tiny job, ``python -m kolors_job run`` writing to moto's S3 through a recording
  proxy, with known secrets in every place credentials live (test_job, test_faults, test_secrets, test_claim,
  test_ddp);
- ``finished_tiny_job``: that job's output prefix on a local disk (test_sample).

Registered in tests/conftest.py.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kolors_job.demo import build_demo_dataset, tiny_job

try:
    from tests.cli_lines import json_records
    from tests.storage_servers.fault_proxy import FaultProxy
    from tests.storage_servers.fixtures import S3Server
except ModuleNotFoundError:  # tests/ is not a package and the repo root is not on sys.path
    from cli_lines import json_records
    from storage_servers.fault_proxy import FaultProxy
    from storage_servers.fixtures import S3Server

ROOT = Path(__file__).resolve().parents[1]

# -- the secrets the shared run holds (tests/test_secrets.py searches every output and log line for them) --
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAKOLORSLEAKTEST01",
    "AWS_SECRET_ACCESS_KEY": "kolors-s3-secret-Zq81xVb7Rt",
    "AWS_SESSION_TOKEN": "kolors-session-token-Hw3Pp0Jd",
    "OSS_ACCESS_KEY_SECRET": "kolors-oss-secret-Ty6Qa2Lm",
    "MODELSCOPE_API_TOKEN": "ms-kolors-token-Kp9Lm4Vx",
}
ENDPOINT_PASSWORD = "kolors-endpoint-pw-Ud7Rq"
URL_PROMPT = "二次元, a poster reading HTTPS://Shop.Example/?sale&page=2#top"
"""Not a credential: it must reach prompts.json and the submission byte for byte."""

TINY_JOB = "tiny-job"
TINY_OVERRIDES: dict[str, Any] = {
    "dataset.caption": {"fixed": None},
    # 4 steps, a checkpoint every 2: test_job counts 4 losses; test_claim pauses a run at step 3, its step-2
    # checkpoint uploaded
    "train.steps": 4, "train.checkpoint_every": 2,
    # batch 2: the one-process run test_ddp compares 2 ranks of batch 1 with
    "train.batch_size": 2,
    # lr 1e-2: the LoRA visibly moves pixels (test_sample's scales); Kaiming-uniform A: test_ddp's tolerance
    # (tests/test_ddp.py's docstring); seed 3: test_ddp's run
    "train.learning_rate": 1e-2, "train.init_lora_weights": "default", "train.seed": 3,
    "story.steps": 3,
    "story.negative_prompt": URL_PROMPT,
}  # fmt: skip
"""The shared tiny job: the demo's shape (story batch of 8, fp32 on the CPU, the nominal gate) with fewer steps."""


def secret_env(cache_dir: Path, tmp_path: Path, endpoint: str) -> dict[str, str]:
    """A job's environment with ``SECRETS`` as its credentials (and nothing of this machine's), JSON logs at DEBUG."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "OSS_", "ALIBABA_CLOUD_", "KOLORS_JOB_"))}
    env.update(SECRETS)
    env.update(
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-aws-credentials"),
        OSS_ACCESS_KEY_ID="LTAIkolorsLeakTestId",
        KOLORS_JOB_CACHE_DIR=str(cache_dir),
        KOLORS_JOB_WORK_DIR=str(tmp_path / "work"),
        KOLORS_JOB_LOG_FORMAT="json",
        KOLORS_JOB_LOG_LEVEL="DEBUG",
        KOLORS_JOB_S3_ENDPOINT_URL=endpoint,
        KOLORS_JOB_S3_ADDRESSING_STYLE="path",
        KOLORS_JOB_S3_REGION="us-east-1",
        KOLORS_JOB_STORAGE_MAX_ATTEMPTS="2",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def with_password(endpoint_url: str) -> str:
    scheme, rest = endpoint_url.split("://", 1)
    return f"{scheme}://kjuser:{ENDPOINT_PASSWORD}@{rest}"


@dataclass
class TinyS3Job:
    """One finished run of the shared tiny job, as the tests read it."""

    server: S3Server
    bucket: str
    output: str
    """``s3://<bucket>/runs/``: the manifest's ``output.uri``."""
    doc: dict[str, Any]
    """The manifest, as written to the file the run was given."""
    data: Path
    work_dir: Path
    returncode: int
    log: bytes
    """The process's stdout and stderr."""
    bucket_objects: dict[str, bytes]
    """Every object of the bucket right after the run (the run is its only writer), by key."""
    requests: int = 0
    """Requests the run made through the recording proxy (moto only)."""
    seconds: float = 0.0
    """The job's own time, from its log: its first record to ``job … succeeded`` (the interpreter's start-up out)."""
    secrets: bool = False
    objects: dict[str, bytes] = field(init=False)
    """The job's prefix (``runs/tiny-job/``), keys relative to it."""

    def __post_init__(self) -> None:
        prefix = f"runs/{TINY_JOB}/"
        self.objects = {k[len(prefix):]: v for k, v in self.bucket_objects.items() if k.startswith(prefix)}

    @property
    def name(self) -> str:
        return str(self.doc["metadata"]["name"])

    def manifest_doc(self, output: str | None = None, *, name: str | None = None,
                     overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """The shared manifest, another output or job id, ``overrides`` as dotted paths into ``spec``."""
        doc = copy.deepcopy(self.doc)
        if output is not None:
            doc["spec"]["output"]["uri"] = output
        if name is not None:
            doc["metadata"]["name"] = name
        for dotted, value in (overrides or {}).items():
            node = doc["spec"]
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return doc

    def records(self) -> list[dict[str, Any]]:
        return json_records(self.log.decode(errors="replace").splitlines())


def _seconds(records: list[dict[str, Any]], name: str) -> float:
    def at(record: dict[str, Any]) -> float:
        return datetime.datetime.fromisoformat(record["ts"].replace("Z", "+00:00")).timestamp()

    started = next((r for r in records if str(r.get("msg", "")).startswith(f"job {name} → ")), None)
    ended = next((r for r in records if str(r.get("msg", "")).startswith(f"job {name} succeeded")), None)
    return at(ended) - at(started) if started and ended else 0.0


def run_tiny_s3_job(server: S3Server, cache_dir: Path, tmp: Path) -> TinyS3Job:
    """``python -m kolors_job run`` of the shared tiny job into a fresh bucket of ``server``. On moto it goes
    through a recording proxy (no faults) with ``SECRETS`` as its credentials and a password in the endpoint URL;
    a real server (radosgw) checks signatures, so there it runs with the server's own keys, straight."""
    from kolors_job.core.settings import Settings
    from kolors_job.sources import resolve_model

    # the tiny models built here, once, as every test that starts jobs does: a run that builds them itself draws
    # from Python's global RNG, which its checkpoints record (random_states_0.pkl) — test_claim compares those bytes
    for uri, kind in (("tiny://kolors", "pipeline"), ("tiny://aesthetic", "aesthetic")):
        resolve_model(uri, kind=kind, settings=Settings(cache_dir=cache_dir))
    data = build_demo_dataset(tmp / "data", n=6)
    bucket = server.create_bucket()
    output = f"s3://{bucket}/runs/"
    doc = tiny_job(data, output, TINY_OVERRIDES, name=TINY_JOB)
    manifest = tmp / "job.json"
    manifest.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    secrets = server.name == "moto"
    proxy = FaultProxy(server.endpoint_url, flavour="s3").start() if secrets else None
    try:
        if proxy is not None:
            env = secret_env(cache_dir, tmp, with_password(proxy.endpoint))
        else:
            env = secret_env(cache_dir, tmp, server.endpoint_url)
            for name in SECRETS:
                env.pop(name)
            env.update(AWS_ACCESS_KEY_ID=server.access_key, AWS_SECRET_ACCESS_KEY=server.secret_key,
                       KOLORS_JOB_S3_REGION=server.region)  # fmt: skip
        proc = subprocess.run([sys.executable, "-m", "kolors_job", "run", "--manifest", str(manifest)],
                              cwd=ROOT, env=env, capture_output=True, timeout=900)  # fmt: skip
    finally:
        if proxy is not None:
            proxy.stop()
    raw = server.client()
    keys = [o["Key"] for p in raw.get_paginator("list_objects_v2").paginate(Bucket=bucket) for o in p.get("Contents", ())]
    job = TinyS3Job(
        server=server, bucket=bucket, output=output, doc=doc, data=data, work_dir=tmp / "work",
        returncode=proc.returncode, log=proc.stdout + proc.stderr,
        bucket_objects={k: raw.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys},
        requests=len(proxy.requests) if proxy is not None else 0, secrets=secrets,
    )  # fmt: skip
    job.seconds = _seconds(job.records(), TINY_JOB)
    return job


@pytest.fixture(scope="session")
def tiny_s3_jobs(shared_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[S3Server], TinyS3Job]:
    """The shared tiny job on an S3 server, run once per server and session (moto: ``tiny_s3_job``; radosgw,
    where the suite has it: test_job's contract test)."""
    runs: dict[str, TinyS3Job] = {}

    def on(server: S3Server) -> TinyS3Job:
        if server.name not in runs:
            runs[server.name] = run_tiny_s3_job(server, shared_cache, tmp_path_factory.mktemp(f"tiny-{server.name}"))
        return runs[server.name]

    return on


@pytest.fixture(scope="session")
def tiny_s3_job(tiny_s3_jobs: Callable[[S3Server], TinyS3Job], s3_server: S3Server) -> TinyS3Job:
    """Scenario "a successful tiny job on S3", run once per session: ``python -m kolors_job run`` into moto
    through a recording proxy, with secrets as its credentials (``run_tiny_s3_job``). Read by
    test_job (the output contract, then a rerun and another manifest on its prefix), test_faults (the clean run
    the faulted ones must equal), test_secrets (no secret in any object or log line), test_claim (what a prefix
    holds after one uninterrupted run) and test_ddp (the one-process run 2 ranks must match)."""
    job = tiny_s3_jobs(s3_server)
    assert job.returncode == 0, job.log.decode(errors="replace")[-3000:]
    return job


@pytest.fixture(scope="session")
def finished_tiny_job(tiny_s3_job: TinyS3Job, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Scenario "a finished tiny job on a local disk": the shared tiny job's prefix (``tiny_s3_job``), byte for
    byte, at ``<tmp>/out/tiny-job/`` — the output contract as ``kolors-job sample`` reads it. Used by
    test_sample."""
    job_dir = tmp_path_factory.mktemp("finished-tiny-job") / "out" / TINY_JOB
    for key, data in tiny_s3_job.objects.items():
        (job_dir / key).parent.mkdir(parents=True, exist_ok=True)
        (job_dir / key).write_bytes(data)
    return job_dir


__all__ = ["finished_tiny_job", "tiny_s3_job", "tiny_s3_jobs"]
