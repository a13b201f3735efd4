"""Kolors LoRA training as a recipe of named steps (after diffusers' ``train_text_to_image_lora_sdxl.py``).

:func:`train_lora` reads top to bottom:

1. :func:`setup_accelerator`: the precision (CPU: fp32; CUDA: fp16 with a GradScaler, like the
   reference; bf16 on request) and an ``Accelerator``; the same code then runs single-process or under
   ``torchrun``/``accelerate launch`` (DDP).
2. :func:`~kolors_job.train.data.build_caches`: load the model, encode every distinct caption and every
   image (both flips if ``random_flip``) once; then drop the text encoder and the VAE.
3. :func:`add_lora`, :func:`make_optimizer`, :func:`make_lr_scheduler`, :func:`prepare`: a peft LoRA on
   the UNet's attention projections; AdamW + a diffusers lr schedule; accelerate's wrapping and the
   checkpoint hooks; :func:`resume` from a checkpoint when given one.
4. the loop: :func:`train_step` is one optimizer step. Every random choice of a sample (latent draw,
   noise, timestep, caption dropout, flip) comes from a generator seeded by ``(seed, global sample
   index)`` and the data order from the seed too (a random image per sample, or one permutation per epoch:
   ``train.data_order``), so the run is a pure function of the
   seed and the step: resuming from a checkpoint, or splitting a batch across DDP ranks, sees exactly
   the same samples and noise.
5. checkpoint (see :mod:`kolors_job.train.checkpoints`) every ``checkpoint_every`` steps, at the end, and
   when asked to stop; before a checkpoint that is due, validation frames (:mod:`kolors_job.train.validation`),
   recorded in its ``state.json``. Loss, lr and grad norm go to the trackers (:mod:`kolors_job.train.tracking`).
6. :func:`save_final`: the LoRA in diffusers format with its rank/alpha, so ``load_lora_weights``
   restores the scale.

Kolors-specific conditions (each one a bug in some trainer): ChatGLM embeddings exactly as sampling
computes them (256 tokens, penultimate layer, pooled last token), no second text encoder, SDXL's six
``add_time_ids`` (the reference's constant ``(res, res, 0, 0, res, res)`` or each image's real resize/crop:
``train.time_ids``), the model's own noise schedule (scaled_linear
0.00085→0.014 over 1100 steps, t drawn from all of them), epsilon or v-prediction per its config.
"""

from __future__ import annotations

import argparse
import functools
import gc
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias

from kolors_job.core.device import resolve_device
from kolors_job.export.lora_io import LORA_CONFIG_NAME, LORA_WEIGHT_NAME
from kolors_job.manifest.train import TrainSpec
from kolors_job.models.prompts import PromptEmbeds
from kolors_job.train import tracking
from kolors_job.train.adapter import lora_digest, save_lora
from kolors_job.train.checkpoints import (
    COMPLETE_NAME,
    EMA_DIR,
    KEEP_LOCAL_CHECKPOINTS,
    STATE_NAME,
    check_checkpoint,
    save_checkpoint,
)
from kolors_job.train.data import Batch, SampleStream, build_caches, make_batch
from kolors_job.train.latents import LatentEntry
from kolors_job.train.setup import (
    _reset_accelerate_state,
    add_lora,
    ema_weights,
    make_ema,
    make_lr_scheduler,
    make_optimizer,
    prepare,
    resolve_precision,
    resume,
    seed_and_tune,
    setup_accelerator,
    total_steps,
    want_checkpointing,
    weight_dtype_for,
)

if TYPE_CHECKING:
    from accelerate import Accelerator

    from kolors_job.data.scan import ImageItem
    from kolors_job.train.validation import Validator

__all__ = [  # what other modules and tests import from here
    "COMPLETE_NAME",
    "KEEP_LOCAL_CHECKPOINTS",
    "LORA_CONFIG_NAME",
    "LORA_WEIGHT_NAME",
    "STATE_NAME",
    "Batch",
    "Run",
    "SampleStream",
    "StepOutput",
    "TrainResult",
    "_reset_accelerate_state",
    "add_lora",
    "check_checkpoint",
    "make_batch",
    "make_lr_scheduler",
    "make_optimizer",
    "prepare",
    "resolve_device",
    "resolve_precision",
    "resume",
    "save_final",
    "save_lora",
    "setup_accelerator",
    "train_loop",
    "train_lora",
    "train_step",
    "want_checkpointing",
    "weight_dtype_for",
]

log = logging.getLogger("kolors_job.train.loop")


@dataclass
class TrainResult:
    lora_dir: Path
    """Diffusers-format LoRA (``pytorch_lora_weights.safetensors``, rank/alpha in its metadata, and
    ``lora_config.json``); when ``interrupted``, the last checkpoint's directory, which holds both files."""
    steps: int
    """Optimizer steps done (the resumed ones included)."""
    losses: list[float]
    """Mean loss of each optimizer step, over its micro-batches and all ranks."""
    seconds: float
    peak_memory_bytes: int | None
    precision: str
    """accelerate's ``mixed_precision``: ``no`` (fp32), ``bf16`` or ``fp16``."""
    gradient_checkpointing: bool
    interrupted: bool
    samples_seen: int
    lora_sha256: str = ""
    """Digest of the LoRA tensors as *this rank* holds them: equal on all DDP ranks, equal across reruns."""
    checkpoints: list[Path] = field(default_factory=list)
    """Checkpoints written by this call (only the newest ``KEEP_LOCAL_CHECKPOINTS`` stay on local disk)."""
    validation: list[dict[str, Any]] = field(default_factory=list)
    """Every validation point of the run (resumed ones included), ``ValidationPoint.to_dict()``."""
    options: dict[str, Any] = field(default_factory=dict)
    """The training options in effect (:func:`training_options`)."""

    def summary(self) -> dict[str, Any]:
        """What the job records of a finished run (``_state/train.json``, report.json's ``train``)."""
        keys = ("steps", "losses", "seconds", "peak_memory_bytes", "precision", "gradient_checkpointing",
                "samples_seen", "lora_sha256", "options")
        return {k: getattr(self, k) for k in keys}


@dataclass
class Run:
    """Everything one optimizer step reads or updates: built by the setup steps, or by the bench."""

    accelerator: Accelerator
    spec: TrainSpec
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
        return self.spec.batch_size * self.spec.gradient_accumulation * self.accelerator.num_processes


@dataclass
class StepOutput:
    loss: float
    """Mean over the step's micro-batches and all ranks."""
    grad_norm: float
    lr: float
    """The learning rate after the schedule's step (what the log shows for this step)."""


# ------------------------------------------------------------------------------------------- the recipe


def _resets_accelerate(fn: Callable[..., TrainResult]) -> Callable[..., TrainResult]:
    """accelerate's state is a process-wide singleton: reset it (keeping the process group) however a run
    ends, so a later call — a test, a resume in the same process — may pick another precision; free the GPU."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> TrainResult:
        try:
            return fn(*args, **kwargs)
        finally:
            _reset_accelerate_state()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    return wrapper


@_resets_accelerate
def train_lora(
    model_dir: Path,
    items: list[ImageItem],
    spec: TrainSpec,
    *,
    work_dir: Path,
    vae_dir: Path | None = None,
    train_vae_dir: Path | None = None,
    device: str | None = None,
    resume_from: Path | None = None,
    on_checkpoint: Callable[[Path, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress: bool = True,
    caption_dropout: float | Sequence[float] = 0.0,
    validator: Validator | None = None,
    latent_batch: int = 8,
    text_encoder_device: str | None = None,
    identity: str = "",
) -> TrainResult:
    """Train a LoRA on the UNet of the Kolors model at ``model_dir``; see the module docstring for the recipe.

    ``caption_dropout`` is ``spec.dataset.caption.dropout`` (it lives outside ``TrainSpec``), or with several
    datasets one per dataset, indexed by ``ImageItem.dataset``. The items' ``bucket`` and ``repeats``
    (``dataset.buckets``, ``dataset.repeats``) shape the batches (:class:`SampleStream`). Under DDP
    every rank calls this with the same arguments; only rank 0 writes files and calls ``on_checkpoint``.
    ``validator`` (:mod:`kolors_job.train.validation`) draws and scores frames at the checkpoints it says are due.
    Trackers (``spec.log_with``) write under ``work_dir/logs/``. ``latent_batch`` (images per VAE encode) and
    ``text_encoder_device`` (``cpu``: ChatGLM encodes there) come from the memory plan (:mod:`kolors_job.plan`).
    ``identity`` (the job's manifest digest) goes into the fingerprint every checkpoint records, so no other
    job's checkpoint is ever resumed.
    """
    start_time = time.monotonic()
    if not items:
        raise ValueError("train_lora: no training images")
    work_dir = Path(work_dir)
    resume_state = check_checkpoint(Path(resume_from)) if resume_from is not None else None

    # 1. Precision, accelerator; the run's fingerprint must match the checkpoint's.
    target = resolve_device(device)
    precision = resolve_precision(spec.precision, target)
    accelerator = setup_accelerator(
        spec, target, precision, logs_dir=work_dir / tracking.LOGS, resume_step=int((resume_state or {}).get("step", 0))
    )
    dev, world = accelerator.device, accelerator.num_processes
    samples_per_step = spec.batch_size * spec.gradient_accumulation * world
    caption_dropout = _dropouts(caption_dropout)
    stream = SampleStream(
        len(items), spec.seed, spec.data_order, repeats=[it.repeats for it in items],
        sizes=[it.bucket or (spec.resolution, spec.resolution) for it in items], batch_size=spec.batch_size,
    )
    n_steps = total_steps(spec, stream.n, samples_per_step)
    fingerprint = _normalise(
        {**_fingerprint(spec, samples_per_step, items, caption_dropout), "precision": precision, "job": identity}
    )
    if resume_state is not None and resume_state.get("fingerprint") != fingerprint:
        raise ValueError(
            f"{resume_from}: checkpoint is from a different run configuration "
            f"({resume_state.get('fingerprint')} != {fingerprint}); refusing to resume"
        )
    seed_and_tune(dev, spec.seed)

    # 2. Caches: the text encoder and the VAE are done (and gone) before the LoRA exists.
    weight_dtype = weight_dtype_for(precision)
    caches = build_caches(
        Path(model_dir), items, spec, vae_dir=vae_dir, train_vae_dir=train_vae_dir, precision=precision,
        weight_dtype=weight_dtype,
        dev=dev, caption_dropout=caption_dropout, extra_texts=validator.texts() if validator else (),
        keep_for_sampling=bool(validator and validator.every), latent_batch=latent_batch,
        text_encoder_device=text_encoder_device,
    )

    # 3. LoRA, optimizer, schedule, accelerate's wrapping; the resumed state on top.
    params, use_ckpt = add_lora(caches.unet, spec, dev, dtype=weight_dtype)
    optimizer = make_optimizer(spec, params, dev)
    lr_scheduler = make_lr_scheduler(spec, optimizer, n_steps)
    ema = make_ema(spec, params)
    unet, optimizer = prepare(accelerator, caches.unet, optimizer, lr_scheduler, spec, ema)
    run = Run(
        accelerator, spec, unet, optimizer, lr_scheduler, params, caches.noise_scheduler,
        stream, items, caches.latents, caches.prompts,
        caches.scaling_factor, caches.prediction_type, caches.num_train_timesteps, weight_dtype, caption_dropout,
        validator, caches.sampling, caches.texts, ema,
    )
    del caches, unet, optimizer, lr_scheduler, params, ema, stream
    start_step, losses = resume(accelerator, resume_from, resume_state)
    if run.ema is not None:
        run.ema.to(dev)  # accelerate loads a checkpoint's custom state on the CPU
    if validator is not None and resume_state is not None:
        validator.restore(resume_state.get("validation", []))
    tracking.start(accelerator, spec)

    # 4-5. The loop, checkpointing as it goes.
    bar = _progress_bar(n_steps, start_step, enabled=progress and accelerator.is_main_process)
    log.info(
        "training",
        extra={
            "steps": n_steps,
            "start_step": start_step,
            "images": len(items),
            "world_size": world,
            "batch_size": spec.batch_size,
            "gradient_accumulation": spec.gradient_accumulation,
            "precision": precision,
            "gradient_checkpointing": use_ckpt,
            "device": str(dev),
        },
    )
    state = {"fingerprint": fingerprint, "precision": precision, "world_size": world}
    step, losses, checkpoints, interrupted = train_loop(
        run, start_step, n_steps, losses, work_dir=work_dir, run_state=state, on_checkpoint=on_checkpoint,
        should_stop=should_stop, bar=bar,
    )

    # 6. The LoRA (the same weights on every rank).
    tracking.end(accelerator)
    if run.ema is not None:  # from here on the LoRA is the average: the final file, its digest
        run.ema.copy_to(run.params)
    lora_dir = save_final(run, work_dir, step, checkpoints[-1] if interrupted else None)
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    digest = lora_digest(accelerator.unwrap_model(run.unet))
    result = TrainResult(
        lora_dir=lora_dir,
        steps=step,
        losses=losses,
        seconds=time.monotonic() - start_time,
        peak_memory_bytes=peak,
        precision=precision,
        gradient_checkpointing=use_ckpt,
        interrupted=interrupted,
        samples_seen=step * samples_per_step,
        lora_sha256=digest,
        checkpoints=checkpoints,
        validation=[p.to_dict() for p in validator.points] if validator else [],
        options=training_options(spec, run.optimizer),
    )
    # Release everything before sampling loads its own pipeline.
    del run
    accelerator.free_memory()
    skip = ("losses", "checkpoints", "validation")
    log.info("trained", extra={k: v for k, v in asdict(result).items() if k not in skip})
    return result


# ------------------------------------------------------------------------------------------- the loop


def train_loop(
    run: Run,
    start_step: int,
    n_steps: int,
    losses: list[float],
    *,
    work_dir: Path,
    run_state: dict[str, Any],
    on_checkpoint: Callable[[Path, int], None] | None,
    should_stop: Callable[[], bool] | None,
    bar: Any,
) -> tuple[int, list[float], list[Path], bool]:
    """Steps ``start_step + 1 .. n_steps``, checkpointing every ``checkpoint_every``, at the end and on
    an agreed stop; (last step, all losses, checkpoints written, interrupted). ``run_state``: what each
    ``state.json`` says of the run besides the step; ``bar``: a tqdm bar (closed here) or None."""
    spec, accelerator = run.spec, run.accelerator
    checkpoints: list[Path] = []
    interrupted = False
    run.unet.train()
    step = start_step
    if start_step and _due(run, start_step, n_steps):  # stopped right at a validation step: it was skipped
        _validate(run, start_step)
    for step in range(start_step + 1, n_steps + 1):
        out = train_step(run, step)
        losses.append(out.loss)
        if not math.isfinite(out.loss):
            raise FloatingPointError(f"loss is {out.loss} at step {step}")
        # On a TTY the bar carries step/total, loss, lr, it/s and ETA; the per-step line is for logs.
        fields = {"step": step, "total": n_steps, "loss": out.loss, "lr": out.lr, "grad_norm": out.grad_norm}
        log.log(logging.INFO if bar is None else logging.DEBUG, "step", extra=fields)
        tracking.log_step(accelerator, step, out.loss, out.lr, out.grad_norm)
        if bar is not None:
            bar.set_postfix(loss=f"{out.loss:.4g}", lr=f"{out.lr:.3g}", refresh=False)
            bar.update(1)

        stop = _agreed_stop(accelerator, should_stop)
        if stop or step % spec.checkpoint_every == 0 or step == n_steps:
            # before the checkpoint, which records it; on a stop only the last (the selection needs it)
            if _due(run, step, n_steps) and (not stop or step == n_steps):
                _validate(run, step)
            seen = step * run.samples_per_step
            state = {
                "step": step,
                "total_steps": n_steps,
                "samples_seen": seen,
                "epoch": seen // run.stream.n,
                "position": seen % run.stream.n,
                "losses": losses,
                "fingerprint": run_state["fingerprint"],
                "precision": run_state["precision"],
                "world_size": run_state["world_size"],
                "validation": [p.to_dict() for p in run.validator.points] if run.validator else [],
            }
            tracking.flush(accelerator)  # the events so far go up with the checkpoint
            checkpoints.append(save_checkpoint(accelerator, work_dir, step, state, on_checkpoint))
        if stop and step < n_steps:
            interrupted = True
            log.warning("stopping at step %d on request; checkpoint saved", step, extra={"step": step})
            break
    if bar is not None:
        bar.close()
    return step, losses, checkpoints, interrupted


def _due(run: Run, step: int, n_steps: int) -> bool:
    return run.validator is not None and run.validator.due(step, n_steps)


def _validate(run: Run, step: int) -> None:
    """Rank 0 draws and scores the validation frames (see :mod:`kolors_job.train.validation`) while the other ranks
    wait; every rank then holds the same points, so every rank's checkpoint state agrees."""
    accelerator, validator = run.accelerator, run.validator
    assert validator is not None
    shared: list[Any] = [None]
    if accelerator.is_main_process:
        unet = accelerator.unwrap_model(run.unet)
        with ema_weights(run.ema, unet):  # the LoRA being trained, as it would be exported now
            point, images = validator.run(unet, run.sampling, run.texts, step)
        tracking.log_validation(accelerator, point, images)
        shared = [point]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(shared)  # the others wait here while rank 0 draws
        if not accelerator.is_main_process:
            validator.add(shared[0])


def train_step(run: Run, step: int) -> StepOutput:
    """Optimizer step ``step`` (1-based): ``gradient_accumulation`` micro-batches on every rank, the
    gradient norm (clipped if asked), AdamW, the lr schedule; one host sync for the loss."""
    spec, accelerator, dev = run.spec, run.accelerator, run.accelerator.device
    world, rank = accelerator.num_processes, accelerator.process_index
    step_loss, grad_norm = torch.zeros((), device=dev), math.nan
    for micro in range(spec.gradient_accumulation):
        base = (step - 1) * run.samples_per_step + (micro * world + rank) * spec.batch_size
        batch = make_batch(
            range(base, base + spec.batch_size),
            run.stream,
            run.items,
            run.latents,
            run.prompts,
            num_train_timesteps=run.num_train_timesteps,
            scaling_factor=run.scaling_factor,
            caption_dropout=run.caption_dropout,
            random_flip=spec.random_flip,
            latent=spec.latent,
            time_ids=spec.time_ids,
            noise_offset=spec.noise_offset,
        )
        with accelerator.accumulate(run.unet):
            loss = _loss(
                run.unet, run.noise_scheduler, batch, dev, run.weight_dtype, run.prediction_type,
                snr_gamma=spec.snr_gamma if spec.loss_weighting == "min_snr" else None,
            )
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                grad_norm = _grad_norm(accelerator, run.params, spec.max_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        step_loss += loss.detach() / spec.gradient_accumulation
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


def _agreed_stop(accelerator: Accelerator, should_stop: Callable[[], bool] | None) -> bool:
    """A signal may reach one rank only; every rank must stop at the same step or DDP deadlocks."""
    local = bool(should_stop and should_stop())
    if accelerator.num_processes == 1:
        return local
    flag = torch.tensor(1.0 if local else 0.0, device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum") > 0)


def _grad_norm(accelerator: Accelerator, params: list[torch.nn.Parameter], max_norm: float | None) -> float:
    """The (unscaled) total gradient norm, clipped to ``max_norm`` when set. Without a limit the clip is by
    inf, an exact no-op that still unscales fp16 gradients and measures them (the reference never clips)."""
    return float(accelerator.clip_grad_norm_(params, max_norm if max_norm else math.inf))


def _progress_bar(total: int, done: int, *, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="train", unit="step", dynamic_ncols=True)


# ------------------------------------------------------------------------------------------- save


def save_final(run: Run, work_dir: Path, step: int, interrupted_at: Path | None) -> Path:
    """The final LoRA, written once per node (the story reads it on each); an interrupted run's LoRA
    is its last checkpoint, which holds the same files (with ``train.ema``, the average in its ``ema/``)."""
    accelerator = run.accelerator
    lora_dir = work_dir / "lora"
    if interrupted_at is not None:
        lora_dir = interrupted_at / EMA_DIR if run.ema is not None else interrupted_at
    elif accelerator.is_local_main_process:
        shutil.rmtree(lora_dir, ignore_errors=True)
        extra = {"steps": step, **({"ema": True} if run.ema is not None else {})}
        save_lora(accelerator.unwrap_model(run.unet), lora_dir, run.spec, extra=extra)
    accelerator.wait_for_everyone()
    return lora_dir


# ------------------------------------------------------------------------------------------- run identity


def training_options(spec: TrainSpec, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """The training options of the run, on or off (report.json ``train.options``): the optimizer (with
    Prodigy, its final step-size estimate ``d``), the loss weighting (γ with ``min_snr``), the noise offset,
    DoRA, the EMA (its decay cap when on)."""
    out: dict[str, Any] = {"optimizer": spec.optimizer, "loss_weighting": spec.loss_weighting}
    if spec.loss_weighting == "min_snr":
        out["snr_gamma"] = spec.snr_gamma
    out.update(noise_offset=spec.noise_offset, dora=spec.dora, ema=spec.ema)
    if spec.ema:
        out["ema_decay"] = spec.ema_decay
    if spec.optimizer == "prodigy" and optimizer is not None:
        out["prodigy_d"] = float(optimizer.param_groups[0]["d"])
    return out


_OPTION_KEYS = ("loss_weighting", "snr_gamma", "noise_offset", "dora", "ema", "ema_decay")
"""Training options added after the fingerprint's first keys: they count only when set away from their
defaults, so a run without them keeps the fingerprint it had (and its checkpoints stay resumable)."""


def _fingerprint(
    spec: TrainSpec, samples_per_step: int, items: Sequence[ImageItem], caption_dropout: float | list[float]
) -> dict[str, Any]:
    """What must match for a resumed run to continue the same run: everything that decides the weights (the
    math, the data and its order: each image's name, size and caption) — the caller adds the job's identity.
    The datasets' buckets and repeats count only where used, for the same reason as ``_OPTION_KEYS``."""
    data = hashlib.sha256()
    for item in items:  # names as bytes: a dataset's file names need not be UTF-8
        data.update(os.fsencode(Path(item.path).name) + b"\0" + item.caption.encode("utf-8", "surrogatepass"))
        data.update(f"\0{item.width}x{item.height}\n".encode())
    keys = (
        "rank",
        "batch_size",
        "gradient_accumulation",
        "alpha",
        "learning_rate",
        "steps",
        "epochs",
        "resolution",
        "center_crop",
        "random_flip",
        "target_modules",
        "init_lora_weights",
        "latent",
        "time_ids",
        "resize_filter",
        "data_order",
        "exif_orientation",
        "jpeg_reencode",
        "optimizer",
        "weight_decay",
        "max_grad_norm",
        "lr_scheduler",
        "warmup_steps",
        "seed",
    )
    defaults = TrainSpec()
    layout: dict[str, Any] = {}
    if any(it.bucket for it in items):
        layout["buckets"] = [list(it.bucket) if it.bucket else None for it in items]
    if any(it.repeats != 1 for it in items):
        layout["repeats"] = [it.repeats for it in items]
    return {
        **{k: getattr(spec, k) for k in keys},
        **{k: getattr(spec, k) for k in _OPTION_KEYS if getattr(spec, k) != getattr(defaults, k)},
        "samples_per_step": samples_per_step,
        "items": len(items),
        "data": data.hexdigest(),
        "caption_dropout": caption_dropout,
        **layout,
    }


def _dropouts(caption_dropout: float | Sequence[float]) -> float | list[float]:
    """One probability when every dataset has the same (as the fingerprint always recorded it), else the list."""
    if isinstance(caption_dropout, (int, float)):
        return float(caption_dropout)
    values = [float(p) for p in caption_dropout]
    return values[0] if len(set(values)) == 1 else values


def _normalise(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d))


# ------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m kolors_job.train.loop`` (also under ``torchrun``): train from JSON inputs (tests, launches)."""
    from kolors_job.data.scan import ImageItem

    p = argparse.ArgumentParser(prog="python -m kolors_job.train.loop", description=main.__doc__)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument(
        "--items-json", type=Path, required=True,
        help="[{path, caption, width, height[, bucket: [w, h], repeats, dataset]}, ...]",
    )
    p.add_argument("--spec-json", type=Path, help="TrainSpec as JSON (defaults otherwise)")
    p.add_argument("--work-dir", required=True, help="'{rank}' in it is replaced by the process rank")
    p.add_argument("--vae-dir", type=Path)
    p.add_argument("--train-vae-dir", type=Path, help="the VAE that encodes the training images (model.train_vae)")
    p.add_argument("--device")
    p.add_argument("--resume-from", type=Path)
    p.add_argument("--caption-dropout", type=float, default=0.0)
    p.add_argument(
        "--result-json", help="the TrainResult as JSON; rank 0 only unless the path holds '{rank}'"
    )
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    spec = TrainSpec.model_validate_json(args.spec_json.read_text()) if args.spec_json else TrainSpec()
    rows = json.loads(args.items_json.read_text())
    items = [
        ImageItem(
            Path(r["path"]), r["caption"], int(r["width"]), int(r["height"]),
            bucket=tuple(r["bucket"]) if r.get("bucket") else None, repeats=int(r.get("repeats", 1)),
            dataset=int(r.get("dataset", 0)),
        )
        for r in rows
    ]
    result = train_lora(
        args.model_dir,
        items,
        spec,
        work_dir=Path(args.work_dir.format(rank=rank)),
        vae_dir=args.vae_dir,
        train_vae_dir=args.train_vae_dir,
        device=args.device,
        resume_from=args.resume_from,
        caption_dropout=args.caption_dropout,
        progress=not args.no_progress,
    )
    if args.result_json and (rank == 0 or "{rank}" in args.result_json):
        payload = {**asdict(result), "rank": rank}
        Path(args.result_json.format(rank=rank)).write_text(json.dumps(payload, default=str, indent=1))
    return 75 if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
