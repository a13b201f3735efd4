"""A run's fingerprint: what a resumed run must share with the checkpoint it continues, so that it continues the
same run (every checkpoint records it; a rerun whose fingerprint differs is refused, never silently mixed).

Every ``TrainSpec`` field counts, except those ``NOT_WEIGHTS`` lists with the reason they do not decide the weights:
a field added to ``TrainSpec`` counts from the day it is added, with nothing to remember. Beside the spec (as the
trainer gets it: the memory plan's batch split, optimizer and checkpointing included) the fingerprint holds the
samples per step (batch × accumulation × ranks), the data in order (each image's name, size and caption), the
caption dropout, the datasets' buckets and repeats where used, the resolved precision and the job's identity.
``VERSION`` changes with the recipe of the fingerprint itself: a checkpoint that records another version (an
earlier kolors-job's) is passed over, as another job's is (``checkpoints.newest_complete``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kolors_job.data.images import ImageItem
    from kolors_job.manifest.train import TrainSpec

__all__ = ["NOT_WEIGHTS", "VERSION", "run_fingerprint"]

VERSION = 2
"""1: a list of fields written by hand (before #24); 2: every field but ``NOT_WEIGHTS``."""

NOT_WEIGHTS: dict[str, str] = {
    "precision": "counted as resolved for the device (auto: fp16 on CUDA, fp32 on a CPU), beside the spec",
    "gradient_checkpointing": "recomputes the same activations in the backward pass: the same numbers",
    "checkpoint_every": "when checkpoints are written, not what the steps compute",
    "validation": "validation draws in eval mode with the RNG forked, and changes no weight",
    "log_with": "trackers only read the metrics",
    "select": "which checkpoint is exported, not how any is trained",
    "memory": "what the plan changes (batch split, optimizer, checkpointing) counts through the spec itself",
    "allow_adamw8bit": "a permission to the memory plan: the optimizer it chooses counts through the spec",
}
"""The ``TrainSpec`` fields that do not decide the weights, and why; every other field is in the fingerprint."""


def run_fingerprint(
    train: TrainSpec,
    samples_per_step: int,
    items: Sequence[ImageItem],
    caption_dropout: float | list[float],
    *,
    precision: str,
    identity: str,
) -> dict[str, Any]:
    """The fingerprint of a run of ``spec`` on ``items`` (JSON values, as a checkpoint's state.json holds it)."""
    data = hashlib.sha256()
    for item in items:  # names as bytes: a dataset's file names need not be UTF-8
        data.update(os.fsencode(Path(item.path).name) + b"\0" + item.caption.encode("utf-8", "surrogatepass"))
        data.update(f"\0{item.width}x{item.height}\n".encode())
    layout: dict[str, Any] = {}
    if any(it.bucket for it in items):
        layout["buckets"] = [list(it.bucket) if it.bucket else None for it in items]
    if any(it.repeats != 1 for it in items):
        layout["repeats"] = [it.repeats for it in items]
    weights = {k: v for k, v in train.model_dump(mode="json").items() if k not in NOT_WEIGHTS}
    fingerprint = {
        "version": VERSION,
        **weights,
        "samples_per_step": samples_per_step,
        "items": len(items),
        "data": data.hexdigest(),
        "caption_dropout": caption_dropout,
        **layout,
        "precision": precision,
        "job": identity,
    }
    return json.loads(json.dumps(fingerprint))
