"""Secrets never leave the process: not in any object the job writes, not in its log, not in errors.

Known secret values go into every place credentials live (AWS key/secret/session token used by the
moto endpoint, OSS secret, a ModelScope token, a password inside the endpoint URL). The whole tiny
job runs as a subprocess (``python -m kolors_job run``, JSON logs at DEBUG) writing to s3:// — the session's
shared run (``tiny_s3_job``, tests/scenarios.py, where the secrets are defined); then
every object in the bucket and every byte of stdout+stderr is searched for each secret. Failing
jobs (missing bucket, unreachable endpoint, wrong OSS key) must redact their error lines too.
"""

from __future__ import annotations

import base64
import gc
import json
import logging
import os
import re
import socket
from pathlib import Path
from urllib.parse import quote

import pytest

from kolors_job.demo import build_demo_dataset, tiny_job
from tests.scenarios import ENDPOINT_PASSWORD, SECRETS, URL_PROMPT, TinyS3Job
from tests.scenarios import secret_env as _secret_env
from tests.scenarios import with_password as _with_password

ROOT = Path(__file__).resolve().parents[1]

def variants(secret: str) -> list[bytes]:
    """The secret as it could appear: raw, URL-quoted (once and twice), base64, JSON-escaped."""
    raw = secret.encode()
    once = quote(secret, safe="")
    return [raw, once.encode(), quote(once, safe="").encode(), base64.b64encode(raw), json.dumps(secret)[1:-1].encode()]


def assert_clean(blob: bytes, where: str, secrets: list[str]) -> None:
    for secret in secrets:
        for form in variants(secret):
            assert form not in blob, f"secret {secret[:6]}… found in {where}"


def _manifest(cache_dir: Path, output: str, name: str) -> str:
    data = build_demo_dataset(cache_dir / "demo-dataset")
    return json.dumps(tiny_job(data, output, {
        "train.steps": 4, "train.batch_size": 1, "train.checkpoint_every": 2, "story.steps": 2,
        "story.batch_size": 8, "score.gate": False, "output.lora_formats": ["diffusers"],
        "story.negative_prompt": URL_PROMPT,
    }, name=name), ensure_ascii=False)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ALL_SECRETS = [*SECRETS.values(), ENDPOINT_PASSWORD]


def test_whole_job_leaks_no_secret_into_outputs_or_log(tiny_s3_job: TinyS3Job) -> None:
    """The shared tiny job (``tiny_s3_job``, tests/scenarios.py) ran as ``python -m kolors_job run`` with these
    secrets as its credentials and a password in its endpoint URL, JSON logs at DEBUG: every object it wrote and
    every byte it printed is searched."""
    job = tiny_s3_job
    log = job.log
    assert job.secrets and job.returncode == 0, log.decode(errors="replace")[-3000:]
    assert f'"msg": "job {job.name} succeeded'.encode() in log  # the JSON log really was captured

    objects = job.bucket_objects  # every object of the bucket, as the run left it
    keys = list(objects)
    assert f"runs/{job.name}/_SUCCESS" in keys and f"runs/{job.name}/report.json" in keys
    assert any(k.endswith(".safetensors") for k in keys) and any(k.startswith(f"runs/{job.name}/images/") for k in keys)
    for key in keys:
        assert_clean(key.encode(), f"the object key {key}", ALL_SECRETS)
        assert_clean(objects[key], key, ALL_SECRETS)
    assert_clean(log, "the job's stdout/stderr", ALL_SECRETS)
    # what is not a secret is not touched: the URL in the negative prompt, as given, in every file that names it
    body = {k: v.decode("utf-8", "replace") for k, v in objects.items()}
    assert json.loads(body[f"runs/{job.name}/prompts.json"])["negative_prompt"] == URL_PROMPT
    assert URL_PROMPT in body[f"runs/{job.name}/manifest.resolved.yaml"]
    assert URL_PROMPT in body[f"runs/{job.name}/submission/prompts.txt"]
    # the local work dir is not an output, but it is on the cache volume: no secrets there either
    for path in job.work_dir.rglob("*"):
        if path.is_file() and path.stat().st_size < 50 * 2**20:
            assert_clean(path.read_bytes(), str(path), ALL_SECRETS)


@pytest.fixture
def cli(shared_cache, tmp_path, monkeypatch, capfd):
    """Run ``kolors_job.cli.main`` in-process (no torch import per run) with the secret env."""
    from kolors_job.cli import main

    def run(endpoint: str, output: str, extra_env: dict[str, str] | None = None) -> tuple[int, bytes]:
        for k in list(os.environ):
            if k.startswith(("AWS_", "OSS_", "ALIBABA_CLOUD_", "KOLORS_JOB_")):
                monkeypatch.delenv(k)
        for k, v in {**_secret_env(shared_cache, tmp_path, endpoint), **(extra_env or {})}.items():
            monkeypatch.setenv(k, v)
        manifest = tmp_path / "job.json"
        manifest.write_text(_manifest(shared_cache, output, "failing-job"))
        capfd.readouterr()
        frozen = gc.get_freeze_count()
        code = main(["run", "--manifest", str(manifest)])
        # no freeze of the caller's heap (it would add every live object); frozen objects may still die meanwhile
        assert gc.get_freeze_count() <= frozen, "an in-process run leaves its caller's heap unfrozen"
        out, err = capfd.readouterr()
        return code, (out + err).encode()

    yield run
    root = logging.getLogger()
    for h in list(root.handlers):  # setup_logging bound a handler to the captured stderr
        if getattr(h, "_kolors_job", False):
            root.removeHandler(h)


def test_denied_job_error_is_redacted(cli, s3_server):
    code, out = cli(_with_password(s3_server.endpoint_url), "s3://kolors-no-such-bucket-leaktest/jobs/")
    assert code == 5, out.decode(errors="replace")
    assert b"NoSuchBucket" in out and b"error: " in out
    assert_clean(out, "the failed job's output", ALL_SECRETS)


def test_unreachable_endpoint_error_is_redacted(cli):
    endpoint = f"http://kjuser:{ENDPOINT_PASSWORD}@127.0.0.1:{_closed_port()}"
    code, out = cli(endpoint, "s3://kolors-unreachable/jobs/")
    assert code == 75, out.decode(errors="replace")
    text = out.decode(errors="replace")
    # botocore's message names the endpoint URL: it must be there, without its password
    assert re.search(r"http://\*\*\*@127\.0\.0\.1:\d+", text), text[-2000:]
    assert_clean(out, "the failed job's output", ALL_SECRETS)


def test_oss_wrong_key_error_is_redacted(cli, oss_server):
    # the OSS proxy, like OSS, echoes AccessKeyId + StringToSign in its 403 body
    bucket = oss_server.create_bucket()
    code, out = cli(
        "http://127.0.0.1:9",
        f"oss://{bucket}/jobs/",
        {"KOLORS_JOB_OSS_ENDPOINT": oss_server.endpoint, "KOLORS_JOB_OSS_REGION": oss_server.region,
         "OSS_ACCESS_KEY_ID": oss_server.access_key},
    )
    assert code == 5, out.decode(errors="replace")
    assert b"SignatureDoesNotMatch" in out
    assert_clean(out, "the failed job's output", [*ALL_SECRETS, oss_server.access_key])
    assert b"StringToSign" not in out


def test_container_runs_as_non_root():
    dockerfile = ROOT / "Dockerfile"
    if not dockerfile.is_file():
        pytest.skip("no Dockerfile")
    users = [line.split(None, 1)[1].strip() for line in dockerfile.read_text().splitlines()
             if line.strip().upper().startswith("USER ")]
    assert users, "no USER line: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users
    for name, value in SECRETS.items():  # and no credential baked into the image
        assert value not in dockerfile.read_text() and f"{name}=" not in dockerfile.read_text()


def test_aliyun_cli_env_names_are_credentials_and_are_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ALIBABACLOUD_*`` keys (the aliyun CLI's names) sign OSS requests like ``ALIBABA_CLOUD_*`` and are
    masked wherever they would be printed."""
    from kolors_job.core.redact import scrub
    from kolors_job.storage.oss import credentials as oss_credentials

    for var in [v for v in os.environ if v.startswith(("OSS_ACCESS", "ALIBABA_CLOUD_", "ALIBABACLOUD_"))]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("ALIBABACLOUD_ACCESS_KEY_ID", "LTAIkolorsCliKey01")
    monkeypatch.setenv("ALIBABACLOUD_ACCESS_KEY_SECRET", "kolors-cli-secret-Rk2Vb")
    monkeypatch.setenv("ALIBABACLOUD_SECURITY_TOKEN", "kolors-cli-token-Pz4Qw")
    creds = oss_credentials.credentials_provider().get_credentials()
    assert (creds.access_key_id, creds.access_key_secret, creds.security_token) == (
        "LTAIkolorsCliKey01", "kolors-cli-secret-Rk2Vb", "kolors-cli-token-Pz4Qw")
    line = scrub("denied for LTAIkolorsCliKey01 with kolors-cli-secret-Rk2Vb / kolors-cli-token-Pz4Qw")
    assert line == "denied for *** with *** / ***"


# -- signed URLs and tokens: refused where they have no use, masked wherever text leaves the process --------
CANARY = "CANARYsig7Qp2Zx9"


@pytest.mark.parametrize("args", [
    ["validate", f"s3://outb/m.yaml?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature={CANARY}"],
    ["run", "--manifest", f"oss://outb/jobs/m.yaml?OSSAccessKeyId=LTAIx&Signature={CANARY}"],
    ["run", "--manifest", "{manifest}", "--output", f"s3://outb/out/?token={CANARY}"],
    ["validate", "{prompt_manifest}"],
    ["run", "--manifest", "{prompt_manifest}"],
], ids=["validate-signed-manifest-uri", "run-signed-manifest-uri", "run-output-with-token", "validate-prompt-url",
        "run-prompt-url"])
def test_a_signed_url_is_refused_in_one_line_and_its_canary_is_nowhere(args, cli_env, tmp_path, capfd):
    """Issue #31 (3d): with the storage endpoint down, a manifest URI or an output with a signed query, and a
    prompt holding a URL with a password or signature, are refused at once (exit 2) in one line naming the field,
    and the canary is in no form in the output (raw, percent-encoded once or twice, base64, JSON) — nor in any
    file written (nothing is)."""
    from kolors_job.cli import main

    base = json.loads(_manifest(cli_env, str(tmp_path / "out"), "canary-job"))
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps(base))
    with_prompt = json.loads(json.dumps(base))
    with_prompt["spec"]["story"]["frames"] = [
        {"prompt": f"frame {i}: https://kj:{CANARY}@cdn.example/x.png?X-Amz-Signature={CANARY}", "seed": i}
        for i in range(8)]
    prompt_manifest = tmp_path / "p.json"
    prompt_manifest.write_text(json.dumps(with_prompt))
    argv = [a.format(manifest=manifest, prompt_manifest=prompt_manifest) for a in args]
    capfd.readouterr()
    code = main(argv)
    out, err = capfd.readouterr()
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) in (1, 8) and "Traceback" not in err, err  # 8 frames: one line per field
    assert all("query" in line or "credential" in line for line in lines), lines
    assert_clean((out + err).encode(), "the refusal", [CANARY])
    assert not (tmp_path / "out").exists()


@pytest.fixture
def cli_env(shared_cache, tmp_path, monkeypatch):
    """The env of a job whose S3 and OSS endpoints are down (a closed port): any request would fail loudly."""
    port = _closed_port()
    for k in list(os.environ):
        if k.startswith(("AWS_", "OSS_", "KOLORS_JOB_")):
            monkeypatch.delenv(k)
    for k, v in {**_secret_env(shared_cache, tmp_path, f"http://127.0.0.1:{port}"),
                 "KOLORS_JOB_OSS_ENDPOINT": f"http://127.0.0.1:{port}", "KOLORS_JOB_OSS_REGION": "cn-hangzhou",
                 "KOLORS_JOB_STORAGE_DEADLINE_S": "5"}.items():
        monkeypatch.setenv(k, v)
    yield shared_cache
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_kolors_job", False):
            root.removeHandler(h)


@pytest.mark.parametrize(("line", "masked"), [
    ("PUT s3://outb/m.yaml%3FX-Amz-Signature%3D{c}%26X-Amz-Date%3D2026: AccessDenied",
     "PUT s3://outb/m.yaml%3FX-Amz-Signature%3D***%26X-Amz-Date%3D2026: AccessDenied"),
    ("GET http://127.0.0.1:9/outb/m.yaml%253FX-Amz-Credential%253D{c}%2526a%253Db failed",
     "GET http://127.0.0.1:9/outb/m.yaml%253FX-Amz-Credential%253D***%2526a%253Db failed"),
    ("https://b.oss-cn-hangzhou.aliyuncs.com/k?OSSAccessKeyId=LTAI5t&Expires=1&Signature={c}",
     "https://b.oss-cn-hangzhou.aliyuncs.com/k?OSSAccessKeyId=***&Expires=1&Signature=***"),
    ("redirected to HTTPS://kj:{c}@mirror.example/repo?token={c}&sale",
     "redirected to HTTPS://***@mirror.example/repo?token=***&sale"),
    ('botocore: {{"url": "https://x/y?x-amz-security-token={c}&X-Amz-Expires=3600"}}',
     'botocore: {{"url": "https://x/y?x-amz-security-token=***&X-Amz-Expires=3600"}}'),
])
def test_signed_url_parameters_are_masked_in_every_form(line: str, masked: str) -> None:
    """What an SDK's error text carries (a key with its signed query percent-encoded into the path, once or twice)
    is masked by the one scrub every sink goes through; every other byte of the line is kept."""
    from kolors_job.core.redact import scrub

    assert scrub(line.format(c=CANARY)) == masked.format()
