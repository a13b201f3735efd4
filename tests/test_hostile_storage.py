"""Hostile URIs, names and keys, and local storage faults: each gives its documented exit code and one
line (no traceback, no secret), or is skipped and counted in the report; and what the output looks
like to other users (file modes) and to listings (no empty folders).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from kolors_job.cli import main
from kolors_job.core.errors import ExitCode, StorageDeniedError, StorageTemporaryError
from kolors_job.core.redact import scrub
from kolors_job.data.images import load_image
from kolors_job.data.scan import SkipReason, scan_dataset
from kolors_job.manifest.dataset import DatasetSpec, FilterSpec
from kolors_job.sources import fetch_dataset
from kolors_job.storage import open_store
from kolors_job.storage.local import LocalStore, os_error
from tests.cli_lines import last_message

PASSWORD = "hunter2-Kolors-Pw"


def _png(size: tuple[int, int] = (96, 96)) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


# -- URIs: refused by validate, exit 2, field path, nothing echoed ------------------------------
BAD_URIS = {
    "s3-userinfo": ("output.uri", f"s3://AKIDUSER:{PASSWORD}@bucket/p/", "must not carry credentials"),
    "oss-userinfo": ("dataset.source", f"oss://user:{PASSWORD}@bucket/d/", "must not carry credentials"),
    "s3-bad-bucket": ("output.uri", "s3://Bad_Bucket/p/", "S3 bucket names are 3-63"),
    "s3-ip-bucket": ("output.uri", "s3://192.168.0.1/p/", "S3 bucket names are 3-63"),
    "oss-dotted-bucket": ("output.uri", "oss://my.bucket/p/", "OSS bucket names are 3-63"),
    "oss-short-bucket": ("model.base", "oss://ab/m/", "OSS bucket names are 3-63"),
    "oss-dotdot": ("output.uri", "oss://bucket/../../etc", "must not contain '.' or '..' path segments"),
    "s3-dot": ("dataset.source", "s3://bucket/a/./b/", "must not contain '.' or '..' path segments"),
}


@pytest.mark.parametrize("case", list(BAD_URIS), ids=list(BAD_URIS))
def test_validate_refuses_hostile_bucket_uris(case, tmp_path, capsys) -> None:
    field, uri, message = BAD_URIS[case]
    section, leaf = field.split(".")
    spec = {"output": {"uri": "/tmp/kolors-ok"}, section: {leaf: uri}} if section != "output" else {
        "output": {"uri": uri}}
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"spec": spec}))
    assert main(["validate", str(manifest)]) == ExitCode.INVALID_MANIFEST == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"spec.{field}: {err.split(': ', 1)[1].strip()}"]
    assert err.startswith(f"spec.{field}: ") and message in err, err
    assert PASSWORD not in err and "AKIDUSER" not in err and "Traceback" not in err


def test_run_output_override_is_validated_like_the_manifest(tmp_path, capsys) -> None:
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"spec": {"output": {"uri": str(tmp_path / "out")}}}))
    code = main(["run", "--manifest", str(manifest), "--output", f"s3://u:{PASSWORD}@Bad_Bucket/x/"])
    err = capsys.readouterr().err
    assert code == 2 and last_message(err).startswith("--output: ") and "credentials" in err and PASSWORD not in err, err


@pytest.mark.parametrize("uri", [f"s3://AKIDUSER:{PASSWORD}@bucket/m.yaml", "oss://Bad_Bucket/m.yaml",
                                 "s3://bucket/../m.yaml"])
def test_manifest_uri_from_the_environment_is_checked_too(uri, monkeypatch, capsys) -> None:
    monkeypatch.setenv("KOLORS_JOB_MANIFEST_URI", uri)
    monkeypatch.delenv("KOLORS_JOB_MANIFEST", raising=False)
    assert main(["validate"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and PASSWORD not in err and "Traceback" not in err, err


def test_a_missing_manifest_is_exit_2_locally_and_remotely(s3_server, storage_env, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KOLORS_JOB_S3_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("KOLORS_JOB_S3_ADDRESSING_STYLE", "path")
    bucket = s3_server.create_bucket()
    for where in (str(tmp_path / "missing.yaml"), f"s3://{bucket}/missing.yaml"):
        assert main(["validate", where]) == ExitCode.INVALID_MANIFEST == 2, where
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "cannot read manifest" in err, err


def test_an_oversized_remote_manifest_is_refused_from_its_size_unread(s3_server, storage_env, capsys, monkeypatch):
    try:
        from tests.storage_servers.fault_proxy import FaultProxy
    except ModuleNotFoundError:
        from storage_servers.fault_proxy import FaultProxy

    bucket = s3_server.create_bucket()
    s3_server.client().put_object(Bucket=bucket, Key="big.yaml", Body=b"#" * (3 << 20))
    with FaultProxy(s3_server.endpoint_url, flavour="s3") as proxy:  # no faults: it records the requests
        monkeypatch.setenv("KOLORS_JOB_S3_ENDPOINT_URL", proxy.endpoint)
        monkeypatch.setenv("KOLORS_JOB_S3_ADDRESSING_STYLE", "path")
        assert main(["validate", f"s3://{bucket}/big.yaml"]) == 2
        assert [m for m, t in proxy.requests if "big.yaml" in t] == ["HEAD"]  # never a GET of the 3 MB
    assert "larger than the 1048576-byte limit" in capsys.readouterr().err


# -- names and keys: skipped and counted, never exit 1 ------------------------------------------
def test_names_that_are_not_utf8_are_judged_by_content_and_shown_escaped(tmp_path) -> None:
    """Issue #31's 73rd case: Latin-1 file names (an old archive). Names are bytes on Linux: a valid image is
    kept (opened by its bytes, its caption sidecar found), a zero-byte one is ``zero_byte``, a corrupt one
    ``corrupt``, a sidecar is never counted as an image; the report shows the names escaped, as valid JSON."""
    root = tmp_path / "data"
    root.mkdir()
    base = os.fsencode(root) + b"/"
    files = {
        b"ok.png": _png(), b"ok.txt": b"plain caption",
        b"caf\xe9-latin1.png": _png(), b"caf\xe9-latin1.txt": "caf\u00e9 au lait".encode(),  # kept + its caption
        b"zero_\xe9.png": b"",  # judged by content: empty
        b"broken_\xe9\xe8.png": _png()[:60], b"broken_\xe9\xe8.txt": b"cap",  # judged by content: truncated
        b"bad_\xff\xfe.txt": b"a sidecar with a binary name",  # not an image: never counted
    }
    for name, data in files.items():
        with open(base + name, "wb") as f:
            f.write(data)
    spec = DatasetSpec(source=str(root), caption={"fixed": None}, filters=FilterSpec(min_width=64, min_height=64))
    scan = scan_dataset(root, spec, workers=2)
    kept = {os.fsencode(i.path.name): i for i in scan.items}
    assert sorted(kept) == [b"caf\xe9-latin1.png", b"ok.png"], scan.skipped
    assert kept[b"caf\xe9-latin1.png"].caption == "café au lait"
    assert scan.skipped == {SkipReason.ZERO_BYTE: ["zero_\\xe9.png"], SkipReason.CORRUPT: ["broken_\\xe9\\xe8.png"]}
    assert scan.examined == 4  # the sidecars, the odd-named one included, are no images
    json.dumps(scan.report(str(root)).to_dict(), ensure_ascii=False).encode()  # what put_json does
    tensor, _ = load_image(kept[b"caf\xe9-latin1.png"], 64, True, False)  # and training opens it
    assert tuple(tensor.shape) == (3, 64, 64)


def test_odd_bucket_keys_are_skipped_and_counted(s3_server, storage_env, tmp_path) -> None:
    bucket = s3_server.create_bucket()
    raw = s3_server.client()
    long_name = "x" * 300 + ".png"  # a legal S3 key, but no local filesystem takes a 304-byte name
    for key in ("ok.png", "x.png", "x.png/y.png", f"deep/{long_name}", "a//b.png"):
        raw.put_object(Bucket=bucket, Key=f"d/{key}", Body=_png())
    spec = DatasetSpec(source=f"s3://{bucket}/d/", caption={"fixed": "x"},
                       filters=FilterSpec(min_width=64, min_height=64))
    settings = storage_env.model_copy(update={"cache_dir": tmp_path / "cache"})
    root = fetch_dataset(spec, settings)
    scan = scan_dataset(root, spec, workers=1)
    assert sorted(i.path.relative_to(root).as_posix() for i in scan.items) == ["ok.png", "x.png/y.png"]
    assert scan.skipped == {
        SkipReason.KEY_CONFLICT: ["x.png"],
        SkipReason.NAME_TOO_LONG: [f"deep/{long_name}"],
        SkipReason.UNSAFE_KEY: ["a//b.png"],
    }, scan.skipped
    # the fetch is cached: a second job reads the same verdicts from the cached copy
    assert scan_dataset(fetch_dataset(spec, settings), spec, workers=1).skipped == scan.skipped


# -- local storage faults: 5 (unusable, denied) or 75 (may pass), one line ----------------------
def test_local_faults_map_to_5_or_75(tmp_path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    store = LocalStore(blocker / "out")  # the output path lies below a regular file
    with pytest.raises(StorageDeniedError) as err:
        store.write_bytes("k", b"v")
    assert err.value.exit_code == 5 and "\n" not in str(err.value)
    with pytest.raises(StorageDeniedError):
        store.write_bytes("k", b"v", if_absent=True)
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as raised:  # a real ENOSPC from the kernel
            os.write(fd, b"x")
    finally:
        os.close(fd)
    mapped = os_error(raised.value, "write file:///out/k")
    assert isinstance(mapped, StorageTemporaryError) and mapped.exit_code == 75


def _cli(args: list[str], env: dict[str, str], prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*(prefix or []), sys.executable, "-m", "kolors_job", *args], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def job_cli_env(shared_cache, tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOLORS_JOB_")}
    env.update(KOLORS_JOB_CACHE_DIR=str(shared_cache), KOLORS_JOB_WORK_DIR=str(tmp_path / "work"),
               KOLORS_JOB_LOG_FORMAT="json", OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    return env


def _manifest(shared_cache: Path, tmp_path: Path, output: str) -> Path:
    from kolors_job.demo import build_demo_dataset, tiny_job

    data = build_demo_dataset(shared_cache / "demo-dataset")
    path = tmp_path / "job.json"
    path.write_text(json.dumps(tiny_job(data, output, {
        "train.steps": 2, "train.checkpoint_every": 1, "story.steps": 1, "story.batch_size": 8,
        "score.gate": False, "output.lora_formats": ["diffusers"]}, name="faulty-disk")))
    return path


def test_output_below_a_regular_file_is_exit_5_in_one_line(job_cli_env, shared_cache, tmp_path) -> None:
    (tmp_path / "a-file").write_text("x")
    proc = _cli(["run", "--manifest", str(_manifest(shared_cache, tmp_path, str(tmp_path / "a-file" / "out")))],
                job_cli_env)
    assert proc.returncode == ExitCode.STORAGE_DENIED == 5, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and last_message(proc.stderr).startswith("error: write ")


def test_output_disk_full_is_exit_75_in_one_line(job_cli_env, shared_cache, tmp_path) -> None:
    """A 256 KiB tmpfs as the output (in a user namespace, so no root needed): the LoRA does not fit."""
    out = tmp_path / "small-disk"
    out.mkdir()
    if subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(out)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (no user namespaces)")
    manifest = _manifest(shared_cache, tmp_path, str(out))
    script = (f"mount -t tmpfs -o size=256k tmpfs {out} && exec {sys.executable} -m kolors_job run "
              f"--manifest {manifest}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=job_cli_env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == ExitCode.TEMPORARY == 75, proc.stderr[-2000:]
    last = last_message(proc.stderr)
    assert "Traceback" not in proc.stderr and last.startswith("error: ") and "No space left" in last, last


# -- what the output looks like -----------------------------------------------------------------
@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_output_files_follow_the_umask_and_pruned_folders_go(umask, mode, tmp_path, monkeypatch) -> None:
    import kolors_job.storage.atomic as atomic

    monkeypatch.setattr(atomic, "_UMASK", umask)  # the process's umask, as read at import
    store = open_store(str(tmp_path / "out"))
    src = tmp_path / "lora.safetensors"
    src.write_bytes(b"weights")
    src.chmod(0o600)  # safetensors and mkstemp write 0600
    store.upload_file("lora/lora.safetensors", src)
    store.write_bytes("report.json", b"{}")
    store.write_bytes("_claim/00000001.json", b"{}", if_absent=True)
    store.write_bytes("checkpoints/step-2/COMPLETE", b"")
    for key in ("lora/lora.safetensors", "report.json", "_claim/00000001.json"):
        assert stat.S_IMODE((tmp_path / "out" / key).stat().st_mode) == mode, key
    store.delete("checkpoints/step-2/COMPLETE")
    assert not (tmp_path / "out" / "checkpoints").exists()  # no empty checkpoints/step-N/ left behind
    assert (tmp_path / "out").is_dir()


def test_short_secret_values_mask_tokens_not_parts_of_words() -> None:
    env = {"AWS_ACCESS_KEY_ID": "hostile", "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}
    text = "work dir /tmp/pytest/test_hostile_inputs0/work; key=hostile; sk wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    assert scrub(text, env) == "work dir /tmp/pytest/test_hostile_inputs0/work; key=***; sk ***"


# -- scan memory --------------------------------------------------------------------------------
_SCAN_PEAK = """
import re, sys
from pathlib import Path
from kolors_job.data.scan import scan_dataset
from kolors_job.manifest.dataset import DatasetSpec, FilterSpec
root, budget = Path(sys.argv[1]), int(sys.argv[2])
spec = DatasetSpec(source=str(root), caption={"fixed": "x"},
                   filters=FilterSpec(min_width=64, min_height=64, max_pixels=3000 * 3000))
def status(field):  # kB
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS (ru_maxrss would include the parent's, at fork)
scan = scan_dataset(root, spec, workers=6, memory_budget=budget)
assert scan.kept == 6, scan.skipped
print((status("VmHWM") - before) * 1024)
"""


def test_scan_peak_memory_stays_under_the_budget(tmp_path) -> None:
    """Six RGBA images just under max_pixels, six threads: the decodes take turns within the budget."""
    root = tmp_path / "big"
    root.mkdir()
    for i in range(6):  # 2900² RGBA with alpha: the composite path, ~16 bytes a pixel while checked
        Image.new("RGBA", (2900, 2900), (i * 40, 20, 200, 128)).save(root / f"{i}.png", compress_level=1)
    per_image = 2900 * 2900 * 24  # SCAN_BYTES_PER_PIXEL: the budget one decode reserves

    def peak(budget: int) -> int:
        proc = subprocess.run([sys.executable, "-c", _SCAN_PEAK, str(root), str(budget)], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "PYTHONPATH": os.getcwd()})
        assert proc.returncode == 0, proc.stderr[-2000:]
        return int(proc.stdout.strip())

    # the budget of one decode: however many threads, one image's pixels at a time (+ slack for the pool)
    growth = peak(per_image)
    assert 2900 * 2900 * 4 < growth < per_image + (48 << 20), growth / 2**20  # saw the decode, stayed in budget
