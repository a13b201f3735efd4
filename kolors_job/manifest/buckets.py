"""The sizes ``dataset.buckets`` trains at: SDXL-style aspect-ratio buckets of about ``resolution``² pixels.

SDXL (and Kolors after it) was trained on buckets of ≈1024² pixels in 64-px steps, each image resized to
cover its nearest bucket and cropped to it, with the original size and the crop offset as conditioning.
A bucket's sides are multiples of 64 (the UNet halves the latent three times) and it holds at most
``resolution``² pixels (kohya's and SimpleTuner's rule); only buckets whose aspect ratio lies within the
dataset's ``filters.aspect_ratio`` exist, since no kept image is outside it. No library in the lock builds
these (diffusers' SDXL scripts crop squares), and the rule is a few lines.

What a dataset's buckets are is the manifest's meaning: the dataset stage gives each image its nearest
(:mod:`kolors_job.data.buckets`), the memory plan sizes the training step by the largest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["STEP", "Size", "bucket_sizes", "nearest_bucket"]

STEP = 64
"""Bucket sides are multiples of this many pixels."""


Size = tuple[int, int]
"""A bucket as ``(width, height)`` in pixels."""


def bucket_sizes(resolution: int, aspect_ratio: tuple[float, float] = (0.0, math.inf)) -> list[Size]:
    """Every bucket for ``resolution``, by kohya's rule (sd-scripts' ``make_bucket_resolutions``): the square,
    and for each width a multiple of ``STEP`` the tallest height (a multiple of ``STEP``) that keeps
    ``width × height ≤ resolution²``, with its transpose (so portrait and landscape get the same shapes); then
    those whose ``width / height`` lies in ``aspect_ratio`` (all of them if none does, so an image always has a
    bucket). Sorted by aspect ratio."""
    area = resolution * resolution
    side = max(STEP, resolution // STEP * STEP)
    sizes = {(side, side)}
    for width in range(STEP, area // STEP + 1, STEP):
        height = area // width // STEP * STEP
        if height >= STEP:
            sizes |= {(width, height), (height, width)}
    low, high = aspect_ratio
    within = {(w, h) for w, h in sizes if low <= w / h <= high}
    return sorted(within or sizes, key=lambda s: (s[0] / s[1], s[0]))


def nearest_bucket(width: int, height: int, sizes: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is closest to the image's (in log space, so 2:1 and 1:2 are equally far
    from 1:1); on a tie the one with more pixels, then the narrower."""
    ratio = math.log(width / height)
    return min(sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - ratio), -s[0] * s[1], s[0]))
