"""The ``export`` stage: the selected LoRA rewritten in the manifest's formats (diffusers with α baked in, kohya,
DiffSynth: :mod:`kolors_job.export`) and uploaded to ``lora/``, so the story draws with — and the output holds —
exactly the published files. Recorded in ``_state/export.json``; a rerun fetches ``lora/`` back instead."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from kolors_job.core.redact import redact_uri
from kolors_job.export import LoraInfo, applicable_formats, export_all
from kolors_job.export.lora_io import LORA_WEIGHT_NAME
from kolors_job.train.validation import use_checkpoint_lora

if TYPE_CHECKING:
    from kolors_job.job.context import Job
    from kolors_job.manifest.train import TrainSpec
    from kolors_job.train.stage import Trained

__all__ = ["ExportInput", "Exported", "lora_info", "restore_export", "run_export"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportInput:
    train: Trained


class Exported(BaseModel):
    """report.json's ``lora_files`` and ``lora_formats_skipped``."""

    lora_files: dict[str, str] = {}
    """Each written format's file, relative to the job's output."""
    lora_formats_skipped: dict[str, str] = {}
    """Each asked-for format that cannot hold this LoRA, and why."""


def run_export(job: Job, given: ExportInput) -> Exported:
    """Every node writes the formats into its ``<work>/lora`` (each draws frames with them); rank 0 uploads."""
    lora = job.work / "lora"
    exported = Exported()
    if job.local_main:
        step = given.train.selected_checkpoint["step"]
        if not (lora / LORA_WEIGHT_NAME).is_file():  # a rerun whose training was done: the selected checkpoint's
            lora.mkdir(parents=True, exist_ok=True)
            use_checkpoint_lora(lora, job.store, job.work / "train", step)
        exported = export_lora(job, given.train.model_copy(update={"steps": step}))
    job.barrier()
    job.upload_dir(lora, "lora/")  # final formats only: each object is written once
    return exported


def restore_export(job: Job, exported: Exported) -> None:
    """A rerun of an exported job: the published files back in ``<work>/lora`` for the story."""
    if job.local_main:
        job.store.child("lora").download_dir("", job.work / "lora")
    job.barrier()


def export_lora(job: Job, train: Trained) -> Exported:
    """Rewrite ``<work>/lora`` in the manifest's formats."""
    lora = job.work / "lora"
    # the registry says which formats can hold this LoRA (DiffSynth 1.1.9: only the full-size Kolors UNet)
    formats, skipped = applicable_formats(job.manifest.spec.output.lora_formats, lora)
    for fmt, why in skipped.items():
        log.warning("lora export: %s skipped: %s", fmt, why)
    files = export_all(lora, lora_info(job, train), lora, formats, write_card=False)
    return Exported(
        lora_files={k: Path(v).relative_to(job.work).as_posix() for k, v in files.items()},
        lora_formats_skipped=skipped,
    )


def lora_info(job: Job, train: Trained) -> LoraInfo:
    """What the exports and the model card say about the LoRA."""
    spec = job.manifest.spec
    return LoraInfo(
        rank=spec.train.rank,
        alpha=spec.train.alpha,
        target_modules=tuple(spec.train.target_modules),
        base_model=redact_uri(spec.model.base),
        trigger=spec.datasets[0].caption.prefix or spec.datasets[0].caption.fixed or "",
        name=job.job_id,
        steps=train.steps,
        learning_rate=spec.train.learning_rate,
        resolution=spec.train.resolution,
        batch_size=spec.train.batch_size,
        seed=spec.train.seed,
        precision=train.precision,
        extra=_option_notes(spec.train),
    )


def _option_notes(train: TrainSpec) -> dict[str, Any]:
    """The training options switched on, as the model card and the files' ``kolors_job.extra`` show them."""
    notes = {
        "optimizer": train.optimizer if train.optimizer != "adamw" else "",
        "loss weighting": f"min-SNR, gamma {train.snr_gamma:g}" if train.loss_weighting == "min_snr" else "",
        "noise offset": f"{train.noise_offset:g}" if train.noise_offset else "",
        "DoRA": "yes" if train.dora else "",
        "EMA": f"decay {train.ema_decay:g} (the exported weights)" if train.ema else "",
    }
    return {k: v for k, v in notes.items() if v}
