"""Scanning a local dataset directory safely: which files are training images, and why every other one is not.

Getting the directory (hub export, bucket copy, a path used in place) is ``kolors_job.sources``' job
(``sources.fetch_dataset``); reading a kept image for training is ``images.load_image``'s. ``scan_dataset`` must
never crash on a file and never decode a decompression bomb: sizes come from the header, the pixel cap is enforced
before decoding, and each kept image is fully decoded once so a truncated file is rejected here rather than in step
312 of training. Every rejected file is counted with a reason for the report.

The filters mirror data-juicer's ``image_shape_filter`` / ``image_aspect_ratio_filter`` used by the
reference workflow (docs/design.md §7), applied to the size training reads (EXIF-oriented, what a viewer
shows, with ``train.exif_orientation``; the stored size otherwise, as the reference).
"""

from __future__ import annotations

import json
import os
import posixpath
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, UnidentifiedImageError

from kolors_job.core.errors import InputError
from kolors_job.core.redact import redact_uri
from kolors_job.data.budget import DEFAULT_SCAN_MEMORY, SCAN_BYTES_PER_PIXEL, MemoryBudget
from kolors_job.data.captions import (
    BAD_UTF8,
    METADATA_NAMES,
    Metadata,
    caption_for,
    finish_caption,
    is_inside,
    read_metadata,
)
from kolors_job.data.images import ImageItem, exif_orientation_of, oriented_size, pil_guard, to_rgb8
from kolors_job.manifest.dataset import DatasetSpec, FilterSpec
from kolors_job.sources.layout import IMAGE_EXTENSIONS, SKIPPED_KEYS_FILE, image_formats

if TYPE_CHECKING:
    pass

__all__ = [
    "DatasetReport",
    "DatasetScan",
    "ImageItem",
    "SkipReason",
    "filter_drops",
    "scan_dataset",
]


COMPANION_EXTENSIONS = frozenset(
    {".txt", ".csv", ".jsonl", ".json", ".md", ".yaml", ".yml", ".parquet", ".arrow", ".lock"}
)
"""Caption sidecars, metadata and dataset cards: expected beside images, so never counted as skips."""


MAX_EXAMPLES = 20


class SkipReason:
    """Why a file was not used. Plain strings so they serialise into report.json unchanged."""

    ZERO_BYTE = "zero_byte"
    NOT_IMAGE = "not_image"  # an image extension whose bytes PIL cannot identify, or an unknown file type
    WRONG_EXTENSION = "wrong_extension"  # a real image hiding behind a non-image extension (e.g. ``.dat``)
    CORRUPT = "corrupt"  # truncated or undecodable pixel data
    UNSUPPORTED_MODE = "unsupported_mode"  # decodes, but has no sane 8-bit RGB conversion
    TOO_SMALL = "too_small"
    BAD_ASPECT = "bad_aspect"
    TOO_MANY_PIXELS = "too_many_pixels"  # decompression-bomb cap, rejected from the header
    SYMLINK_OUTSIDE_ROOT = "symlink_outside_root"
    UNREADABLE = "unreadable"  # permission denied, dangling link, FIFO/device, I/O error
    NO_CAPTION = "no_caption"
    CAPTION_NOT_UTF8 = "caption_not_utf8"
    # bucket keys a local directory cannot hold (recorded by Store.download_dir at fetch time):
    UNSAFE_KEY = "unsafe_key"  # ``..``, ``.`` or empty segments
    KEY_CONFLICT = "key_conflict"  # ``x.png`` beside ``x.png/y.png``
    NAME_TOO_LONG = "name_too_long"  # a segment over 255 bytes












# --------------------------------------------------------------------------------------------- types


@dataclass
class DatasetReport:
    """The dataset section of report.json: what was kept, what was skipped and why (with examples)."""

    source: str
    kept: int
    examined: int
    not_examined: int
    skipped: dict[str, int]
    skipped_examples: dict[str, list[str]]
    captions_truncated: int
    notes: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DatasetScan:
    """Result of ``scan_dataset``.

    ``skipped`` maps a ``SkipReason`` to the relative names of the files rejected for it (sorted).
    ``examined`` counts candidate files looked at; ``not_examined`` those left unread once
    ``max_images`` was reached. ``notes`` counts non-fatal oddities (bad metadata rows...).
    """

    root: Path
    items: list[ImageItem]
    skipped: dict[str, list[str]] = field(default_factory=dict)
    examined: int = 0
    not_examined: int = 0
    captions_truncated: int = 0
    notes: dict[str, int] = field(default_factory=dict)

    @property
    def kept(self) -> int:
        return len(self.items)

    @property
    def skipped_counts(self) -> dict[str, int]:
        return {reason: len(names) for reason, names in sorted(self.skipped.items())}

    def report(self, source: str | None = None) -> DatasetReport:
        return DatasetReport(
            source=redact_uri(source) if source else str(self.root),
            kept=self.kept,
            examined=self.examined,
            not_examined=self.not_examined,
            skipped=self.skipped_counts,
            skipped_examples={r: names[:MAX_EXAMPLES] for r, names in sorted(self.skipped.items())},
            captions_truncated=self.captions_truncated,
            notes=dict(sorted(self.notes.items())),
        )


# --------------------------------------------------------------------------------------------- scan








def _walk(root: Path, root_real: str) -> tuple[list[str], list[str], list[str]]:
    """(candidate files, metadata files, directory symlinks leaving the root), as sorted posix paths.

    Hidden files/dirs are ignored. Directory symlinks are never descended (loops, escapes); one
    pointing outside the root is reported, one pointing inside is already covered by its target.
    """
    files: list[str] = []
    metadata: list[str] = []
    outside_dirs: list[str] = []

    def onerror(_err: OSError) -> None:
        return None

    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=onerror):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        keep = []
        for d in dirnames:
            if d.startswith("."):
                continue
            full = os.path.join(dirpath, d)
            if os.path.islink(full):
                if not is_inside(root_real, full):
                    outside_dirs.append(prefix + d)
                continue
            keep.append(d)
        dirnames[:] = sorted(keep)
        for name in filenames:
            if name.startswith("."):
                continue
            if name in METADATA_NAMES:
                metadata.append(prefix + name)
            files.append(prefix + name)
    return sorted(files), sorted(metadata), sorted(outside_dirs)


@dataclass
class _Verdict:
    rel: str
    item: ImageItem | None = None
    reason: str | None = None
    truncated: bool = False
    ignored: bool = False


def _inspect(
    root: Path, root_real: str, rel: str, dspec: DatasetSpec, meta: Metadata, budget: MemoryBudget,
    exif: bool = True,
) -> _Verdict:
    """Judge one file; returns a verdict and never raises for anything a file can contain."""
    path = root / rel
    ext = posixpath.splitext(rel)[1].lower()
    if ext in COMPANION_EXTENSIONS:
        return _Verdict(rel, ignored=True)
    if os.path.islink(path) and not is_inside(root_real, str(path)):
        return _Verdict(rel, reason=SkipReason.SYMLINK_OUTSIDE_ROOT)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return _Verdict(rel, reason=SkipReason.UNREADABLE)  # FIFO/socket/device: opening may block
        if st.st_size == 0:
            return _Verdict(rel, reason=SkipReason.ZERO_BYTE)
        fh = open(path, "rb")  # noqa: SIM115 - closed in the finally below
    except OSError:
        return _Verdict(rel, reason=SkipReason.UNREADABLE)  # dangling link, permission, vanished file
    try:
        return _inspect_open(fh, path, rel, ext, dspec, root, root_real, meta, budget, exif)
    except UnidentifiedImageError:
        return _Verdict(rel, reason=SkipReason.NOT_IMAGE)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError):
        return _Verdict(rel, reason=SkipReason.TOO_MANY_PIXELS)
    except Exception:  # OSError "truncated", SyntaxError, struct.error, ValueError, EOFError, ...
        return _Verdict(rel, reason=SkipReason.CORRUPT)
    finally:
        fh.close()


def _inspect_open(
    fh: Any, path: Path, rel: str, ext: str, dspec: DatasetSpec, root: Path, root_real: str, meta: Metadata,
    budget: MemoryBudget, exif: bool = True,
) -> _Verdict:
    f = dspec.filters
    with Image.open(fh, formats=image_formats()) as img:
        if ext not in IMAGE_EXTENSIONS:
            return _Verdict(rel, reason=SkipReason.WRONG_EXTENSION)
        w, h = img.size
        if w * h > f.max_pixels:
            return _Verdict(rel, reason=SkipReason.TOO_MANY_PIXELS)
        # PNG keeps EXIF wherever the writer put it; PIL decodes the whole image to find an eXIf
        # chunk after the pixel data. Do not decode just to filter: reject early only when both
        # orientations fail, and check again with the real orientation after the decode below.
        late_exif = exif and img.format == "PNG" and "exif" not in img.info
        if late_exif:
            if _filter_reason(w, h, f) and _filter_reason(h, w, f):
                return _Verdict(rel, reason=_filter_reason(w, h, f))
        else:
            w, h = oriented_size(img, exif_orientation_of(img)) if exif else (w, h)
            if reason := _filter_reason(w, h, f):
                return _Verdict(rel, reason=reason)
        raw = caption_for(root, root_real, rel, dspec.caption, meta)
        if raw is BAD_UTF8:
            return _Verdict(rel, reason=SkipReason.CAPTION_NOT_UTF8)
        if raw is None or (dspec.caption.fixed is None and not str(raw).strip()):
            return _Verdict(rel, reason=SkipReason.NO_CAPTION)
        with budget.hold(w * h * SCAN_BYTES_PER_PIXEL):
            img.load()  # the one full decode: truncated/corrupt data fails here, not mid-training
            if late_exif:
                w, h = oriented_size(img, exif_orientation_of(img))
                if reason := _filter_reason(w, h, f):
                    return _Verdict(rel, reason=reason)
            try:
                to_rgb8(img)
            except (ValueError, OSError, TypeError):
                return _Verdict(rel, reason=SkipReason.UNSUPPORTED_MODE)
            img.close()  # free the decoded pixels while still inside the budget: the verdict keeps only the size
    text = str(raw).strip() if dspec.caption.fixed is None else str(raw)
    caption, truncated = finish_caption(text, dspec.caption)
    return _Verdict(rel, item=ImageItem(path=path, caption=caption, width=w, height=h), truncated=truncated)


def _filter_reason(w: int, h: int, f: FilterSpec) -> str | None:
    """The reference's data-juicer ops in their order: shape first, then aspect ratio."""
    if not _passes_shape(w, h, f):
        return SkipReason.TOO_SMALL
    if not _passes_aspect(w, h, f):
        return SkipReason.BAD_ASPECT
    return None


def filter_drops(skipped: dict[str, int], f: FilterSpec) -> dict[str, dict[str, Any]]:
    """How many images each of the manifest's filters dropped, with its setting (report.json
    ``dataset.filters``), so a real run shows e.g. the 512-px images the 1024 size filter removes. The
    filters run in the reference's order (size, then aspect ratio): an image failing both counts as size."""
    low, high = f.aspect_ratio
    return {
        "min_size": {"setting": f"{f.min_width}x{f.min_height}", "dropped": skipped.get(SkipReason.TOO_SMALL, 0)},
        "aspect_ratio": {"setting": f"{low:g}-{high:g}", "dropped": skipped.get(SkipReason.BAD_ASPECT, 0)},
        "max_pixels": {"setting": str(f.max_pixels), "dropped": skipped.get(SkipReason.TOO_MANY_PIXELS, 0)},
    }


def _passes_shape(w: int, h: int, f: FilterSpec) -> bool:
    """data-juicer image_shape_filter: keep if width >= min_width and height >= min_height."""
    return w >= f.min_width and h >= f.min_height


def _passes_aspect(w: int, h: int, f: FilterSpec) -> bool:
    """data-juicer image_aspect_ratio_filter: keep if min_ratio <= w/h <= max_ratio."""
    low, high = f.aspect_ratio
    return h > 0 and low <= w / h <= high


def _printable(rel: str) -> str:
    """A name with undecodable bytes as ``\\xNN`` escapes: valid UTF-8 for report.json and logs.

    File names are bytes on Linux and need not be UTF-8 (Latin-1 names from old archives): such a file is
    judged by its content like any other and, kept, opened by its own bytes (``os.walk`` hands them over as
    surrogate escapes); only what is *shown* of its name is escaped."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _fetch_skips(root: Path) -> dict[str, list[str]]:
    """Keys the fetch of a bucket dataset left out (see ``SKIPPED_KEYS_FILE``), by reason."""
    try:
        doc = json.loads((root / SKIPPED_KEYS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {str(r): [str(k) for k in keys] for r, keys in doc.items() if isinstance(keys, list)}


def scan_dataset(
    root: Path, dataset: DatasetSpec, *, workers: int | None = None, memory_budget: int = DEFAULT_SCAN_MEMORY,
    exif_orientation: bool = True,
) -> DatasetScan:
    """Decide which files under ``root`` are training images, counting every rejection by reason.

    The filters see each image as training will (``train.exif_orientation``: EXIF-turned, or as stored).

    Deterministic: candidates are visited in sorted relative-path order and ``max_images`` keeps
    the first N that pass. Headers are read with a thread pool (PIL releases the GIL while
    decoding); the process-global PIL limits are set for the duration of the scan. Full decodes
    share ``memory_budget`` bytes (``SCAN_BYTES_PER_PIXEL`` per pixel, from the header's size).
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"dataset directory {root} does not exist")
    root_real = os.path.realpath(root)
    files, metadata_files, outside_dirs = _walk(root, root_real)
    meta = read_metadata(root, root_real, metadata_files) if dataset.caption.fixed is None else Metadata()
    scan = DatasetScan(root=root, items=[])
    skipped: dict[str, list[str]] = _fetch_skips(root)
    for rel in outside_dirs:
        skipped.setdefault(SkipReason.SYMLINK_OUTSIDE_ROOT, []).append(_printable(rel))
    cap = dataset.filters.max_images
    budget = MemoryBudget(memory_budget)
    workers = workers or min(8, os.cpu_count() or 1)
    chunk = max(1, workers * 4)

    def inspect(rel: str) -> _Verdict:
        return _inspect(root, root_real, rel, dataset, meta, budget, exif_orientation)

    with pil_guard(dataset.filters.max_pixels), ThreadPoolExecutor(max_workers=workers) as pool:
        position = 0
        while position < len(files) and (cap is None or scan.kept < cap):
            batch = files[position : position + chunk]
            position += len(batch)
            for v in pool.map(inspect, batch):
                if v.ignored:
                    continue
                if cap is not None and scan.kept >= cap:
                    scan.not_examined += 1
                    continue
                scan.examined += 1
                if v.item is not None:
                    scan.items.append(v.item)
                    scan.captions_truncated += int(v.truncated)
                elif v.reason is not None:
                    skipped.setdefault(v.reason, []).append(_printable(v.rel))
        rest = files[position:]
        scan.not_examined += sum(
            1 for r in rest if posixpath.splitext(r)[1].lower() not in COMPANION_EXTENSIONS
        )
    scan.skipped = {reason: sorted(names) for reason, names in sorted(skipped.items())}
    scan.notes = dict(meta.notes)
    return scan


# --------------------------------------------------------------------------------------------- load














