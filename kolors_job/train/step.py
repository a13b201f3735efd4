"""One optimizer step of the LoRA (:func:`train_step`) and everything it reads (:class:`Run`): built by the
trainer's set-up steps (:func:`kolors_job.train.loop.train_lora`), or by the GPU bench on a full-size UNet.

``gradient_accumulation`` micro-batches on every rank, each assembled from the caches as a pure function of
``(seed, global sample index)``; the denoising loss (the mean squared error, or Min-SNR-γ weighted); the
gradient norm (clipped if asked); the optimizer, the EMA and the lr schedule; one host sync for the loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias

from kolors_job.manifest.train import TrainSpec
from kolors_job.models.prompts import PromptEmbeds
from kolors_job.train.data import Batch, SampleStream, make_batch
from kolors_job.train.latents import LatentEntry

if TYPE_CHECKING:
    from accelerate import Accelerator

    from kolors_job.data.images import ImageItem
    from kolors_job.train.validation import Validator

__all__ = ["Run", "StepOutput", "min_snr_weights", "train_step"]


@dataclass
class Run:
    """Everything one optimizer step reads or updates: built by the setup steps, or by the bench."""

    accelerator: Accelerator
    train: TrainSpec
    unet: torch.nn.Module
    """As ``accelerator.prepare`` returned it (DDP-wrapped under torchrun)."""
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    params: list[torch.nn.Parameter]
    """The LoRA parameters (fp32), what the gradient norm is taken over."""
    noise_scheduler: Any
    stream: SampleStream
    items: Sequence[ImageItem]
    latents: dict[tuple[int, bool], LatentEntry]
    prompts: dict[str, PromptEmbeds]
    scaling_factor: float
    prediction_type: str
    num_train_timesteps: int
    weight_dtype: torch.dtype
    caption_dropout: float | Sequence[float]
    """One probability, or one per dataset (``ImageItem.dataset``)."""
    validator: Validator | None = None
    sampling: Any = None
    """``Caches.sampling``: what validation builds its pipeline from."""
    texts: dict[str, PromptEmbeds] = field(default_factory=dict)
    """Validation's prompt embeddings."""
    ema: Any = None
    """``train.ema``: diffusers' ``EMAModel`` over ``params``, stepped after each optimizer step."""

    @property
    def samples_per_step(self) -> int:
        return self.train.batch_size * self.train.gradient_accumulation * self.accelerator.num_processes


@dataclass
class StepOutput:
    loss: float
    """Mean over the step's micro-batches and all ranks."""
    grad_norm: float
    lr: float
    """The learning rate after the schedule's step (what the log shows for this step)."""


def train_step(run: Run, step: int) -> StepOutput:
    """Optimizer step ``step`` (1-based): ``gradient_accumulation`` micro-batches on every rank, the
    gradient norm (clipped if asked), AdamW, the lr schedule; one host sync for the loss."""
    train, accelerator, dev = run.train, run.accelerator, run.accelerator.device
    world, rank = accelerator.num_processes, accelerator.process_index
    step_loss, grad_norm = torch.zeros((), device=dev), math.nan
    for micro in range(train.gradient_accumulation):
        base = (step - 1) * run.samples_per_step + (micro * world + rank) * train.batch_size
        batch = make_batch(
            range(base, base + train.batch_size),
            run.stream,
            run.items,
            run.latents,
            run.prompts,
            num_train_timesteps=run.num_train_timesteps,
            scaling_factor=run.scaling_factor,
            caption_dropout=run.caption_dropout,
            random_flip=train.random_flip,
            latent=train.latent,
            time_ids=train.time_ids,
            noise_offset=train.noise_offset,
        )
        with accelerator.accumulate(run.unet):
            loss = _loss(
                run.unet, run.noise_scheduler, batch, dev, run.weight_dtype, run.prediction_type,
                snr_gamma=train.snr_gamma if train.loss_weighting == "min_snr" else None,
            )
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                grad_norm = _grad_norm(accelerator, run.params, train.max_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        step_loss += loss.detach() / train.gradient_accumulation
    if not accelerator.sync_gradients:
        raise RuntimeError("gradient accumulation fell out of step with accelerate's counter")
    if run.ema is not None:
        run.ema.step(run.params)  # once per optimizer step, after it
    run.lr_scheduler.step()
    loss_value = float(accelerator.reduce(step_loss, reduction="mean"))
    return StepOutput(loss=loss_value, grad_norm=grad_norm, lr=run.lr_scheduler.get_last_lr()[0])


def _loss(
    unet: torch.nn.Module,
    noise_scheduler: Any,
    batch: Batch,
    dev: torch.device,
    weight_dtype: torch.dtype,
    prediction_type: str,
    *,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """The denoising loss of one micro-batch: the mean squared error (the reference), or with ``snr_gamma``
    each sample's mean error weighted by :func:`min_snr_weights` before the batch mean."""
    latents = batch.latents.to(dev)
    noise = batch.noise.to(dev)
    timesteps = batch.timesteps.to(dev)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    pred = unet(
        noisy,
        timesteps,
        encoder_hidden_states=batch.embeds.to(dev, weight_dtype),
        added_cond_kwargs={
            "text_embeds": batch.pooled.to(dev, weight_dtype),
            "time_ids": batch.time_ids.to(dev),  # fp32: sizes like 1537 are not exact in bf16
        },
        return_dict=False,
    )[0]
    target = (
        noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
    )
    if snr_gamma is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
    return (per_sample * min_snr_weights(noise_scheduler, timesteps, snr_gamma, prediction_type)).mean()


def min_snr_weights(
    noise_scheduler: Any, timesteps: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Min-SNR-γ's per-sample weights as diffusers' ``train_text_to_image_lora_sdxl.py`` computes them:
    min(SNR(t), γ) / SNR(t) for an epsilon model, / (SNR(t) + 1) for v-prediction; SNR(t) from the model's
    own schedule by ``diffusers.training_utils.compute_snr``."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    return clipped / (snr if prediction_type == "epsilon" else snr + 1)


def _grad_norm(accelerator: Accelerator, params: list[torch.nn.Parameter], max_norm: float | None) -> float:
    """The (unscaled) total gradient norm, clipped to ``max_norm`` when set. Without a limit the clip is by
    inf, an exact no-op that still unscales fp16 gradients and measures them (the reference never clips)."""
    return float(accelerator.clip_grad_norm_(params, max_norm if max_norm else math.inf))
