"""Experiment tracking through accelerate's tracker API: TensorBoard event files, W&B when asked.

The trainer's ``Accelerator`` gets ``log_with`` and ``project_dir = <work dir>/logs``; TensorBoard writes
under ``<work dir>/logs/tensorboard/`` (the runner uploads that folder to ``<job>/logs/tensorboard/`` with
every checkpoint, so a killed job keeps its curves). Per step: loss, learning rate, gradient norm; per
validation: the mean aesthetic score, the coherence and the frames. ``wandb`` runs only when
``train.log_with`` lists it: nothing here touches the network otherwise.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from accelerate import Accelerator

    from kolors_job.manifest.train import TrainSpec

log = logging.getLogger(__name__)

LOGS = "logs"
"""The logs folder under a run's work dir and under the job's output prefix."""
TENSORBOARD = "tensorboard"
PROJECT = "kolors-job"
"""The W&B project name."""


def trackers(train: TrainSpec, logs_dir: Path, resume_step: int = 0) -> list[Any]:
    """``Accelerator(log_with=...)``: TensorBoard as an instance, so its run folder is ``logs/tensorboard``
    whatever the project is called (W&B's project is :data:`PROJECT`). A resumed run's events file starts
    with ``purge_step``: TensorBoard drops the killed run's events after its checkpoint, never shows them twice."""
    from accelerate.tracking import TensorBoardTracker

    purge = {"purge_step": resume_step + 1} if resume_step else {}
    return [
        TensorBoardTracker(TENSORBOARD, logs_dir, **purge) if name == TENSORBOARD else name for name in train.log_with
    ]


def start(accelerator: Accelerator, train: TrainSpec) -> None:
    """Open the trackers (main process only, inside accelerate) with the run's scalar hyper-parameters."""
    if not accelerator.log_with:
        return
    config = {
        k: v for k, v in train.model_dump(mode="json").items() if isinstance(v, (int, float, str, bool))
    }
    accelerator.init_trackers(PROJECT, config=config)


def log_step(accelerator: Accelerator, step: int, loss: float, lr: float, grad_norm: float) -> None:
    if accelerator.log_with:
        accelerator.log({"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm}, step=step)


def log_validation(accelerator: Accelerator, point: Any, images: list[Any]) -> None:
    """The validation's numbers, and its frames as one image grid in TensorBoard."""
    if not accelerator.log_with or not accelerator.is_main_process:
        return
    values = {"validation/mean_aesthetic": point.mean_aesthetic}
    if point.consistency is not None:
        values["validation/consistency"] = point.consistency
    accelerator.log(values, step=point.step)
    if (tensorboard := _tensorboard(accelerator)) is not None and images:
        import numpy as np

        batch = np.stack([np.asarray(im.convert("RGB")) for im in images])
        tensorboard.log_images({"validation/frames": batch}, step=point.step, dataformats="NHWC")


def flush(accelerator: Accelerator) -> None:
    """Push buffered events to disk (before the runner uploads the folder)."""
    if (tensorboard := _tensorboard(accelerator)) is not None:
        tensorboard.writer.flush()


def _tensorboard(accelerator: Accelerator) -> Any:
    """The started TensorBoard tracker (main process only), or None."""
    return next((t for t in accelerator.trackers if t.name == TENSORBOARD), None)


def end(accelerator: Accelerator) -> None:
    """Close the trackers: what ``accelerator.end_training()`` does first — but that then destroys the process
    group, and under DDP the job still needs it (the story's split, gathering frames)."""
    for tracker in accelerator.trackers:
        tracker.finish()
