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

import functools
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers.training_utils import free_memory

from kolors_job.core.device import resolve_device
from kolors_job.manifest.train import TrainSpec
from kolors_job.train import tracking
from kolors_job.train.adapter import lora_digest, save_lora
from kolors_job.train.checkpoints import (
    EMA_DIR,
    check_checkpoint,
    save_checkpoint,
)
from kolors_job.train.data import SampleStream, build_caches
from kolors_job.train.fingerprint import run_fingerprint
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
    weight_dtype_for,
)
from kolors_job.train.step import Run, train_step

if TYPE_CHECKING:
    from accelerate import Accelerator

    from kolors_job.data.images import ImageItem
    from kolors_job.train.validation import Validator

__all__ = ["TrainResult", "save_final", "train_loop", "train_lora", "training_options"]

log = logging.getLogger(__name__)


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
            free_memory()

    return wrapper


@_resets_accelerate
def train_lora(
    model_dir: Path,
    items: list[ImageItem],
    train: TrainSpec,
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
    Trackers (``train.log_with``) write under ``work_dir/logs/``. ``latent_batch`` (images per VAE encode) and
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
    precision = resolve_precision(train.precision, target)
    accelerator = setup_accelerator(
        train, target, precision, logs_dir=work_dir / tracking.LOGS,
        resume_step=int((resume_state or {}).get("step", 0)),
    )
    dev, world = accelerator.device, accelerator.num_processes
    samples_per_step = train.batch_size * train.gradient_accumulation * world
    caption_dropout = _dropouts(caption_dropout)
    stream = SampleStream(
        len(items), train.seed, train.data_order, repeats=[it.repeats for it in items],
        sizes=[it.bucket or (train.resolution, train.resolution) for it in items], batch_size=train.batch_size,
    )
    n_steps = total_steps(train, stream.n, samples_per_step)
    fingerprint = run_fingerprint(
        train, samples_per_step, items, caption_dropout, precision=precision, identity=identity
    )
    if resume_state is not None and resume_state.get("fingerprint") != fingerprint:
        raise ValueError(
            f"{resume_from}: checkpoint is from a different run configuration "
            f"({resume_state.get('fingerprint')} != {fingerprint}); refusing to resume"
        )
    seed_and_tune(dev, train.seed)

    # 2. Caches: the text encoder and the VAE are done (and gone) before the LoRA exists.
    weight_dtype = weight_dtype_for(precision)
    caches = build_caches(
        Path(model_dir), items, train, vae_dir=vae_dir, train_vae_dir=train_vae_dir, precision=precision,
        weight_dtype=weight_dtype,
        dev=dev, caption_dropout=caption_dropout, extra_texts=validator.texts() if validator else (),
        keep_for_sampling=bool(validator and validator.every), latent_batch=latent_batch,
        text_encoder_device=text_encoder_device,
    )

    # 3. LoRA, optimizer, schedule, accelerate's wrapping; the resumed state on top.
    params, use_ckpt = add_lora(caches.unet, train, dev, dtype=weight_dtype)
    optimizer = make_optimizer(train, params, dev)
    lr_scheduler = make_lr_scheduler(train, optimizer, n_steps)
    ema = make_ema(train, params)
    unet, optimizer = prepare(accelerator, caches.unet, optimizer, lr_scheduler, train, ema)
    run = Run(
        accelerator, train, unet, optimizer, lr_scheduler, params, caches.noise_scheduler,
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
    tracking.start(accelerator, train)

    # 4-5. The loop, checkpointing as it goes.
    bar = _progress_bar(n_steps, start_step, enabled=progress and accelerator.is_main_process)
    log.info(
        "training",
        extra={
            "steps": n_steps,
            "start_step": start_step,
            "images": len(items),
            "world_size": world,
            "batch_size": train.batch_size,
            "gradient_accumulation": train.gradient_accumulation,
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
        options=training_options(train, run.optimizer),
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
    train, accelerator = run.train, run.accelerator
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
        if stop or step % train.checkpoint_every == 0 or step == n_steps:
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








def _agreed_stop(accelerator: Accelerator, should_stop: Callable[[], bool] | None) -> bool:
    """A signal may reach one rank only; every rank must stop at the same step or DDP deadlocks."""
    local = bool(should_stop and should_stop())
    if accelerator.num_processes == 1:
        return local
    flag = torch.tensor(1.0 if local else 0.0, device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum") > 0)




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
        save_lora(accelerator.unwrap_model(run.unet), lora_dir, run.train, extra=extra)
    accelerator.wait_for_everyone()
    return lora_dir


# ------------------------------------------------------------------------------------------- run identity


def training_options(train: TrainSpec, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """The training options of the run, on or off (report.json ``train.options``): the optimizer (with
    Prodigy, its final step-size estimate ``d``), the loss weighting (γ with ``min_snr``), the noise offset,
    DoRA, the EMA (its decay cap when on)."""
    out: dict[str, Any] = {"optimizer": train.optimizer, "loss_weighting": train.loss_weighting}
    if train.loss_weighting == "min_snr":
        out["snr_gamma"] = train.snr_gamma
    out.update(noise_offset=train.noise_offset, dora=train.dora, ema=train.ema)
    if train.ema:
        out["ema_decay"] = train.ema_decay
    if train.optimizer == "prodigy" and optimizer is not None:
        out["prodigy_d"] = float(optimizer.param_groups[0]["d"])
    return out


def _dropouts(caption_dropout: float | Sequence[float]) -> float | list[float]:
    """One probability when every dataset has the same (as the fingerprint always recorded it), else the list."""
    if isinstance(caption_dropout, (int, float)):
        return float(caption_dropout)
    values = [float(p) for p in caption_dropout]
    return values[0] if len(set(values)) == 1 else values
