"""A training image: what the scan keeps of it (``ImageItem``) and how training reads it (``load_image``: the
reference's JPEG data step, the resize filter and crop the switches say, SDXL's ``add_time_ids`` from the real
resize and crop, as diffusers' ``train_text_to_image_lora_sdxl.py`` computes them); EXIF orientation and the
decompression-bomb guard the scan applies too."""

from __future__ import annotations

import contextlib
import io
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageFile

from kolors_job.sources.layout import image_formats

if TYPE_CHECKING:
    import torch

__all__ = ["ImageItem", "TimeIds", "cover_size", "load_image", "reencode_jpeg", "resized_size"]


@dataclass(frozen=True)
class ImageItem:
    """One kept training image. ``width``/``height``: its size as training reads it (EXIF-oriented, as displayed,
    unless the scan was told not to turn images)."""

    path: Path
    caption: str
    width: int
    height: int
    bucket: tuple[int, int] | None = None
    """``dataset.buckets``: the ``(width, height)`` this image trains at (:mod:`kolors_job.data.buckets`);
    ``None``: the square ``resolution``² crop."""
    repeats: int = 1
    """``dataset.repeats``: how many times it counts when samples are drawn."""
    dataset: int = 0
    """Which of the manifest's datasets it came from (its index in ``spec.dataset``'s list)."""


@dataclass(frozen=True)
class TimeIds:
    """SDXL ``add_time_ids``: original size (h, w), crop top-left (top, left), target size (h, w)."""

    original_height: int
    original_width: int
    crop_top: int
    crop_left: int
    target_height: int
    target_width: int

    def as_tuple(self) -> tuple[int, int, int, int, int, int]:
        return (
            self.original_height,
            self.original_width,
            self.crop_top,
            self.crop_left,
            self.target_height,
            self.target_width,
        )


_ORIENTATION_TAG = 0x0112


TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
"""The table ``ImageOps.exif_transpose`` uses; kept here so scan and load agree even on odd EXIF."""


@contextlib.contextmanager
def pil_guard(max_pixels: int) -> Iterator[None]:
    """Make PIL refuse oversized headers at ``open`` and refuse truncated data at ``load``.

    ``MAX_IMAGE_PIXELS`` is process-global: PIL raises ``DecompressionBombError`` at open for more
    than twice the cap and warns above it (we turn that warning into an error). Our own explicit
    ``w*h > max_pixels`` check after ``open`` is the real gate; this catches formats/paths that
    decode before we look. ``LOAD_TRUNCATED_IMAGES`` is forced False in case a library set it.
    """
    old_pixels, old_truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS = max_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = old_pixels, old_truncated


def exif_orientation_of(img: Image.Image) -> int:
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
        return int(value) if int(value) in TRANSPOSE_FOR_ORIENTATION else 1
    except Exception:  # malformed EXIF: show the image as stored, like most viewers do
        return 1


def oriented_size(img: Image.Image, orientation: int) -> tuple[int, int]:
    w, h = img.size
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def to_rgb8(img: Image.Image) -> Image.Image:
    """8-bit RGB with the right tones for every PIL mode a dataset throws at us.

    ``Image.convert("RGB")`` clips 16-bit greys to white, so I;16/I values are scaled by 1/257;
    alpha is composited on white (transparent pixels' RGB is often garbage); P/LA/CMYK/YCbCr go
    through PIL's own conversions.
    """
    import numpy as np

    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)
        arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)  # 65535 -> 255, 32768 -> 128
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "F":
        arr = np.nan_to_num(np.asarray(img).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        scale = 255.0 if arr.size and float(arr.max()) <= 1.0 else 1.0
        arr = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    if mode == "RGB":
        return img
    return img.convert("RGB")


def _randint(rng: random.Random | torch.Generator | None, high: int) -> int:
    """Uniform integer in [0, high], from whichever RNG the caller uses for reproducibility."""
    if high <= 0:
        return 0
    if rng is None:
        return random.randint(0, high)
    if isinstance(rng, random.Random):
        return rng.randint(0, high)
    import torch

    return int(torch.randint(0, high + 1, (1,), generator=rng).item())


_RESIZE_FILTERS = {"lanczos": Image.Resampling.LANCZOS, "bilinear": Image.Resampling.BILINEAR}


def resized_size(width: int, height: int, resolution: int, resize_filter: str) -> tuple[int, int]:
    """(w, h) once the short side is ``resolution``. ``bilinear`` sizes the long side as the reference's
    ``torchvision.transforms.Resize(resolution)`` does (``int(res * long / short)``: rounded down; DiffSynth's
    dataset of 2024-08); ``lanczos`` rounds it to the nearest pixel."""
    short, long = min(width, height), max(width, height)
    if resize_filter == "bilinear":
        new_long = int(resolution * long / short)  # torchvision's _compute_resized_output_size
        return (resolution, new_long) if width <= height else (new_long, resolution)
    scale = resolution / short
    return max(resolution, round(width * scale)), max(resolution, round(height * scale))


def cover_size(width: int, height: int, target_w: int, target_h: int, resize_filter: str) -> tuple[int, int]:
    """(w, h) once the image is scaled to just cover ``target_w × target_h`` (a bucket): the side that is
    relatively shorter becomes the target's, the other is rounded down (``bilinear``, as :func:`resized_size`)
    or to the nearest pixel, never below the target. For a square target this is :func:`resized_size`."""
    if width * target_h >= height * target_w:  # relatively wider: the heights match
        other = width * target_h / height
        new_w = int(other) if resize_filter == "bilinear" else round(other)
        return max(target_w, new_w), target_h
    other = height * target_w / width
    new_h = int(other) if resize_filter == "bilinear" else round(other)
    return target_w, max(target_h, new_h)


def reencode_jpeg(img: Image.Image, times: int) -> Image.Image:
    """The reference's data step: ``convert("RGB")``, then ``times`` saves as JPEG at PIL's default quality,
    each read back (the notebook saves ``N.jpg`` from the dataset, then its filtered copy from that file)."""

    img = img.convert("RGB")
    for _ in range(times):
        buf = io.BytesIO()
        img.save(buf, format="JPEG")
        buf.seek(0)
        img = Image.open(buf)
        img.load()
    return img.convert("RGB")  # DiffSynth's dataset: Image.open(path).convert("RGB")


def load_image(
    item: ImageItem,
    resolution: int,
    center_crop: bool,
    flip: bool,
    rng: random.Random | torch.Generator | None = None,
    resize_filter: str = "lanczos",
    *,
    exif_orientation: bool = True,
    jpeg_reencode: int = 0,
) -> tuple[torch.Tensor, tuple[int, int, int, int, int, int]]:
    """Load one training sample: CHW float32 in [-1, 1] and SDXL ``add_time_ids``.

    Follows diffusers' ``train_text_to_image_lora_sdxl.py``: original size = the size before resizing
    (EXIF-oriented when ``exif_orientation``); shortest side resized to ``resolution``; optional flip; centre
    crop (``round((H - res) / 2)``) or a random crop drawn from ``rng``; time ids =
    ``(orig_h, orig_w, crop_top, crop_left, res, res)``. ``resize_filter``: ``lanczos`` or ``bilinear`` (the
    reference's: see :func:`resized_size`). ``jpeg_reencode`` > 0 first puts the pixels through the
    reference's JPEG data step (:func:`reencode_jpeg`) instead of :func:`to_rgb8`. An item with a ``bucket``
    is scaled to cover that size instead (:func:`cover_size`) and cropped to it, the same way.
    """
    import numpy as np
    import torch

    # PIL's global bomb limit is left alone (threads may share it) unless the scan allowed more.
    limit = Image.MAX_IMAGE_PIXELS
    guard = pil_guard(item.width * item.height) if limit and item.width * item.height > limit else None
    with guard or contextlib.nullcontext(), Image.open(item.path, formats=image_formats()) as src:
        src.load()
        # not ImageOps.exif_transpose: a malformed EXIF must not fail
        turn = exif_orientation_of(src) if exif_orientation else 1
        img = src.transpose(TRANSPOSE_FOR_ORIENTATION[turn]) if turn != 1 else src.copy()
    img = reencode_jpeg(img, jpeg_reencode) if jpeg_reencode else to_rgb8(img)
    orig_w, orig_h = img.size
    if item.bucket is None:
        target_w = target_h = resolution
        new_w, new_h = resized_size(orig_w, orig_h, resolution, resize_filter)
    else:
        target_w, target_h = item.bucket
        new_w, new_h = cover_size(orig_w, orig_h, target_w, target_h, resize_filter)
    if (new_w, new_h) != (orig_w, orig_h):
        img = img.resize((new_w, new_h), _RESIZE_FILTERS[resize_filter])
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if center_crop:
        top = max(0, round((new_h - target_h) / 2.0))
        left = max(0, round((new_w - target_w) / 2.0))
    else:
        top = _randint(rng, new_h - target_h)
        left = _randint(rng, new_w - target_w)
    img = img.crop((left, top, left + target_w, top + target_h))
    # Not torchvision's transforms.v2: on a PIL image its Resize/crop/flip are these same PIL calls, but
    # PILToTensor+ToDtype(scale=True)+Normalize(0.5, 0.5) differs from x/127.5 - 1 (DiffSynth's tensor, which
    # the oracle test compares against) by 1 ulp on about 4 in 10 values, so every trained LoRA would change.
    arr = np.asarray(img, dtype=np.uint8).copy()
    tensor = torch.from_numpy(arr).permute(2, 0, 1).to(torch.float32).div_(127.5).sub_(1.0)
    time_ids = TimeIds(orig_h, orig_w, top, left, target_h, target_w)
    return tensor.contiguous(), time_ids.as_tuple()
