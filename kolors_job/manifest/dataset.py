"""``spec.dataset``: one dataset or a list of them, each with its source, captions, filters, repeats and buckets."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Discriminator, Field, Tag, field_validator

from kolors_job.manifest.fields import MAX_PROMPT_CHARS, FreeText, ModelUri, Strict, check_uri, source_schemes

__all__ = ["DATASET_LIST_TAG", "DATASET_TAG", "CaptionSpec", "DatasetSpec", "Datasets", "FilterSpec"]


class CaptionSpec(Strict):
    fixed: FreeText | None = Field("二次元", max_length=MAX_PROMPT_CHARS)
    """Caption for every image (the reference uses "二次元"). ``null`` reads captions from
    ``metadata.csv`` / ``metadata.jsonl`` (``file_name,text``) or per-image ``.txt`` sidecars."""
    prefix: FreeText = Field("", max_length=200)
    """Prepended to every caption (a trigger word)."""
    max_chars: int = Field(512, ge=1, le=MAX_PROMPT_CHARS)
    """Longer captions are cut (and counted in the report); ChatGLM sees at most 256 tokens anyway."""
    dropout: float = Field(0.0, ge=0.0, le=1.0)
    """Probability of training on the empty caption (encoded, not zeroed), for CFG robustness."""


class FilterSpec(Strict):
    min_width: int = Field(1024, ge=1, le=65536)
    """Skip images narrower than this many pixels (the reference's data-juicer ``image_shape_filter``)."""
    min_height: int = Field(1024, ge=1, le=65536)
    """Skip images shorter than this many pixels (the reference's data-juicer ``image_shape_filter``)."""
    aspect_ratio: tuple[float, float] = (0.5, 2.0)
    """Keep images whose width/height lies in [low, high] (data-juicer's image_aspect_ratio_filter)."""
    max_pixels: int = Field(64_000_000, ge=1, le=2**28)
    """Decompression-bomb cap: larger images are skipped, never decoded."""
    max_images: int | None = Field(None, ge=1)
    """Keep at most this many images, the first that pass in sorted path order; ``null``: all."""

    @field_validator("aspect_ratio")
    @classmethod
    def _ratio(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0 < v[0] <= v[1]):
            raise ValueError("must be [low, high] with 0 < low <= high")
        return v


class DatasetSpec(Strict):
    source: ModelUri = "modelscope://AI-ModelScope/lowres_anime"
    """``modelscope://`` or ``hf://`` dataset id, a bucket prefix, or a local directory of images."""
    subset: str = "default"
    """Hub dataset subset (ModelScope's ``subset_name``; the reference loads ``default``)."""
    split: str = "train"
    """Hub dataset split whose files are fetched (the reference trains on ``train``)."""
    caption: CaptionSpec = CaptionSpec()
    """Where each image's caption comes from."""
    filters: FilterSpec = FilterSpec()
    """Which images are kept for training; every skipped file is counted by reason in the report."""
    repeats: int = Field(1, ge=1, le=10_000)
    """How many times each of this dataset's images counts when samples are drawn (kohya's ``num_repeats``):
    an image of a dataset with ``repeats: 3`` is drawn three times as often as one with ``repeats: 1``, and
    an epoch (``train.steps: null``) holds it three times."""
    buckets: bool = False
    """Aspect-ratio buckets (SDXL's): instead of a ``resolution``² centre crop, each image is resized to
    cover, and cropped to, its nearest bucket — a size of about ``resolution``² pixels in 64-px steps whose
    aspect ratio lies within ``filters.aspect_ratio`` — and conditioned on its original size and crop
    offset; every batch holds one bucket's images. ``false`` (the reference): the square crop."""

    @field_validator("source")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_uri(v, source_schemes())


def _dataset_kind(value: Any) -> str | None:
    if isinstance(value, (list, tuple)):
        return DATASET_LIST_TAG
    return DATASET_TAG if isinstance(value, (dict, DatasetSpec)) else None


DATASET_TAG, DATASET_LIST_TAG = "one-dataset", "dataset-list"
"""The union's tags (pydantic puts them in error locations; ``format_validation_error`` leaves them out)."""


Datasets = Annotated[
    Annotated[DatasetSpec, Tag(DATASET_TAG)]
    | Annotated[Annotated[list[DatasetSpec], Field(min_length=1, max_length=64)], Tag(DATASET_LIST_TAG)],
    Discriminator(
        _dataset_kind, custom_error_type="dataset_type",
        custom_error_message="must be a mapping (one dataset) or a list of them",
    ),
]
"""One dataset (a mapping, as always), or a list of them, each with its own source, filters, captions,
``repeats`` and ``buckets``."""
