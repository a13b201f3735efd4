"""Dataset sources: ``spec.source`` turned into a local directory of images (+ captions).

``modelscope://``/``hf://Owner/Name[@rev]``: the split's files are fetched with the hub's client (parquet
shards; or ModelScope's ``<name>.json`` + metadata csv + archive; or an image folder/archive with a metadata
file) and exported (images as their original bytes, the ``text`` column into ``metadata.jsonl``); a storage
prefix (``oss://``, ``s3://``, ``file://``, any registered backend) is downloaded with the storage
layer. Both land in ``<cache>/datasets/<hash>/``, published all or nothing, so a crashed or concurrent
job never sees half a dataset and a second job reuses the first one's copy. A plain path is used in
place (a mounted NAS/bucket needs no copy). What is *in* the directory is ``dataset.scan_dataset``'s call.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from kolors_job import storage
from kolors_job.core.errors import InputError
from kolors_job.core.redact import redact_uri
from kolors_job.core.settings import Settings
from kolors_job.core.uris import HUB_SCHEMES, HubRef, parse_hub_uri, scheme_of
from kolors_job.storage.atomic import COMPLETE_MARKER, atomic_dir

from .buckets import cache_key, copy_dataset_prefix
from .hubs import Plan, download, list_repo, plan_from_listing
from .layout import IMAGE_EXTENSIONS, image_formats
from .listing import Listing
from .records import RECORD_NAME

if TYPE_CHECKING:
    from kolors_job.manifest.dataset import DatasetSpec

__all__ = ["export_rows", "fetch_dataset", "plan_dataset", "source_record"]


def fetch_dataset(dataset: DatasetSpec, settings: Settings) -> Path:
    """Resolve ``spec.source`` to a local directory of images (+ captions) and return it."""
    scheme = scheme_of(dataset.source)
    if not scheme:
        path = Path(dataset.source).expanduser()
        if not path.is_dir():
            raise InputError(f"dataset source {dataset.source!r} is not a directory")
        return path
    if scheme in HUB_SCHEMES:
        return _fetch_hub(dataset, settings)
    if storage.backend(scheme) is not None:
        return copy_dataset_prefix(dataset.source, settings)
    raise InputError(f"dataset source {redact_uri(dataset.source)!r}: {scheme}:// is not a dataset source")


_TEXT_COLUMNS = ("text", "caption", "prompt", "description")


def _column_base(name: str) -> str:
    """ModelScope columns carry a type suffix (``image:FILE``); compare on the base name."""
    return name.split(":", 1)[0].strip().lower()


def _image_payload(value: Any) -> tuple[bytes | None, Image.Image | None, str]:
    """(original bytes, or a PIL image to re-encode, suggested extension) for one cell, else Nones."""
    if isinstance(value, Image.Image):
        filename = getattr(value, "filename", "") or ""
        if filename and os.path.isfile(filename):
            return Path(filename).read_bytes(), None, Path(filename).suffix.lower()
        return None, value, ".png"
    if isinstance(value, (str, os.PathLike)):
        p = Path(value)
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
            return p.read_bytes(), None, p.suffix.lower()
        return None, None, ""
    if isinstance(value, Mapping) and isinstance(value.get("bytes"), (bytes, bytearray)):
        suffix = Path(str(value.get("path") or "")).suffix.lower()
        return bytes(value["bytes"]), None, suffix if suffix in IMAGE_EXTENSIONS else ""
    if isinstance(value, Mapping) and isinstance(value.get("path"), str):
        return _image_payload(value["path"])
    return None, None, ""


def _sniff_extension(data: bytes) -> str:
    try:
        with Image.open(io.BytesIO(data), formats=image_formats()) as img:
            fmt = (img.format or "").lower()
    except Exception:
        return ".bin"
    return {"jpeg": ".jpg", "tiff": ".tif"}.get(fmt, f".{fmt}" if fmt else ".bin")


def export_rows(rows: Iterable[Mapping[str, Any]], out: Path) -> int:
    """Write each row's image (original bytes when available) and text into ``out`` + ``metadata.jsonl``.

    Public so the export is tested with real row shapes (PIL images as ``MsDataset`` yields them
    for ``image:FILE`` columns, file paths, HF ``{"bytes", "path"}`` dicts) without a hub. Returns
    the number of images written. Rows without an image are ignored; bad cells are left for
    ``scan_dataset`` to judge (it never trusts exported files either).
    """
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as meta:
        for index, row in enumerate(rows):
            data: bytes | None = None
            pil: Image.Image | None = None
            ext = ""
            text: str | None = None
            for col, value in row.items():
                base = _column_base(str(col))
                if text is None and base in _TEXT_COLUMNS and isinstance(value, str):
                    text = value
                elif data is None and pil is None:
                    data, pil, ext = _image_payload(value)
            if data is None and pil is None:
                continue
            name = f"{index:07d}"
            if data is not None:
                name += ext or _sniff_extension(data)
                (out / name).write_bytes(data)
            else:
                assert pil is not None
                name += ".png"
                pil.save(out / name, format="PNG")
            written += 1
            if text is not None:
                meta.write(json.dumps({"file_name": name, "text": text}, ensure_ascii=False) + "\n")
    return written


"""Written into a hub dataset's export: its ``sources`` entry (commit, pinning, bytes) and its layout."""

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
_NOT_DATA = frozenset({".gitattributes", "README.md", "readme.md", "dataset_infos.json"})


@dataclass
class _Layout:
    """How a hub dataset repo holds the split: which files to fetch and how to turn them into images."""

    kind: str  # "parquet" | "structure" | "folder"
    paths: list[str]
    meta: str | None = None
    """``structure``: the split's metadata csv (``image:FILE``-style columns point into ``archive``)."""
    archive: str | None = None


def _raw_dest(ref: HubRef, settings: Settings) -> Path:
    owner, name = ref.repo_id.split("/", 1)
    rev = (ref.revision or "default").replace("/", "--")
    return Path(settings.cache_dir) / "hub-datasets" / ref.hub / owner / name / rev


def _choose_layout(ref: HubRef, listing: Listing, dataset: DatasetSpec, settings: Settings) -> _Layout:
    """Which of the layouts a dataset repo has for this split.

    1. **parquet shards** (``data/train-0000N-of-0000M.parquet``, what ``datasets.push_to_hub`` writes and the
       Hugging Face mirrors on ModelScope keep): the split's shards, rows exported.
    2. **ModelScope's native structure**: ``<name>.json`` maps subset → split → ``{"meta": <csv>, "file":
       <archive>}`` (``modelscope.msdatasets.meta.data_meta_manager.parse_dataset_structure``); the csv's
       ``image:FILE`` column names files inside the archive (``MsDataset`` resolves ``*:FILE`` cells against
       the extracted archive). Only that split's csv and archive are fetched.
    3. **an image folder** (images, zip/tar archives of images, ``metadata.csv``/``.jsonl`` with
       ``file_name,text``, or a csv with an image-path column): the whole repo.
    """
    paths = {f.path for f in listing.files}
    parquet = sorted(p for p in paths if p.endswith(".parquet") and _in_split(Path(p), dataset))
    if parquet:
        return _Layout("parquet", parquet + (["README.md"] if "README.md" in paths else []))
    name = ref.repo_id.split("/", 1)[1]
    if f"{name}.json" in paths:
        entry = _structure_entry(ref, listing, f"{name}.json", dataset, settings)
        if entry is not None:
            meta, archive = entry
            missing = [p for p in (meta, archive) if p and p not in paths]
            if missing:
                raise InputError(f"dataset {ref.uri}: {name}.json names {missing[0]}, which the repo does not have")
            files = [f"{name}.json", meta, archive] if archive else [f"{name}.json", *_data_files(paths)]
            return _Layout("structure", sorted({p for p in files if p}), meta, archive)
    return _Layout("folder", _data_files(paths))


def _data_files(paths: Iterable[str]) -> list[str]:
    """A repo's files less its card and git attributes."""
    return sorted(p for p in paths if posixpath.basename(p) not in _NOT_DATA)


def _structure_entry(
    ref: HubRef, listing: Listing, json_path: str, dataset: DatasetSpec, settings: Settings
) -> tuple[str | None, str | None] | None:
    """(meta csv, archive) for the manifest's subset and split from ``<name>.json``; None if it has no such split."""
    dest = _raw_dest(ref, settings).with_name(_raw_dest(ref, settings).name + ".structure")
    root, _ = download(plan_from_listing(ref, "dataset", listing, [json_path], dest), settings)
    try:
        doc = json.loads((root / json_path).read_text(encoding="utf-8"))
        split = (doc.get(dataset.subset) or {}).get(dataset.split)
    except (OSError, ValueError, AttributeError) as exc:
        raise InputError(f"dataset {ref.uri}: {json_path} is not a dataset structure ({exc})") from None
    if not isinstance(split, dict) or not (split.get("meta") or split.get("file")):
        return None
    meta, archive = split.get("meta") or None, split.get("file") or None
    return (str(meta).lstrip("/") if meta else None), (str(archive).lstrip("/") if archive else None)


def _dataset_plan(ref: HubRef, dataset: DatasetSpec, settings: Settings) -> tuple[Plan, _Layout]:
    listing = list_repo(ref, settings, "dataset")
    layout = _choose_layout(ref, listing, dataset, settings)
    sizes = {f.path: f.size for f in listing.files}
    export = sum(sizes[p] for p in layout.paths)  # images come out at about the bytes they go in
    plan = plan_from_listing(ref, "dataset", listing, layout.paths, _raw_dest(ref, settings), export_bytes=export)
    return plan, layout


def _export_key(ref: HubRef, dataset: DatasetSpec) -> str:
    return cache_key(ref.hub, ref.repo_id, ref.revision or "", dataset.subset, dataset.split)


def plan_dataset(dataset: DatasetSpec, settings: Settings) -> Plan | None:
    """For a hub dataset not yet exported into the cache: its listed files and the bytes the export adds
    (for the job's free-space check before any download); None otherwise."""
    ref = parse_hub_uri(dataset.source)
    if ref is None or (Path(settings.cache_dir) / "datasets" / _export_key(ref, dataset) / COMPLETE_MARKER).is_file():
        return None
    return _dataset_plan(ref, dataset, settings)[0]


def _fetch_hub(dataset: DatasetSpec, settings: Settings) -> Path:
    """A ModelScope or Hugging Face dataset repo, listed, fetched with the hub's own client, exported.

    The repo's files land in ``<cache>/hub-datasets/`` like a model's (one commit, resumable, verified,
    one job at a time, a completion record), and stay there; the images and ``metadata.jsonl`` are exported
    into ``<cache>/datasets/<key>/``, published all or nothing. Reading the files directly, not through
    ``MsDataset.load`` / ``datasets``, keeps the download to the split's bytes and the job independent of
    ``datasets``' version (modelscope 1.40.2 fails under datasets 5).
    """
    ref = parse_hub_uri(dataset.source)
    assert ref is not None
    final = Path(settings.cache_dir) / "datasets" / _export_key(ref, dataset)

    def fill(staging: Path) -> None:
        plan, layout = _dataset_plan(ref, dataset, settings)
        raw, record = download(plan, settings)
        written = _export(layout, raw, staging)
        if written == 0 and layout.kind != "folder":
            raise InputError(f"dataset {ref.uri}: the {dataset.split!r} {layout.kind} files hold no image")
        doc = {**record.to_dict(), "layout": layout.kind, "fetched_at": time.time()}
        (staging / RECORD_NAME).write_text(json.dumps(doc))

    return atomic_dir(final, None, fill, replace_stale=True)


def _export(layout: _Layout, raw: Path, out: Path) -> int:
    """Turn the fetched files into images + captions in ``out``; the number of rows exported (folder: 0)."""
    if layout.kind == "parquet":
        import pyarrow.parquet as pq

        shards = [p for p in layout.paths if p.endswith(".parquet")]
        return export_rows((row for f in shards for row in pq.read_table(raw / f).to_pylist()), out)
    if layout.kind == "structure":
        assert layout.meta is not None
        return _export_csv(raw, layout.meta, layout.archive, out)
    _copy_folder(raw, layout.paths, out)
    return 0


def _export_csv(raw: Path, meta: str, archive: str | None, out: Path) -> int:
    """Rows of a ModelScope metadata csv, each ``*:FILE`` / ``image`` cell replaced by that file's bytes
    (read from the archive, else from the repo), exported like parquet rows."""
    import csv

    members = _Archive(raw / archive) if archive else None
    try:
        with open(raw / meta, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.DictReader(f))

        def resolved(row: dict[str, Any]) -> dict[str, Any]:
            out_row: dict[str, Any] = {}
            for col, value in row.items():
                if _column_base(str(col)) in ("image", "file_name") or str(col).endswith(":FILE"):
                    data = members.read(str(value)) if members else None
                    local = raw / str(value)
                    if data is None and local.is_file() and local.resolve().is_relative_to(raw.resolve()):
                        data = local.read_bytes()
                    out_row[col] = {"bytes": data, "path": str(value)} if data is not None else None
                elif _column_base(str(col)) in _TEXT_COLUMNS:
                    out_row[col] = value  # other columns (labels, ids) are not the export's business
            return out_row

        return export_rows((resolved(r) for r in rows), out)
    finally:
        if members:
            members.close()


def _copy_folder(raw: Path, paths: list[str], out: Path) -> None:
    """The repo's files as a folder (hard links where the file system allows), archives unpacked beside them:
    images with ``metadata.csv``/``.jsonl`` or ``.txt`` sidecars are what ``scan_dataset`` reads as they are."""
    for rel in paths:
        src = raw / rel
        if rel.lower().endswith(ARCHIVE_SUFFIXES):
            with _Archive(src) as archive:
                archive.extract_all(out / posixpath.dirname(rel))
            continue
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, target)
        except OSError:
            shutil.copy2(src, target)


class _Archive:
    """A zip or tar archive's regular members by name; member names that would leave a folder are ignored."""

    def __init__(self, path: Path) -> None:
        import tarfile
        import zipfile

        self.zip: zipfile.ZipFile | None = None
        self.tar: tarfile.TarFile | None = None
        try:
            if zipfile.is_zipfile(path):
                self.zip = zipfile.ZipFile(path)
                self.names = {self._clean(n): n for n in self.zip.namelist() if not n.endswith("/")}
            else:
                self.tar = tarfile.open(path)  # noqa: SIM115 - closed by close()
                self.names = {self._clean(m.name): m.name for m in self.tar.getmembers() if m.isfile()}
        except (OSError, tarfile.TarError, zipfile.BadZipFile) as exc:
            raise InputError(f"dataset archive {path.name} cannot be read: {exc}") from None
        self.names.pop("", None)

    @staticmethod
    def _clean(name: str) -> str:
        parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
        return "" if ".." in parts else "/".join(parts)

    def read(self, name: str) -> bytes | None:
        """The member ``name`` (also found without or with one leading folder: ModelScope's csvs name files
        either inside the archive's top folder or relative to it)."""
        key = self._clean(name)
        member = self.names.get(key) or next(
            (m for k, m in self.names.items() if k.split("/", 1)[-1] == key or key.split("/", 1)[-1] == k), None
        )
        if member is None:
            return None
        if self.zip is not None:
            return self.zip.read(member)
        assert self.tar is not None
        f = self.tar.extractfile(member)
        return f.read() if f is not None else None

    def extract_all(self, dest: Path) -> None:
        for key in self.names:
            data = self.read(key)
            if data is not None:
                target = dest / key
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)

    def close(self) -> None:
        for a in (self.zip, self.tar):
            if a is not None:
                a.close()

    def __enter__(self) -> _Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def source_record(root: Path, *, since: float) -> dict[str, Any] | None:
    """report.json's ``sources`` entry for a hub dataset copy: this job's downloaded bytes when it fetched
    the copy (after ``since``), else all of it reused."""
    try:
        rec = json.loads((root / RECORD_NAME).read_text())
        total = int(rec["bytes_total"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    fresh = float(rec.get("fetched_at") or 0) >= since
    downloaded = int(rec.get("bytes_downloaded", total)) if fresh else 0
    out = {k: rec.get(k) for k in ("uri", "kind", "revision", "commit", "files", "pinned", "layout")}
    out.update(kind="dataset", bytes_total=total, bytes_downloaded=downloaded, bytes_reused=total - downloaded,
               variants={})  # fmt: skip
    if rec.get("pinned") is False:
        out["file_revisions"] = rec.get("file_revisions") or {}
    return out


def _in_split(rel: Path, dataset: DatasetSpec) -> bool:
    """Whether a parquet file belongs to the manifest's subset/split in the hub's file naming."""
    parts = [p.lower() for p in rel.parts]
    split = dataset.split.lower()
    if not (parts[-1].startswith(f"{split}-") or parts[-1] == f"{split}.parquet" or split in parts[:-1]):
        return False
    return dataset.subset == "default" or dataset.subset.lower() in parts[:-1]
