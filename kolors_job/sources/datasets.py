"""Dataset sources: ``spec.source`` turned into a local directory of images (+ captions).

``modelscope://``/``hf://Owner/Name[@rev]``: the split's parquet shards are fetched with the hub's client
and exported (images as their original bytes, the text column into ``metadata.jsonl``); a storage
prefix (``oss://``, ``s3://``, ``file://``, any registered backend) is downloaded with the storage
layer. Both land in ``<cache>/datasets/<hash>/``, published all or nothing, so a crashed or concurrent
job never sees half a dataset and a second job reuses the first one's copy. A plain path is used in
place (a mounted NAS/bucket needs no copy). What is *in* the directory is ``dataset.scan_dataset``'s call.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from kolors_job import storage
from kolors_job.errors import InputError
from kolors_job.redact import redact_uri
from kolors_job.settings import Settings
from kolors_job.storage.atomic import atomic_dir

from .buckets import cache_key, copy_dataset_prefix
from .hubs import HUB_SCHEMES, download_dataset_files, list_dataset_repo, parse_hub_uri

if TYPE_CHECKING:
    from kolors_job.manifest import DatasetSpec

__all__ = ["DATASET_RECORD", "export_rows", "fetch_dataset", "source_record"]


def fetch_dataset(spec: DatasetSpec, settings: Settings) -> Path:
    """Resolve ``spec.source`` to a local directory of images (+ captions) and return it."""
    scheme = storage.scheme_of(spec.source)
    if not scheme:
        path = Path(spec.source).expanduser()
        if not path.is_dir():
            raise InputError(f"dataset source {spec.source!r} is not a directory")
        return path
    if scheme in HUB_SCHEMES:
        return _fetch_hub(spec, settings)
    if storage.backend(scheme) is not None:
        return copy_dataset_prefix(spec.source, settings)
    raise InputError(f"dataset source {redact_uri(spec.source)!r}: {scheme}:// is not a dataset source")


_TEXT_COLUMNS = ("text", "caption", "prompt", "description")


def _column_base(name: str) -> str:
    """ModelScope columns carry a type suffix (``image:FILE``); compare on the base name."""
    return name.split(":", 1)[0].strip().lower()


def _image_payload(value: Any) -> tuple[bytes | None, Image.Image | None, str]:
    """(original bytes, or a PIL image to re-encode, suggested extension) for one cell, else Nones."""
    from kolors_job.dataset import IMAGE_EXTENSIONS  # the scan's notion of an image file (imported late: a cycle)

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
    from kolors_job.dataset import _formats

    try:
        with Image.open(io.BytesIO(data), formats=_formats()) as img:
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


DATASET_RECORD = ".kolors_job_source.json"
"""Written into a hub dataset's cache copy: the commit and the bytes its files came to."""


def _fetch_hub(spec: DatasetSpec, settings: Settings) -> Path:
    """A ModelScope or Hugging Face dataset repo, listed, then fetched with the hub's own client.

    Hub datasets are hosted as parquet shards per split (``data/train-0000N-of-0000M.parquet``, the
    layout ``push_to_hub`` writes and ``AI-ModelScope/lowres_anime`` mirrors from HF ``lowres/anime``):
    only the manifest's split is fetched, at the commit the listing named, and exported (images as their
    original bytes, a text column into ``metadata.jsonl``). A repo with no parquet for the split is taken
    as an image folder and fetched whole. Reading the files directly, not through ``MsDataset.load`` /
    ``datasets``, keeps the download to the split's bytes and the job independent of ``datasets``' version.
    """
    ref = parse_hub_uri(spec.source)
    assert ref is not None
    key = cache_key(ref.hub, ref.repo_id, ref.revision or "", spec.subset, spec.split)
    final = Path(settings.cache_dir) / "datasets" / key

    def fill(staging: Path) -> None:
        listing, commit = list_dataset_repo(ref, settings)
        parquet = [f for f in listing if f.path.endswith(".parquet") and _in_split(Path(f.path), spec)]
        chosen = parquet + [f for f in listing if f.path == "README.md"] if parquet else listing
        repo = staging / ".repo"
        download_dataset_files(ref, repo, [f.path for f in chosen] if parquet else None, commit, settings)
        if not parquet:  # an image folder (+ metadata.csv/jsonl): used as it is
            for item in repo.iterdir():
                if item.name not in (".cache", ".gitattributes", ".msc", ".mv", ".mdl"):
                    item.rename(staging / item.name)
        else:
            import pyarrow.parquet as pq

            rows = (row for f in sorted(f.path for f in parquet) for row in pq.read_table(repo / f).to_pylist())
            if export_rows(rows, staging) == 0:
                raise InputError(f"dataset {ref.uri}: the {spec.split!r} parquet files have no image column")
        shutil.rmtree(repo, ignore_errors=True)
        record = {"uri": ref.uri, "commit": commit, "files": len(chosen),
                  "bytes_total": sum(f.size for f in chosen), "fetched_at": time.time()}  # fmt: skip
        (staging / DATASET_RECORD).write_text(json.dumps(record))

    return atomic_dir(final, None, fill, replace_stale=True)


def source_record(root: Path, *, since: float) -> dict[str, Any] | None:
    """report.json's ``sources`` entry for a hub dataset copy; downloaded when fetched after ``since``."""
    try:
        rec = json.loads((root / DATASET_RECORD).read_text())
        total = int(rec["bytes_total"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    fresh = float(rec.get("fetched_at") or 0) >= since
    return {
        "uri": rec.get("uri"), "kind": "dataset", "revision": None, "commit": rec.get("commit"),
        "files": rec.get("files"), "bytes_total": total,
        "bytes_downloaded": total if fresh else 0, "bytes_reused": 0 if fresh else total, "variants": {},
    }  # fmt: skip


def _in_split(rel: Path, spec: DatasetSpec) -> bool:
    """Whether a parquet file belongs to the manifest's subset/split in the hub's file naming."""
    parts = [p.lower() for p in rel.parts]
    split = spec.split.lower()
    if not (parts[-1].startswith(f"{split}-") or parts[-1] == f"{split}.parquet" or split in parts[:-1]):
        return False
    return spec.subset == "default" or spec.subset.lower() in parts[:-1]
