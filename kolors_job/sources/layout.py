"""A local dataset directory as sources write it and the dataset stage scans it: which files are images,
which decoders may open them, and the note kolors-job leaves beside them about keys it left out."""

from __future__ import annotations

from PIL import Image

__all__ = ["IMAGE_EXTENSIONS", "PIL_FORMATS", "SKIPPED_KEYS_FILE", "image_formats"]


IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
"""Files with these extensions are training candidates (PIL sniffs the real format from the bytes)."""


PIL_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
"""Decoders PIL may use (JPEG covers camera MPO files). Everything else is "not_image": PIL's EPS
plugin runs Ghostscript and its long tail of rare formats is attack surface no photo dataset needs."""


def image_formats() -> list[str]:
    """``PIL_FORMATS`` this Pillow build can open (``Image.open`` raises KeyError on unknown ones)."""
    Image.init()
    return [f for f in PIL_FORMATS if f in Image.OPEN]


SKIPPED_KEYS_FILE = ".kolors_job_skipped_keys.json"
"""Written into a fetched bucket dataset: the keys left out and why, for the scan's report."""
