"""The ``train`` stage: train (or resume from the newest complete checkpoint) and choose the checkpoint whose
LoRA the job publishes (``train.select``); checkpoints, validation frames and TensorBoard events are uploaded
as they complete. Recorded in ``_state/train.json``: a rerun of a trained job does not train again."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from kolors_job.core.errors import JobInterruptedError
from kolors_job.plan.runtime import story_spec, train_kwargs, train_spec
from kolors_job.train import checkpoints
from kolors_job.train import validation as val
from kolors_job.train.loop import train_lora
from kolors_job.train.tracking import LOGS

if TYPE_CHECKING:
    from kolors_job.data.stage import ScannedDataset
    from kolors_job.job.context import Job
    from kolors_job.models.aesthetic import AestheticScorer
    from kolors_job.sources.stage import ResolvedModels

__all__ = ["TrainInput", "Trained", "run_train"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainInput:
    models: ResolvedModels
    dataset: ScannedDataset
    scorer: AestheticScorer | None
    """Scores the validation frames (rank 0; None on the other ranks)."""


class Trained(BaseModel):
    """What the job records of a finished training (``_state/train.json``; report.json's ``train``, ``validation``
    and ``selected_checkpoint``). The LoRA itself is the selected checkpoint's, in ``<work>/lora`` on each node."""

    steps: int
    losses: list[float]
    seconds: float
    peak_memory_bytes: int | None
    precision: str
    gradient_checkpointing: bool
    samples_seen: int
    lora_sha256: str
    options: dict[str, Any]
    validation: list[dict[str, Any]]
    selected_checkpoint: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        """report.json's ``train`` section."""
        return self.model_dump(exclude={"validation", "selected_checkpoint"})


def run_train(job: Job, given: TrainInput) -> Trained:
    """Train, or resume, and select the checkpoint (:mod:`kolors_job.train.validation`)."""
    models, items, scorer = given.models, given.dataset.items, given.scorer
    lora_local = job.work / "lora"
    resume_from = None
    if (newest := checkpoints.newest_complete(job.store, identity=job.digest)) is not None:
        resume_from = checkpoints.step_dir(job.work, newest)
        if job.local_main:
            checkpoints.download(job.store, newest, job.work)
        job.barrier()
        log.info("train: resuming from %s", checkpoints.step_key(newest))
        job.status.progress(newest, force=True)  # not "step 0" until the next step is done

    spec = job.manifest.spec
    choices = job.memory_plan.choices if job.memory_plan else None
    validator = None
    if spec.train.validation_every:
        story = story_spec(spec.story, choices)  # validation draws in the plan's story batch

        def on_point(p: val.ValidationPoint) -> None:
            job.upload_dir(job.work / val.step_prefix(p.step), val.step_prefix(p.step) + "/")
            for observer in job.observers:
                observer.validation_point(p.to_dict())

        validator = val.Validator(spec.train, story, scorer, job.work, on_point=on_point)

    def upload_logs() -> None:  # the event files grow: re-sent with each checkpoint and at the end
        if (job.work / "train" / LOGS).is_dir():
            job.upload_dir(job.work / "train" / LOGS, f"{LOGS}/")

    def on_checkpoint(path: Path, step: int) -> None:
        if job.main:
            checkpoints.upload(job.store, path, step)
            upload_logs()
            job.status.progress(step)
            best = validator.best_step() if validator and spec.train.select == "best_aesthetic" else None
            checkpoints.prune(job.store, keep=spec.output.keep_checkpoints, protect={best} - {None})

    result = train_lora(
        models.base, items, train_spec(spec.train, choices), work_dir=job.work / "train", vae_dir=models.vae,
        train_vae_dir=models.train_vae, device=job.device, resume_from=resume_from, on_checkpoint=on_checkpoint,
        should_stop=job.stop, progress=job.progress, caption_dropout=[d.caption.dropout for d in spec.datasets],
        validator=validator, identity=job.digest, **train_kwargs(choices),
    )
    upload_logs()  # the last events (tracking.end flushed them)
    if result.interrupted:
        raise JobInterruptedError(f"interrupted at step {result.steps}; checkpoint saved; rerun to resume")
    selected = val.select_checkpoint(result.validation, spec.train.select, result.steps)
    if job.local_main:  # every node exports it and draws frames with it; its ranks share one disk
        shutil.rmtree(lora_local, ignore_errors=True)
        shutil.copytree(result.lora_dir, lora_local)
        if selected["step"] != result.steps:  # train.select: best_aesthetic chose an earlier checkpoint
            val.use_checkpoint_lora(lora_local, job.store, job.work / "train", selected["step"])
    return Trained(**result.summary(), validation=result.validation, selected_checkpoint=selected)
