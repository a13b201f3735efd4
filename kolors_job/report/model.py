"""report.json's one definition: a pydantic model per section, the whole file as ``Report``.

The runner builds a ``Report``; ``report.html`` is rendered from the same dump that is written as
report.json, so the two cannot disagree. Every field is optional and only the fields a run set are
written (``exclude_unset``): a failed run reports what it has, and an explicit ``None`` stays ``null``.
Field order is the order report.json has always had. Sections allow extra keys (kept, written after
the declared ones) so a stage that records one more number does not fail the report.

Numbers that a producer writes either as ``int`` or ``float`` are typed ``int | float``: pydantic turns
an ``int`` into a ``float`` for a plain ``float`` field, which would change the JSON (``0`` → ``0.0``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kolors_job.core.redact import scrubber

__all__ = [
    "Dataset",
    "Device",
    "Frame",
    "Model",
    "Recipe",
    "Report",
    "Sampler",
    "Score",
    "SelectedCheckpoint",
    "Source",
    "Storage",
    "Story",
    "Submission",
    "Train",
    "ValidationPoint",
    "clean",
]

Number = int | float


class _Section(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class Model(_Section):
    """The base model as the manifest names it (credentials redacted)."""

    base: str | None = None
    vae: str | None = None
    train_vae: str | None = None
    """The VAE that encoded the training images (``model.train_vae``), when not the story's."""
    random_weights: bool | None = None
    """True for ``tiny://`` weights: the HTML shows a warning banner."""


class Recipe(_Section):
    """``kolors_job.manifest.recipe.describe``: which recipe ran and every switch's value."""

    name: str | None = None
    switches: dict[str, Any] | None = None
    """Switch path (``train.resize_filter``...) → the value this run used."""
    overridden: list[str] | None = None
    """The switches the manifest set away from its recipe's value."""


class Source(_Section):
    """``kolors_job.sources.hubs.SourceRecord`` (models) or ``dataset.source_record`` (a hub dataset copy)."""

    uri: str | None = None
    kind: str | None = None
    revision: str | None = None
    """The requested branch/tag/commit (None: the hub's default branch)."""
    commit: str | None = None
    """The commit the files came from, when the hub names one."""
    files: int | None = None
    bytes_total: int | None = None
    bytes_downloaded: int | None = None
    bytes_reused: int | None = None
    variants: dict[str, str | None] | None = None
    pinned: bool | None = None
    """Every download was pinned to ``commit``; false: from the branch in ``revision`` (the hub gave no commit
    to pin to, or would not list at it), and ``file_revisions`` says which commit each file came from."""
    file_revisions: dict[str, str] | None = None
    layout: str | None = None
    """A hub dataset's layout: ``parquet``, ``structure`` (ModelScope's json + csv + archive) or ``folder``."""


class Dataset(_Section):
    """``kolors_job.data.scan.DatasetReport.to_dict()``, plus ``fetched`` for a hub dataset."""

    source: str | None = None
    kept: int | None = None
    examined: int | None = None
    not_examined: int | None = None
    skipped: dict[str, int] | None = None
    skipped_examples: dict[str, list[str]] | None = None
    captions_truncated: int | None = None
    notes: dict[str, int] | None = None
    filters: dict[str, dict[str, Any]] | None = None
    """Per filter (``min_size``, ``aspect_ratio``, ``max_pixels``): its ``setting``, the images it ``dropped``."""
    fetched: Source | None = None
    """The hub copy's commit and bytes; the same entry is in ``Report.sources``."""
    repeats: int | None = None
    """``dataset.repeats``, when not 1."""
    buckets: dict[str, int] | None = None
    """With ``dataset.buckets``: kept images per training size, ``{"WxH": n}`` (width x height, by aspect
    ratio); with several datasets, over all of them (a square-cropped image counts under ``RxR``)."""
    datasets: list[Dataset] | None = None
    """With several datasets (``spec.dataset`` a list): each one's own section, in the manifest's order; the
    counts above are then their sums."""


class Train(_Section):
    """The runner's train summary, less the LoRA file list (``Report.lora_files``)."""

    steps: int | None = None
    losses: list[float | None] | None = None
    """One loss per optimizer step (index = step - 1); a non-finite loss is written as null."""
    seconds: Number | None = None
    peak_memory_bytes: int | None = None
    precision: str | None = None
    """accelerate's ``mixed_precision``: ``no`` (fp32), ``bf16`` or ``fp16``."""
    gradient_checkpointing: bool | None = None
    samples_seen: int | None = None
    lora_sha256: str | None = None
    """Digest of the LoRA tensors the job exports (the average's with ``train.ema``)."""
    options: dict[str, Any] | None = None
    """The training options in effect, on or off: ``optimizer`` (with Prodigy, ``prodigy_d``: its final
    step-size estimate), ``loss_weighting`` (``snr_gamma`` with ``min_snr``), ``noise_offset``, ``dora``,
    ``ema`` (``ema_decay`` when on)."""


class Frame(_Section):
    index: int | None = None
    image: str | None = None
    """Path relative to the report's directory, e.g. ``images/01.png``."""
    prompt: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    score: Number | None = None


class Sampler(_Section):
    """``generate.sampler_record``: the sampler actually used, its timesteps, sampling and fusion dtype."""

    name: str | None = None
    class_: str | None = Field(default=None, alias="class")
    timesteps: list[Number] | None = None
    final_sigma: Number | None = None
    precision: str | None = None
    lora_fused: bool | None = None
    lora_fusion_dtype: str | None = None


class Story(_Section):
    frames: list[Frame] | None = None
    settings: dict[str, Any] | None = None
    """The manifest's ``spec.story`` less its frames: cfg_scale, steps, width, height, scheduler, ..."""
    sampler: Sampler | None = None


class Score(_Section):
    """``kolors_job.score.challenge.ScoreResult.to_dict()``; ``passed`` is the challenge's ``mean >= threshold``."""

    per_image: list[Number] | None = None
    mean: Number | None = None
    threshold: Number | None = None
    passed: bool | None = None
    consistency: Number | None = None
    """Mean pairwise cosine similarity of the frames' CLIP embeddings; None for fewer than 2 frames."""


class ValidationPoint(_Section):
    """``kolors_job.train.validation.ValidationPoint``: the validation frames drawn at one checkpoint."""

    step: int | None = None
    images: list[str] | None = None
    """PNG paths relative to the report's directory, ``validation/step-N/NN.png`` (NN: the story frame)."""
    scores: list[Number] | None = None
    mean_aesthetic: Number | None = None
    consistency: Number | None = None


class SelectedCheckpoint(_Section):
    """Which checkpoint's LoRA the story and every exported file use (``train.select``), and why."""

    step: int | None = None
    reason: str | None = None
    mean_aesthetic: Number | None = None
    """Its validation mean; None when that step was not validated."""


class Device(_Section):
    """``report.device_info()``: the accelerator and this process's peak memory."""

    name: str | None = None
    peak_memory_bytes: int | None = None
    cuda: str | None = None
    count: int | None = None
    peak_host_memory_bytes: int | None = None
    total_memory_bytes: int | None = None
    cpu: str | None = None


class Submission(_Section):
    problems: list[str] | None = None
    """``submission.check_submission``: why ``submission/`` would not be a valid entry; empty when it is."""


class Storage(_Section):
    """How the object store behaved for this run (up to the report)."""

    retries: int | None = None
    """Requests retried after throttling (503 SlowDown, ServerBusy), 5xx, resets or cut bodies, each after a
    jittered exponential backoff; a retry that succeeds loses nothing."""


class Report(_Section):
    """The whole of report.json."""

    job_id: str | None = None
    manifest_digest: str | None = None
    created: str | None = None
    """UTC, ``YYYY-MM-DDTHH:MM:SSZ``."""
    output: str | None = None
    """The job's output URI (credentials redacted)."""
    recipe: Recipe | None = None
    model: Model | None = None
    sources: list[Source] | None = None
    dataset: Dataset | None = None
    train: Train | None = None
    story: Story | None = None
    score: Score | None = None
    lora_files: dict[str, str] | None = None
    """Format (diffusers, kohya, diffsynth, card) → path relative to the output."""
    lora_formats_skipped: dict[str, str] | None = None
    """Format → why it was not written."""
    validation: list[ValidationPoint] | None = None
    """One entry per validated checkpoint, in step order."""
    selected_checkpoint: SelectedCheckpoint | None = None
    timings: dict[str, Number] | None = None
    """Stage → seconds."""
    storage: Storage | None = None
    device: Device | None = None
    versions: dict[str, str] | None = None
    manifest: dict[str, Any] | None = None
    """``Manifest.resolved()``: defaults filled, every value as given (a manifest holding a credential is refused)."""
    submission: Submission | None = None
    memory: dict[str, Any] | None = None
    """``kolors_job.plan.Plan.to_dict()``: the card, the settings the memory plan chose and every stage's predicted
    GPU peak, host RAM and disk (a full-size model on a GPU only)."""

    def to_json_dict(self) -> dict[str, Any]:
        """What report.json holds: the fields set, secrets scrubbed, non-finite floats as null."""
        return clean(self.model_dump(by_alias=True, exclude_unset=True))


def clean(node: Any, scrub: Callable[[str], str] | None = None) -> Any:
    """Scrub secrets from every string; non-finite floats become None (strict JSON has no NaN)."""
    scrub = scrub or scrubber()
    if isinstance(node, Mapping):
        return {scrub(str(k)): clean(v, scrub) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [clean(v, scrub) for v in node]
    if isinstance(node, str):
        return scrub(node)
    if isinstance(node, float) and not math.isfinite(node):
        return None
    if isinstance(node, (bool, int, float)) or node is None:
        return node
    return scrub(str(node))  # Path, enum, datetime...: their text form
