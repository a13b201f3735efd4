"""The memory plan at run time: plan the job on the card this process sees, before any download; stop (exit 4)
when it cannot fit; hand the trainer and the story the settings the plan chose."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from kolors_job.core.errors import InputError
from kolors_job.plan.cards import GIB, visible_card
from kolors_job.plan.planner import Plan, plan_job
from kolors_job.plan.simulate import Count
from kolors_job.plan.stages import Choices
from kolors_job.plan.table import Results, cache_file
from kolors_job.plan.train_step import TrainStep

if TYPE_CHECKING:
    from kolors_job.manifest.spec import Manifest
    from kolors_job.manifest.story import StorySpec
    from kolors_job.manifest.train import TrainSpec

__all__ = ["plan_for_device", "step_activation_bytes", "story_kwargs", "story_spec", "train_kwargs", "train_spec"]

log = logging.getLogger(__name__)


def plan_for_device(manifest: Manifest, device: str, cache_dir: Path) -> Plan | None:
    """The plan on the CUDA device ``device`` (None elsewhere: a CPU run has no card to fit). Raises InputError
    (exit 4) naming the stage and the shortfall when even the smallest settings do not fit."""
    if not device.startswith("cuda"):
        return None
    index = int(device.partition(":")[2] or 0)
    card = visible_card(index)
    plan = plan_job(manifest, card, Results(cache_file(cache_dir)))
    log.info(
        "memory plan on the %s: %s; peak %.2f GiB of %.2f allowed", card.describe(), plan.choices.describe(),
        plan.peak / GIB, card.budget / GIB, extra={"memory": plan.to_dict()},
    )  # fmt: skip
    for note in plan.notes:
        log.info("memory plan: %s", note)
    if not plan.fits:
        raise InputError(f"memory: {plan.problem()} (`kolors-job plan` shows every stage)")
    return plan


def train_spec(train: TrainSpec, choices: Choices | None) -> TrainSpec:
    """``spec`` with the plan's training settings (unchanged without a plan)."""
    if choices is None:
        return train
    precision = {"no": "fp32"}.get(choices.precision, choices.precision)
    return train.model_copy(update={
        "precision": precision,
        "gradient_checkpointing": "on" if choices.gradient_checkpointing else "off",
        "batch_size": choices.batch_size,
        "gradient_accumulation": choices.gradient_accumulation,
        "optimizer": choices.optimizer,
    })  # fmt: skip


def train_kwargs(choices: Choices | None) -> dict[str, object]:
    """``train_lora``'s keyword arguments for the plan's other settings."""
    if choices is None:
        return {}
    return {"latent_batch": choices.latent_batch, "text_encoder_device": _text_encoder_device(choices)}


def story_kwargs(choices: Choices | None) -> dict[str, object]:
    """``generate_story``'s keyword arguments for the plan's other settings."""
    if choices is None:
        return {}
    return {"text_encoder_device": _text_encoder_device(choices), "vae_tiling": choices.vae_tiling}


def _text_encoder_device(choices: Choices) -> str | None:
    return "cpu" if choices.text_encoder == "cpu" else None


def story_spec(story: StorySpec, choices: Choices | None) -> StorySpec:
    if choices is None:
        return story
    return story.model_copy(update={"precision": choices.story_precision, "batch_size": choices.story_batch_size})


def step_activation_bytes(unet_params: int, batch_size: int, resolution: int) -> float:
    """What a training step without checkpointing adds to the weights (the plan's simulation of the full-size
    UNet in fp16 at this batch and resolution), scaled to a UNet of ``unet_params`` frozen parameters."""
    from kolors_job.core.settings import Settings

    results = Results(cache_file(Settings().cache_dir))
    step = results.get(TrainStep(batch_size, resolution, "fp16", "fp16", checkpointing=False))
    return step.transient * unet_params / results.get(Count("unet")).peak
