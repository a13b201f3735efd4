"""The samplers a story may use (``story.scheduler``): each a diffusers scheduler class built from the model's own
scheduler config, with overrides; ``reference`` visits DiffSynth's Kolors DDIM timesteps. A sampler is one entry
of ``SCHEDULERS``: the manifest accepts its name, prompts.json and report.json record it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kolors_job.core.errors import InputError

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

__all__ = ["SCHEDULERS", "Sampler", "make_scheduler", "reference_timesteps", "sampler_timesteps"]


@dataclass(frozen=True)
class Sampler:
    """One ``story.scheduler`` choice: a diffusers class built ``from_config`` of the model's own scheduler
    config (so Kolors' 1100-step, beta_end 0.014 schedule is kept whatever the sampler), with overrides."""

    cls: str
    overrides: dict[str, Any]
    reference_grid: bool = False
    """Visit DiffSynth's Kolors DDIM timesteps (:func:`reference_timesteps`) instead of the class's own."""


SCHEDULERS: dict[str, Sampler] = {
    # The reference: deterministic DDIM over DiffSynth's grid 1099, 1077, ..., 22, 0, then to fully clean.
    # DDIM (eta 0) is Euler in sigma = sqrt((1 - abar) / abar), so Euler on those timesteps is that sampler
    # (diffusers' DDIMScheduler cannot be: it steps to t - 1100 // steps, not to the next grid point).
    "reference": Sampler("EulerDiscreteScheduler", {}, reference_grid=True),
    # Kolors-diffusers' shipped sampler: Euler on the "leading" grid 1079, 1057, ..., 1 (starts below pure noise).
    "euler": Sampler("EulerDiscreteScheduler", {}),
    "euler_a": Sampler("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": Sampler("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": Sampler("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    # diffusers' DDIM on the model's leading grid: *not* the reference's DDIM (other grid, stops at t = 1).
    "ddim": Sampler("DDIMScheduler", {}),
    "unipc": Sampler("UniPCMultistepScheduler", {}),
}
"""Sampler names accepted by ``story.scheduler`` and ``make_pipeline``: the manifest's list is these keys."""


def reference_timesteps(steps: int, num_train_timesteps: int) -> list[int]:
    """The timesteps DiffSynth 1.1.9 samples Kolors over (``EnhancedDDIMScheduler.set_timesteps``,
    diffsynth/schedulers/ddim.py lines 41-50, built with ``num_train_timesteps=1100`` by
    ``SDXLImagePipeline.fetch_models``, diffsynth/pipelines/sdxl_image.py line 68): ``steps`` points
    rounded from a linspace of ``num_train_timesteps - 1`` down to 0; after the last the sample is clean."""
    last = num_train_timesteps - 1
    steps = min(steps, last + 1)
    if steps == 1:
        return [last]
    stride = last / (steps - 1)
    return [round(last - i * stride) for i in range(steps)]


def sampler_timesteps(name: str, steps: int, scheduler_config: dict[str, Any]) -> list[int] | None:
    """Explicit ``timesteps=`` for the pipeline call, or None when the sampler spaces its own grid."""
    if not SCHEDULERS[name].reference_grid:
        return None
    return reference_timesteps(steps, int(scheduler_config["num_train_timesteps"]))


def make_scheduler(name: str, config: Any) -> SchedulerMixin:
    """A fresh ``SCHEDULERS[name]`` built ``from_config`` of the model's scheduler ``config``."""
    import diffusers

    if name not in SCHEDULERS:
        raise InputError(f"unknown scheduler {name!r}: use one of {', '.join(SCHEDULERS)}")
    sampler = SCHEDULERS[name]
    return getattr(diffusers, sampler.cls).from_config(config, **sampler.overrides)
