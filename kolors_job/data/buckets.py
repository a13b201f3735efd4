"""Each kept image's aspect-ratio bucket (``dataset.buckets``): its nearest training size (the sizes and the rule:
:mod:`kolors_job.manifest.buckets`), and the images per size as report.json counts them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

from kolors_job.manifest.buckets import Size, bucket_sizes, nearest_bucket

if TYPE_CHECKING:
    from kolors_job.data.images import ImageItem

__all__ = ["assign_buckets", "bucket_counts", "bucket_name"]


def assign_buckets(items: Iterable[ImageItem], resolution: int, aspect_ratio: tuple[float, float]) -> list[ImageItem]:
    """``items`` with ``bucket`` set to each one's nearest bucket (its size as training reads it)."""
    sizes = bucket_sizes(resolution, aspect_ratio)
    return [replace(it, bucket=nearest_bucket(it.width, it.height, sizes)) for it in items]


def bucket_name(size: Size) -> str:
    """``"1408x704"``: width x height, as report.json counts them."""
    return f"{size[0]}x{size[1]}"


def bucket_counts(items: Iterable[ImageItem], resolution: int) -> dict[str, int]:
    """Images per training size, ``{"WxH": n}`` by aspect ratio; an image without a bucket trains on the square
    ``resolution``² crop and counts under that size."""
    counts = Counter(it.bucket or (resolution, resolution) for it in items)
    return {bucket_name(s): counts[s] for s in sorted(counts, key=lambda s: (s[0] / s[1], s[0]))}
