"""The ``dataset`` stage: fetch and scan each dataset of the manifest; the kept images of all of them and the
summary report.json shows (kept, what each filter dropped, skipped files by reason, per dataset and bucket)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from kolors_job.core.errors import InputError
from kolors_job.core.redact import redact_uri
from kolors_job.data.buckets import assign_buckets, bucket_counts
from kolors_job.data.scan import filter_drops, scan_dataset
from kolors_job.sources import fetch_dataset, source_record

if TYPE_CHECKING:
    from kolors_job.data.images import ImageItem
    from kolors_job.job.context import Job
    from kolors_job.manifest.dataset import DatasetSpec

__all__ = ["ScannedDataset", "run_dataset"]

log = logging.getLogger(__name__)


@dataclass
class ScannedDataset:
    items: list[ImageItem]
    """Every kept image of every dataset, with its dataset's ``repeats`` and, with ``buckets``, its bucket."""
    summary: dict[str, Any]
    """report.json's ``dataset``: one dataset's summary, or the sums with each one's under ``datasets``."""


def run_dataset(job: Job) -> ScannedDataset:
    """Fetch + scan each dataset. A dataset of which no image survives is an input error (exit 4), not a crash
    in training."""
    spec = job.manifest.spec
    items: list[ImageItem] = []
    summaries: list[dict[str, Any]] = []
    for index, dspec in enumerate(spec.datasets):
        where = "dataset" if len(spec.datasets) == 1 else f"dataset[{index}]"
        kept, summary = _scan_one(job, dspec, index, where)
        items += kept
        summaries.append(summary)
    if len(summaries) == 1:
        return ScannedDataset(items, summaries[0])
    return ScannedDataset(items, _total(summaries, items, spec.train.resolution))


def _scan_one(job: Job, dspec: DatasetSpec, index: int, where: str) -> tuple[list[ImageItem], dict[str, Any]]:
    started = time.time()
    root = fetch_dataset(dspec, job.settings)
    scan = scan_dataset(
        root, dspec, memory_budget=job.settings.scan_memory_mb << 20,
        exif_orientation=job.manifest.spec.train.exif_orientation,
    )
    summary = scan.report(dspec.source).to_dict()
    summary["filters"] = filter_drops(scan.skipped_counts, dspec.filters)
    if (record := source_record(root, since=started)) is not None:
        summary["fetched"] = record  # commit and bytes, as report.json's sources has them for models
    dropped = "; ".join(f"{f['dropped']} by {name} ({f['setting']})" for name, f in summary["filters"].items())
    log.info("%s: %d kept; filters dropped %s; skipped %s", where, scan.kept, dropped, summary["skipped"] or "none",
             extra={"kept": scan.kept})  # fmt: skip
    if not scan.items:
        raise InputError(
            f"{where} {redact_uri(dspec.source)}: no image survived the filters "
            f"(skipped: {summary['skipped'] or 'none'}; min {dspec.filters.min_width}x{dspec.filters.min_height}, "
            f"aspect {dspec.filters.aspect_ratio[0]}-{dspec.filters.aspect_ratio[1]})"
        )
    kept = [replace(it, repeats=dspec.repeats, dataset=index) for it in scan.items]
    if dspec.repeats != 1:
        summary["repeats"] = dspec.repeats
    if dspec.buckets:
        resolution = job.manifest.spec.train.resolution
        kept = assign_buckets(kept, resolution, dspec.filters.aspect_ratio)
        summary["buckets"] = bucket_counts(kept, resolution)
        log.info("%s: buckets %s", where, summary["buckets"], extra={"buckets": summary["buckets"]})
    return kept, summary


def _total(summaries: list[dict[str, Any]], items: list[ImageItem], resolution: int) -> dict[str, Any]:
    """report.json's ``dataset`` for several datasets: the sums, the images per training size, and each
    dataset's own summary under ``datasets``."""
    skipped: Counter[str] = Counter()
    notes: Counter[str] = Counter()
    for summary in summaries:
        skipped.update(summary["skipped"])
        notes.update(summary["notes"])
    total: dict[str, Any] = {
        key: sum(summary[key] for summary in summaries)
        for key in ("kept", "examined", "not_examined", "captions_truncated")
    }
    total.update(skipped=dict(sorted(skipped.items())), notes=dict(sorted(notes.items())))
    if any(it.bucket for it in items):
        total["buckets"] = bucket_counts(items, resolution)
    total["datasets"] = summaries
    return total
