"""Hostile inputs: each gives its intended error (or skip), never a crash, never a write outside the job's dirs.

Already covered elsewhere, not repeated here: tests/test_manifest.py (empty/invalid/non-UTF-8 YAML,
``!!python`` tags, ``[`` × 5000, alias bombs, the 50 MB file, a 3000-char field, unknown fields,
bad schemes, random bytes/structures via hypothesis), tests/test_dataset.py (a local dir holding a
truncated JPEG, 0-byte/text/EPS files, a 100k² PNG bomb, a FIFO, symlinks out of the root, a PNG
behind ``.dat``) and tests/test_storage.py (``download_dir`` with escaping keys on every backend).

Added here (ids in the parametrisations): manifest values that slip past a schema (types, NaN,
overflow, NUL in URIs, a job id with ``../``, deep nesting, floods), manifest *sources* that are
not files (a directory, a FIFO, /dev/zero), job ids from the CLI/env, a dataset served from a
bucket whose files are hostile (checked with the real ``fetch_dataset`` + ``scan_dataset``), and
object keys in a dataset or model prefix that try to leave the download directory.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from kolors_job.core.errors import ExitCode, JobError, ManifestError, StorageError
from kolors_job.core.settings import Settings
from kolors_job.data.scan import SkipReason, scan_dataset
from kolors_job.manifest.dataset import DatasetSpec, FilterSpec
from kolors_job.manifest.load import load_manifest, parse_manifest
from kolors_job.sources import fetch_dataset
from kolors_job.storage import split_uri

ROOT = Path(__file__).resolve().parents[1]
OK = "spec: {output: {uri: /tmp/kolors-hostile-out}}"


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and dir under ``root`` (size, mtime): to prove nothing was written outside."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            try:
                st = p.lstat()
            except OSError:
                continue
            out[p.relative_to(root).as_posix()] = (st.st_size if p.is_file() else -1, st.st_mtime_ns)
    return out


# -- manifests: values ---------------------------------------------------------------------------
MANIFEST_VALUES = {
    "uri-not-a-string": ("spec: {output: {uri: 123}}", "spec.output.uri: Input should be a valid string"),
    "train-is-a-list": ("spec: {output: {uri: /o}, train: [1, 2]}", "spec.train: Input should be a valid dictionary"),
    "steps-fractional": ("spec: {output: {uri: /o}, train: {steps: 12.5}}", "spec.train.steps: Input should be a valid integer"),
    "steps-overflow": ("spec: {output: {uri: /o}, train: {steps: 1000000000000000000000000000000}}",
                       "spec.train.steps: Input should be less than or equal"),
    "threshold-nan": ("spec: {output: {uri: /o}, score: {threshold: .nan}}", "spec.score.threshold:"),
    "threshold-inf": ("spec: {output: {uri: /o}, score: {threshold: .inf}}", "spec.score.threshold:"),
    "seed-overflow": ("spec: {output: {uri: /o}, train: {seed: 99999999999999999999999}}", "spec.train.seed:"),
    "nul-in-output-uri": ('spec: {output: {uri: "s3://bkt/a\\0b"}}', "spec.output.uri: must not contain NUL"),
    "nul-in-dataset-source": ('spec: {output: {uri: /o}, dataset: {source: "/d\\0x"}}', "spec.dataset.source: must not contain NUL"),
    "nul-in-model-uri": ('spec: {output: {uri: /o}, model: {base: "s3://b/m\\0x"}}', "spec.model.base: must not contain NUL"),
    "dotdot-job-id": ("spec: {output: {uri: /o, job_id: '../evil'}}", "spec.output.job_id: String should match pattern"),
    "dotdot-name": ("metadata: {name: '../../etc'}\n" + OK, "metadata.name: String should match pattern"),
    "rtl-override-name": ("metadata: {name: 'a\u202eb'}\n" + OK, "metadata.name: String should match pattern"),
    "deep-json-nesting": ('{"spec": ' * 3000 + "1" + "}" * 3000, "nested too deeply"),
    "deep-flow-mapping": ("a: " + "{b: " * 3000 + "1" + "}" * 3000, "nested too deeply"),
    "nul-byte-in-text": (OK + "\x00", "invalid YAML"),
    "frames-flood": ("spec: {output: {uri: /o}, story: {frames: [" + ",".join(["{prompt: a}"] * 10000) + "]}}",
                     "spec.story.frames: List should have at most 64"),
    "giant-prompts": ("spec: {output: {uri: /o}, story: {frames: [" + ",".join([f"{{prompt: {'a' * 100_000}}}"] * 8) + "]}}",
                      "spec.story.frames[0].prompt: String should have at most"),
    "labels-flood": ("metadata: {labels: {" + ",".join(f"k{i}: v" for i in range(5000)) + "}}\n" + OK,
                     "metadata.labels: Dictionary should have at most 64"),
    "unknown-keys-flood": (OK + "\n" + "".join(f"k{i}: 1\n" for i in range(5000)), "k0: unknown field"),
    "caption-limit-huge": ("spec: {output: {uri: /o}, dataset: {caption: {max_chars: 100000000000}}}",
                           "spec.dataset.caption.max_chars: Input should be less than or equal"),
    "image-size-huge": ("spec: {output: {uri: /o}, story: {width: 1048576, height: 1048576}}",
                        "spec.story.width: Input should be less than or equal to 4096"),
    "sampling-flood": ("spec: {output: {uri: /o}, story: {best_of: 100000}}", "spec.story.best_of:"),
}


@pytest.mark.parametrize(("text", "expected"), list(MANIFEST_VALUES.values()), ids=list(MANIFEST_VALUES))
def test_hostile_manifest_values(text: str, expected: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(ManifestError) as err:
        parse_manifest(text)
    assert time.monotonic() - t0 < 10
    assert err.value.exit_code == ExitCode.INVALID_MANIFEST
    assert any(p.startswith(expected) or expected in p for p in err.value.problems), err.value.problems[:5]
    assert all("\n" not in p and "Traceback" not in p for p in err.value.problems)


def test_duplicate_keys_are_refused() -> None:
    with pytest.raises(ManifestError, match="duplicate"):
        parse_manifest("spec: {output: {uri: /job-a}, output: {uri: /job-b}}")


# -- manifests: sources that are not regular files -----------------------------------------------
def test_manifest_path_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="cannot read manifest"):
        load_manifest(str(tmp_path))


def test_manifest_path_is_a_fifo_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "manifest.yaml"
    os.mkfifo(fifo)
    result: list[BaseException | object] = []

    def load() -> None:
        try:
            result.append(load_manifest(str(fifo)))
        except BaseException as e:
            result.append(e)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(1.5)
    hung = t.is_alive()
    if hung:  # unblock the reader: open the write end and close it (EOF)
        with open(fifo, "wb"):
            pass
        t.join(5)
    assert not hung, "load_manifest blocked on a FIFO"
    assert isinstance(result[0], ManifestError)


def test_manifest_from_an_endless_device_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "manifest.yaml"
    link.symlink_to("/dev/zero")
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30));"
        "from kolors_job.cli import main; sys.exit(main(['validate', sys.argv[1]]))"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(link)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == ExitCode.INVALID_MANIFEST, proc.stderr[-500:]
    assert "Traceback" not in proc.stderr


def test_output_file_uri_with_a_host(tmp_path: Path, capsys) -> None:
    from kolors_job.cli import main

    m = tmp_path / "m.yaml"
    m.write_text("spec: {output: {uri: 'file://evil.example/x'}}")
    assert main(["run", "--manifest", str(m)]) == ExitCode.INVALID_MANIFEST


# -- job ids from the command line / environment ---------------------------------------------------
@pytest.mark.parametrize(
    ("how", "job_id"),
    [("flag", "../evil"), ("flag", "a/../../evil"), ("flag", "."), ("env", "../../evil"), ("flag", "nul\x00id"),
     ("flag", "a\\..\\..\\evil")],
    ids=["flag-dotdot", "flag-nested-dotdot", "flag-dot", "env-dotdot", "flag-nul", "flag-backslashes"],
)
def test_hostile_job_id_is_refused_and_writes_nothing_outside(tmp_path, monkeypatch, capsys, how, job_id) -> None:
    """``--job-id ../evil`` used to write <output>/../evil/ and <work>/../evil/; ``.`` made the output
    root itself the job dir, where ``--force`` deletes every other job's files."""
    from kolors_job.cli import main

    out, cache = tmp_path / "box" / "out", tmp_path / "box" / "cache"
    out.mkdir(parents=True)
    (out / "other-job").mkdir()
    (out / "other-job" / "_SUCCESS").write_bytes(b"")
    m = tmp_path / "m.yaml"  # a missing model: should the id ever be accepted, the job stops right after prepare
    m.write_text(f"metadata: {{name: fine}}\nspec: {{output: {{uri: '{out}'}}, model: {{base: '{tmp_path}/none'}}}}")
    monkeypatch.setenv("KOLORS_JOB_CACHE_DIR", str(cache))
    monkeypatch.setenv("KOLORS_JOB_WORK_DIR", str(cache / "work"))
    args = ["run", "--manifest", str(m), "--force"]
    if how == "flag":
        args += ["--job-id", job_id]
    else:
        monkeypatch.setenv("KOLORS_JOB_ID", job_id)
    before = tree(tmp_path)
    try:
        code = main(args)
    finally:
        for h in list(logging.getLogger().handlers):
            if getattr(h, "_kolors_job", False):
                logging.getLogger().removeHandler(h)
    err = capsys.readouterr().err
    assert code in (ExitCode.INVALID_MANIFEST, ExitCode.INVALID_INPUT), err
    assert "Traceback" not in err and "unsafe" in err
    assert tree(tmp_path) == before  # nothing written anywhere, the other job untouched


def test_absolute_job_id_keeps_the_work_dir_inside(tmp_path) -> None:
    from kolors_job.job.context import Job

    manifest = parse_manifest(f"spec: {{output: {{uri: '{tmp_path}/out'}}}}")
    settings = Settings(cache_dir=tmp_path / "cache", work_dir=tmp_path / "work")
    try:
        job = Job(manifest, settings=settings, job_id="/kolors-abs-job-id")
    except JobError:
        return  # refused: fine
    assert job.work.is_relative_to(tmp_path / "work"), job.work


# -- datasets served from a bucket: the real fetch + scan ----------------------------------------
def _png(size=(96, 96), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(size=(96, 96)) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise(size, 64).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_bomb(side: int = 100_000) -> bytes:
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _chunk(b"IEND", b"")


def _tiff_bomb() -> bytes:
    """A little-endian TIFF whose header claims 100000×100000 8-bit RGB and carries 16 bytes of data."""
    entries = [(256, 4, 1, 100_000), (257, 4, 1, 100_000), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 2),
               (273, 4, 1, 8 + 2 + 12 * 9 + 4), (277, 3, 1, 3), (278, 4, 1, 100_000), (279, 4, 1, 16)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0\0\0\0"
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00" * 16


def _corrupt_png() -> bytes:
    data = bytearray(_png((96, 96)))
    idat = data.find(b"IDAT")
    data[idat + 8 : idat + 40] = b"\xff" * 32  # garbage deflate stream, CRC now wrong too
    return bytes(data)


def _deep_jsonl() -> bytes:
    return b'{"file_name": "a.png", "text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"


def _ascii_giant_caption() -> bytes:
    return b"a long caption " * 2_500_000  # 37 MB: only the first MiB may be read, then max_chars kept


DATASET_FILES: dict[str, tuple[dict[str, bytes], str, str, str | None]] = {
    # id: (files, the file under test, SkipReason or "kept"/"kept:truncated", a note the scan must count)
    "truncated-jpeg": ({"t.jpg": _jpeg()[:900], "t.txt": b"cap"}, "t.jpg", SkipReason.CORRUPT, None),
    "corrupt-png-data": ({"c.png": _corrupt_png(), "c.txt": b"cap"}, "c.png", SkipReason.CORRUPT, None),
    "png-bomb-100k": ({"bomb.png": _png_bomb()}, "bomb.png", SkipReason.TOO_MANY_PIXELS, None),
    "tiff-bomb-100k": ({"bomb.tif": _tiff_bomb()}, "bomb.tif", SkipReason.TOO_MANY_PIXELS, None),
    "zero-byte": ({"empty.png": b""}, "empty.png", SkipReason.ZERO_BYTE, None),
    "png-named-dat": ({"real.dat": _png()}, "real.dat", SkipReason.WRONG_EXTENSION, None),
    "text-named-png": ({"text.png": b"<html>not an image</html>"}, "text.png", SkipReason.NOT_IMAGE, None),
    "no-caption": ({"n.png": _png()}, "n.png", SkipReason.NO_CAPTION, None),
    "non-utf8-caption": ({"a.png": _png(), "a.txt": b"\xff\xfe\xc0 caption"}, "a.png", SkipReason.CAPTION_NOT_UTF8, None),
    "giant-caption": ({"a.png": _png(), "a.txt": _ascii_giant_caption()}, "a.png", "kept:truncated", None),
    "metadata-dotdot-row": ({"a.png": _png(), "metadata.csv": b"file_name,text\n../../etc/passwd,x\na.png,ok\n"},
                            "a.png", "kept", "metadata_rows_invalid"),
    "metadata-deep-json": ({"a.png": _png(), "metadata.jsonl": _deep_jsonl()}, "a.png", SkipReason.NO_CAPTION,
                           "metadata_rows_invalid"),
    "folder-marker-object": ({"sub/": b"", "sub/a.png": _png(), "sub/a.txt": b"fine"}, "sub/a.png", "kept", None),
}


def _inside_cache(tmp_path: Path, rel: str) -> bool:
    return rel in (tmp_path.name, f"{tmp_path.name}/cache") or rel.startswith(f"{tmp_path.name}/cache/")


@pytest.mark.parametrize("case", list(DATASET_FILES), ids=list(DATASET_FILES))
def test_hostile_dataset_files_from_a_bucket(case, s3_server, storage_env, tmp_path) -> None:
    files, target, expected, note = DATASET_FILES[case]
    bucket = s3_server.create_bucket()
    raw = s3_server.client()
    good = {"zz_good.png": _png((96, 96), (10, 200, 10)), "zz_good.txt": b"a good caption"}
    for key, data in {**files, **good}.items():
        raw.put_object(Bucket=bucket, Key=f"data/{key}", Body=data)
    spec = DatasetSpec(source=f"s3://{bucket}/data/", caption={"fixed": None},
                       filters=FilterSpec(min_width=64, min_height=64))
    settings = storage_env.model_copy(update={"cache_dir": tmp_path / "cache"})
    before = tree(tmp_path.parent)
    root = fetch_dataset(spec, settings)
    assert root.is_relative_to(tmp_path / "cache")
    scan = scan_dataset(root, spec, workers=2)
    kept = {i.path.relative_to(root).as_posix(): i for i in scan.items}
    assert "zz_good.png" in kept  # one bad file never spoils the rest
    if expected.startswith("kept"):
        assert target in kept, scan.skipped
        if expected == "kept:truncated":
            assert scan.captions_truncated == 1 and len(kept[target].caption) == spec.caption.max_chars
    else:
        assert scan.skipped.get(expected) == [target], scan.skipped
    if note:
        assert scan.notes.get(note, 0) >= 1, scan.notes
    changed = {k for k, v in tree(tmp_path.parent).items() if before.get(k) != v}
    assert all(_inside_cache(tmp_path, k) for k in changed), sorted(changed)[:10]


def test_giant_cjk_caption_is_truncated_not_called_non_utf8(tmp_path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (root / "a.png").write_bytes(_png())
    (root / "a.txt").write_bytes(("二次元" * 400_000).encode())  # 3.6 MB; 1 MiB is not a multiple of 3
    spec = DatasetSpec(source=str(root), caption={"fixed": None}, filters=FilterSpec(min_width=64, min_height=64))
    scan = scan_dataset(root, spec, workers=1)
    assert [i.path.name for i in scan.items] == ["a.png"], scan.skipped


def test_hostile_local_dataset_links_and_loops(tmp_path) -> None:
    """Symlinks out of the dataset dir (a file, a dir, a loop back to the root) are skipped, never followed."""
    root, outside = tmp_path / "data", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "ok.png").write_bytes(_png())
    (outside / "secret.png").write_bytes(_png())
    os.symlink(outside / "secret.png", root / "escape.png")
    os.symlink("/etc/passwd", root / "passwd.png")
    os.symlink(root, root / "loop")  # a directory link back to the root: must not be walked forever
    spec = DatasetSpec(source=str(root), caption={"fixed": "x"}, filters=FilterSpec(min_width=64, min_height=64))
    scan = scan_dataset(root, spec, workers=1)
    assert [i.path.name for i in scan.items] == ["ok.png"]
    assert scan.skipped == {SkipReason.SYMLINK_OUTSIDE_ROOT: ["escape.png", "passwd.png"]}


# -- object keys in a dataset / model prefix that try to leave the download dir -------------------
HOSTILE_KEYS = {
    "dotdot": "../evil.png",
    "nested-dotdot": "a/../../evil.png",
    "absolute": "/abs.png",
    "backslash-dotdot": "..\\evil.png",
    "nul": "nul\x00.png",
    "dot-segment": "a/./b.png",
    "drive-letter": "C:evil.png",
}


@pytest.mark.parametrize("what", ["dataset", "model"])
@pytest.mark.parametrize("key", list(HOSTILE_KEYS.values()), ids=list(HOSTILE_KEYS))
def test_hostile_object_keys_in_a_prefix(what, key, s3_server, storage_env, tmp_path) -> None:
    from kolors_job.sources import resolve_model

    bucket = s3_server.create_bucket()
    raw = s3_server.client()
    for k, data in {"!first.png": _png(), "config.json": b"{}", key: b"pwned"}.items():
        raw.put_object(Bucket=bucket, Key=f"p/{k}", Body=data)
    uri = f"s3://{bucket}/p/"
    assert split_uri(uri)[1] == bucket
    settings: Settings = storage_env.model_copy(update={"cache_dir": tmp_path / "cache"})
    before = tree(tmp_path.parent)
    if what == "dataset":  # one odd key is skipped and counted; the rest of the dataset is used
        spec = DatasetSpec(source=uri, caption={"fixed": "x"}, filters=FilterSpec(min_width=64, min_height=64))
        scan = scan_dataset(fetch_dataset(spec, settings), spec, workers=1)
        assert [i.path.name for i in scan.items] == ["!first.png"]
        assert scan.skipped == {SkipReason.UNSAFE_KEY: [key]}, scan.skipped
    else:  # a model is all or nothing
        with pytest.raises(JobError) as err:
            resolve_model(uri, kind="vae", settings=settings)
        assert isinstance(err.value, StorageError) and err.value.exit_code == ExitCode.INVALID_INPUT
        assert "unsafe storage key" in str(err.value) and repr(key)[1:-1] in str(err.value)
    after = tree(tmp_path.parent)
    new = sorted(k for k in after if k not in before)
    # only empty cache scaffolding may appear; no downloaded file, no complete dir, nothing outside
    assert all(_inside_cache(tmp_path, k) for k in new), new
    if what == "model":
        assert not [k for k in new if after[k][0] >= 0], f"files were written: {new}"
    # (other tests share tmp_path.parent and may own such names: only what this test added counts)
    assert not any(Path(k).name in ("evil.png", "abs.png", "b.png") for k in new), new
