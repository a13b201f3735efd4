"""Kolors LoRA training: one file, top to bottom (after diffusers' ``train_text_to_image_lora_sdxl.py``).

The recipe:

1. pick the precision (CPU: fp32; CUDA: fp16 with a GradScaler, like the reference; bf16 on request) and
   build an ``Accelerator``;
   the same code then runs single-process or under ``torchrun``/``accelerate launch`` (DDP).
2. load the model, encode every distinct caption with ``KolorsPipeline.encode_prompt`` and every image
   (both flips if ``random_flip``) with the VAE, once; then drop the text encoder and the VAE.
3. add a peft LoRA to the UNet's attention projections; AdamW + a diffusers lr schedule.
4. loop over optimizer steps. Every random choice of a sample (latent draw, noise, timestep, caption
   dropout, flip) comes from a generator seeded by ``(seed, global sample index)`` and the data order
   from one permutation per epoch, so the run is a pure function of the seed and the step: resuming
   from a checkpoint, or splitting a batch across DDP ranks, sees exactly the same samples and noise.
5. checkpoint (LoRA + optimizer + lr schedule + RNG via ``accelerator.save_state``, ``state.json``,
   ``COMPLETE`` last) every ``checkpoint_every`` steps, at the end, and when asked to stop.
6. write the LoRA in diffusers format with its rank/alpha, so ``load_lora_weights`` restores the scale.

Kolors-specific conditions (each one a bug in some trainer): ChatGLM embeddings exactly as sampling
computes them (256 tokens, penultimate layer, pooled last token), no second text encoder, SDXL's six
``add_time_ids`` from each image's real resize/crop, the model's own noise schedule (scaled_linear
0.00085→0.014 over 1100 steps, t drawn from all of them), epsilon or v-prediction per its config.
"""

from __future__ import annotations

import argparse
import contextlib
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

from kolors_job.embeddings import LatentEntry, PromptEmbeds, cache_latents, encode_captions, mix_seed
from kolors_job.errors import ManifestError
from kolors_job.export.lora_io import LORA_CONFIG_NAME, LORA_WEIGHT_NAME, canonical_safetensors
from kolors_job.manifest import TrainSpec

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers import UNet2DConditionModel

    from kolors_job.dataset import ImageItem

log = logging.getLogger("kolors_job.train")

STATE_NAME = "state.json"
COMPLETE_NAME = "COMPLETE"
KEEP_LOCAL_CHECKPOINTS = 2
"""Older local checkpoints are deleted once a newer one is complete (and handed to ``on_checkpoint``)."""
GIB = 1 << 30

# Design §2: full Kolors UNet, 1024², batch 1, LoRA r16, no grad-ckpt: 12.7 GiB peak, 5.2 GiB of it weights.
_ACTIVATION_BYTES_1024 = 7.5 * GIB
_KOLORS_UNET_PARAMS = 2.579e9


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


# ------------------------------------------------------------------------------------------- decisions


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(requested: str, device: torch.device) -> str:
    """accelerate's ``mixed_precision`` for ``spec.precision``: CPU fp32; GPU fp16 mixed (the reference's
    Lightning ``16-mixed``: fp16 weights and autocast, fp32 LoRA, GradScaler) unless bf16 is asked for."""
    if requested == "fp32":
        return "no"
    if device.type != "cuda":
        if requested == "fp16":
            raise ManifestError(
                "spec.train.precision: fp16 needs a CUDA GPU; use auto, bf16 or fp32 on a CPU"
            )
        return "bf16" if requested == "bf16" else "no"
    return "fp16" if requested == "auto" else requested


def _weight_dtype(precision: str) -> torch.dtype:
    return {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def activation_estimate_bytes(unet_params: int, batch_size: int, resolution: int) -> float:
    """Rough activation memory of a LoRA step without checkpointing, scaled from the measured anchor."""
    return (
        _ACTIVATION_BYTES_1024 * (unet_params / _KOLORS_UNET_PARAMS) * batch_size * (resolution / 1024) ** 2
    )


def want_checkpointing(
    setting: str, device: torch.device, *, unet_params: int, batch_size: int, resolution: int
) -> bool:
    """``auto``: off on CPU; on a GPU, on only when the activations (+20 %, +1 GiB) won't fit in free memory.

    Checkpointing costs ~2x step time (design §2: 1368 vs 629 ms), so it must not be on just in case.
    Call after the UNet is on the device: its weights are then already out of the free memory.
    """
    if setting != "auto":
        return setting == "on"
    if device.type != "cuda":
        return False
    free, _total = torch.cuda.mem_get_info(device)
    need = activation_estimate_bytes(unet_params, batch_size, resolution) * 1.2 + GIB
    return free < need


def total_steps(spec: TrainSpec, n_items: int, samples_per_step: int) -> int:
    if spec.steps is not None:
        return spec.steps
    return max(1, math.ceil(spec.epochs * n_items / samples_per_step))


# ------------------------------------------------------------------------------------------- data order


class SampleStream:
    """Maps a global sample index to (item, random draws); the same index always gives the same sample.

    Epoch ``e`` visits the items in ``randperm(n, seed(seed, e))``. Sample ``g`` of the run is position
    ``g % n`` of epoch ``g // n``; a DDP rank takes the indices of its slice of each step. Nothing
    depends on what ran before, which is what makes resume and DDP splits bit-reproducible.
    """

    def __init__(self, n_items: int, seed: int) -> None:
        self.n = n_items
        self.seed = seed
        self._perms: dict[int, list[int]] = {}

    def item(self, g: int) -> int:
        epoch, pos = divmod(g, self.n)
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, "epoch", epoch))
            self._perms = {epoch: torch.randperm(self.n, generator=gen).tolist()}  # keep one epoch
        return self._perms[epoch][pos]

    def generator(self, g: int) -> torch.Generator:
        return torch.Generator().manual_seed(mix_seed(self.seed, "sample", g))


@dataclass
class Batch:
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    embeds: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor
    captions: list[str]
    items: list[int]
    flips: list[bool]


def make_batch(
    indices: Sequence[int],
    stream: SampleStream,
    items: Sequence[ImageItem],
    latents: dict[tuple[int, bool], LatentEntry],
    prompts: dict[str, PromptEmbeds],
    *,
    num_train_timesteps: int,
    scaling_factor: float,
    caption_dropout: float,
    random_flip: bool,
    latent: str = "sample",
    time_ids: str = "crop",
) -> Batch:
    """Assemble samples on the CPU. Draw order per sample is fixed (dropout, flip, t, latent eps, noise).

    ``latent`` / ``time_ids``: ``TrainSpec``'s switches (``mean`` / ``target`` are the reference's choices)."""
    lat, noise, ts, emb, pooled, tids, caps, idx, flips = [], [], [], [], [], [], [], [], []
    for g in indices:
        i = stream.item(g)
        gen = stream.generator(g)
        u_drop, u_flip = torch.rand((2,), generator=gen).tolist()  # always drawn: fixed stream layout
        drop = u_drop < caption_dropout
        flip = random_flip and u_flip < 0.5
        t = torch.randint(0, num_train_timesteps, (), generator=gen)
        entry = latents[(i, flip)]
        eps = torch.randn(entry.mean.shape, generator=gen)  # drawn either way: a fixed stream layout
        lat.append((entry.mean if latent == "mean" else entry.sample(eps)) * scaling_factor)
        noise.append(torch.randn(entry.mean.shape, generator=gen))
        ts.append(t)
        caption = "" if drop else items[i].caption
        caps.append(caption)
        emb.append(prompts[caption].embeds)
        pooled.append(prompts[caption].pooled)
        target = entry.time_ids[4:]  # (h, w) of the training crop
        tid = entry.time_ids if time_ids == "crop" else (*target, 0, 0, *target)
        tids.append(torch.tensor(tid, dtype=torch.float32))
        idx.append(i)
        flips.append(flip)
    return Batch(
        latents=torch.stack(lat),
        noise=torch.stack(noise),
        timesteps=torch.stack(ts).long(),
        embeds=torch.stack(emb),
        pooled=torch.stack(pooled),
        time_ids=torch.stack(tids),
        captions=caps,
        items=idx,
        flips=flips,
    )


# ------------------------------------------------------------------------------------------- LoRA I/O


def lora_metadata(unet: torch.nn.Module) -> dict[str, Any]:
    """The adapter's peft config as stored in the safetensors header; sets sorted so the bytes are stable."""
    cfg = unet.peft_config["default"].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in cfg.items()}


def save_lora(
    unet: torch.nn.Module, out_dir: Path, spec: TrainSpec, extra: dict[str, Any] | None = None
) -> Path:
    """Write the diffusers-format LoRA; rank/alpha go into the header (``load_lora_weights`` reads them
    back, else it would assume alpha = rank: a 4x stronger LoRA for r16/α4) and into ``lora_config.json``."""
    from diffusers import KolorsPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    out_dir.mkdir(parents=True, exist_ok=True)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    layers = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in layers.items()}
    KolorsPipeline.save_lora_weights(
        save_directory=out_dir,
        unet_lora_layers=layers,
        weight_name=LORA_WEIGHT_NAME,
        safe_serialization=True,
        unet_lora_adapter_metadata=lora_metadata(unet),
    )
    canonical_safetensors(out_dir / LORA_WEIGHT_NAME)
    config = {
        "rank": spec.rank,
        "alpha": spec.alpha,
        "scale": spec.alpha / spec.rank,
        "target_modules": list(spec.target_modules),
        "init_lora_weights": spec.init_lora_weights,
        "format": "diffusers",
        "tensors": len(layers),
        **(extra or {}),
    }
    (out_dir / LORA_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def lora_digest(unet: torch.nn.Module) -> str:
    """sha256 over the LoRA tensors (names + fp32 bytes), independent of file headers."""
    from peft.utils import get_peft_model_state_dict

    h = hashlib.sha256()
    for key, value in sorted(get_peft_model_state_dict(unet).items()):
        h.update(key.encode())
        h.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def load_lora_into(unet: torch.nn.Module, lora_dir: Path) -> None:
    """Load a LoRA written by :func:`save_lora` into a peft-adapted UNet (adapter ``default``), strictly."""
    from diffusers import KolorsPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    state, _alphas = KolorsPipeline.lora_state_dict(str(lora_dir), weight_name=LORA_WEIGHT_NAME)
    unet_state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    result = set_peft_model_state_dict(
        unet, convert_unet_state_dict_to_peft(unet_state), adapter_name="default"
    )
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(
            f"{lora_dir}: {len(unexpected)} LoRA keys do not fit this UNet, e.g. {unexpected[0]}"
        )
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise ValueError(f"{lora_dir}: {len(missing)} LoRA tensors missing, e.g. {missing[0]}")


# ------------------------------------------------------------------------------------------- checkpoints


def check_checkpoint(path: Path) -> dict[str, Any]:
    """A resume source must carry ``COMPLETE`` (written last): anything else may be half-written."""
    path = Path(path)
    if not (path / COMPLETE_NAME).is_file():
        raise ValueError(
            f"{path}: not a complete checkpoint (no {COMPLETE_NAME} marker); refusing to resume from it"
        )
    return json.loads((path / STATE_NAME).read_text())


def _fingerprint(
    spec: TrainSpec, samples_per_step: int, n_items: int, caption_dropout: float
) -> dict[str, Any]:
    """What must match for a resumed run to continue the same run (the data order and the math)."""
    keys = (
        "rank",
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
        "optimizer",
        "weight_decay",
        "max_grad_norm",
        "lr_scheduler",
        "warmup_steps",
        "seed",
    )
    return {
        **{k: getattr(spec, k) for k in keys},
        "samples_per_step": samples_per_step,
        "items": n_items,
        "caption_dropout": caption_dropout,
    }


def _normalise(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d))


# ------------------------------------------------------------------------------------------- training


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
    device: str | None = None,
    resume_from: Path | None = None,
    on_checkpoint: Callable[[Path, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress: bool = True,
    caption_dropout: float = 0.0,
) -> TrainResult:
    """Train a LoRA on the UNet of the Kolors model at ``model_dir``; see the module docstring for the recipe.

    ``caption_dropout`` is ``spec.dataset.caption.dropout`` (it lives outside ``TrainSpec``). Under DDP
    every rank calls this with the same arguments; only rank 0 writes files and calls ``on_checkpoint``.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from peft import LoraConfig

    from kolors_job.models import load_kolors_components, make_pipeline

    start_time = time.monotonic()
    if not items:
        raise ValueError("train_lora: no training images")
    work_dir = Path(work_dir)
    resume_state = check_checkpoint(Path(resume_from)) if resume_from is not None else None
    target = resolve_device(device)
    precision = resolve_precision(spec.precision, target)
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=spec.gradient_accumulation,
        cpu=target.type == "cpu",
    )
    dev = accelerator.device
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    weight_dtype = _weight_dtype(precision)
    samples_per_step = spec.batch_size * spec.gradient_accumulation * world
    n_steps = total_steps(spec, len(items), samples_per_step)
    fingerprint = _normalise(_fingerprint(spec, samples_per_step, len(items), caption_dropout))

    if resume_state is not None and resume_state.get("fingerprint") != fingerprint:
        raise ValueError(
            f"{resume_from}: checkpoint is from a different run configuration "
            f"({resume_state.get('fingerprint')} != {fingerprint}); refusing to resume"
        )
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes: ~12 % faster steps (design §2)
        torch.cuda.reset_peak_memory_stats(dev)
    set_seed(spec.seed)  # LoRA A init uses the global RNG; identical on every rank

    # 2. Load, encode captions, cache latents; then the text encoder and VAE leave.
    # fp16 overflows in the SDXL VAE unless it is the fp16-fix one; bf16 has the range.
    vae_dtype = torch.float32 if precision == "fp16" and vae_dir is None else weight_dtype
    comps = load_kolors_components(Path(model_dir), vae_path=vae_dir, dtype=weight_dtype, device="cpu")
    if vae_dtype != weight_dtype:  # reload from disk rather than upcast weights already rounded to fp16
        from diffusers import AutoencoderKL

        comps.vae = AutoencoderKL.from_pretrained(vae_dir or Path(model_dir) / "vae", torch_dtype=vae_dtype)
    pipe = make_pipeline(comps)
    captions = [it.caption for it in items] + ([""] if caption_dropout > 0 else [])
    t0 = time.monotonic()
    comps.text_encoder.to(dev)
    prompts = encode_captions(pipe, captions, device=dev)
    log.info("encoded captions", extra={"captions": len(prompts), "seconds": round(time.monotonic() - t0, 3)})
    # ChatGLM (12.5 GB in bf16) is done: free it before the VAE encodes 1024² images (16 GB cards).
    pipe.text_encoder = comps.text_encoder = None
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    vae = comps.vae.to(dev)
    scaling_factor = float(vae.config.scaling_factor)
    flips = (False, True) if spec.random_flip else (False,)
    t0 = time.monotonic()
    latents = cache_latents(
        vae,
        items,
        resolution=spec.resolution,
        center_crop=spec.center_crop,
        flips=flips,
        seed=spec.seed,
        device=dev,
        dtype=vae_dtype,
        resize_filter=spec.resize_filter,
    )
    log.info("cached latents", extra={"latents": len(latents), "seconds": round(time.monotonic() - t0, 3)})
    unet: UNet2DConditionModel = comps.unet
    noise_scheduler = comps.noise_scheduler
    del pipe, vae, comps
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    text_dim = next(iter(prompts.values())).pooled.shape[-1]
    expected = unet.add_embedding.linear_1.in_features
    if text_dim + 6 * unet.config.addition_time_embed_dim != expected:
        raise ValueError(
            f"UNet expects an added embedding of {expected}, conditioning gives {text_dim} + 6 x "
            f"{unet.config.addition_time_embed_dim}; text encoder and UNet do not belong together"
        )
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"unsupported prediction_type {prediction_type!r} in the model's scheduler config")
    num_train_timesteps = int(noise_scheduler.config.num_train_timesteps)

    # 3. LoRA on the UNet only; trainable params in fp32 whatever the precision (fp16 GradScaler needs it,
    # and bf16 weights would swallow lr 1e-4 updates).
    unet.requires_grad_(False)
    unet.to(dev)  # loaded in weight_dtype already
    if dev.type == "cuda":
        unet.to(memory_format=torch.channels_last)
    unet.add_adapter(
        LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            init_lora_weights=True if spec.init_lora_weights == "default" else "gaussian",
            target_modules=list(spec.target_modules),
        )
    )
    params = _fp32_trainable(unet)
    base_params = sum(p.numel() for p in unet.parameters()) - sum(p.numel() for p in params)
    use_ckpt = want_checkpointing(
        spec.gradient_checkpointing,
        dev,
        unet_params=base_params,
        batch_size=spec.batch_size,
        resolution=spec.resolution,
    )
    if use_ckpt:
        unet.enable_gradient_checkpointing()
    if spec.compile:
        if dev.type == "cuda":
            unet.compile_repeated_blocks()  # transformer blocks only: minutes less than the whole UNet
        else:
            log.info("spec.train.compile ignored on %s", dev.type)

    optimizer = _make_optimizer(spec, params, dev)
    from diffusers.optimization import get_scheduler

    schedule = spec.lr_scheduler
    if schedule == "constant" and spec.warmup_steps:
        schedule = "constant_with_warmup"  # else diffusers' "constant" silently ignores the warmup
    # Not passed to prepare(): accelerate would step it once per process per step under DDP.
    lr_scheduler = get_scheduler(
        schedule, optimizer=optimizer, num_warmup_steps=spec.warmup_steps, num_training_steps=n_steps
    )

    def save_hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
        # Only the LoRA goes into a checkpoint: accelerate would otherwise write the whole 5 GB UNet.
        if accelerator.is_main_process:
            for model in models:
                save_lora(accelerator.unwrap_model(model), Path(output_dir), spec)
        weights.clear()

    def load_hook(models: list[Any], input_dir: str) -> None:
        while models:
            model = accelerator.unwrap_model(models.pop())
            load_lora_into(model, Path(input_dir))
            _fp32_trainable(model)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)

    start_step, losses = 0, []
    if resume_state is not None:
        accelerator.load_state(str(resume_from))
        start_step, losses = int(resume_state["step"]), [float(x) for x in resume_state["losses"]]
        log.info("resumed", extra={"checkpoint": str(resume_from), "step": start_step})

    stream = SampleStream(len(items), spec.seed)
    checkpoints: list[Path] = []
    interrupted = False
    bar = _progress_bar(n_steps, start_step, enabled=progress and main)
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

    # 4. The loop: one iteration = one optimizer step = `accum` micro-batches on every rank.
    unet.train()
    step = start_step
    for step in range(start_step + 1, n_steps + 1):
        step_loss, grad_norm = torch.zeros((), device=dev), math.nan
        for micro in range(spec.gradient_accumulation):
            base = (step - 1) * samples_per_step + (micro * world + rank) * spec.batch_size
            batch = make_batch(
                range(base, base + spec.batch_size),
                stream,
                items,
                latents,
                prompts,
                num_train_timesteps=num_train_timesteps,
                scaling_factor=scaling_factor,
                caption_dropout=caption_dropout,
                random_flip=spec.random_flip,
                latent=spec.latent,
                time_ids=spec.time_ids,
            )
            with accelerator.accumulate(unet):
                loss = _loss(unet, noise_scheduler, batch, dev, weight_dtype, prediction_type)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = _grad_norm(accelerator, params, spec.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach() / spec.gradient_accumulation
        if not accelerator.sync_gradients:
            raise RuntimeError("gradient accumulation fell out of step with accelerate's counter")
        lr_scheduler.step()
        loss_value = float(accelerator.reduce(step_loss, reduction="mean"))
        losses.append(loss_value)
        lr = lr_scheduler.get_last_lr()[0]
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at step {step}")
        # On a TTY the bar carries step/total, loss, lr, it/s and ETA; the per-step line is for logs.
        fields = {"step": step, "total": n_steps, "loss": loss_value, "lr": lr, "grad_norm": grad_norm}
        log.log(logging.INFO if bar is None else logging.DEBUG, "step", extra=fields)
        if bar is not None:
            bar.set_postfix(loss=f"{loss_value:.4g}", lr=f"{lr:.3g}", refresh=False)
            bar.update(1)

        stop = _agreed_stop(accelerator, should_stop)
        if stop or step % spec.checkpoint_every == 0 or step == n_steps:
            state = {
                "step": step,
                "total_steps": n_steps,
                "samples_seen": step * samples_per_step,
                "epoch": (step * samples_per_step) // len(items),
                "position": (step * samples_per_step) % len(items),
                "losses": losses,
                "fingerprint": fingerprint,
                "precision": precision,
                "world_size": world,
            }
            checkpoints.append(_save_checkpoint(accelerator, work_dir, step, state, on_checkpoint))
        if stop and step < n_steps:
            interrupted = True
            log.warning("stopping at step %d on request; checkpoint saved", step, extra={"step": step})
            break
    if bar is not None:
        bar.close()

    # 6. The LoRA (the same weights on every rank), written once per node: the story reads it on each.
    lora_dir = work_dir / "lora"
    if interrupted:
        lora_dir = checkpoints[-1]
    elif accelerator.is_local_main_process:
        shutil.rmtree(lora_dir, ignore_errors=True)
        save_lora(accelerator.unwrap_model(unet), lora_dir, spec, extra={"steps": step})
    accelerator.wait_for_everyone()
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    digest = lora_digest(accelerator.unwrap_model(unet))
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
    )
    # Release everything before sampling loads its own pipeline.
    del unet, optimizer, lr_scheduler, latents, prompts, params
    accelerator.free_memory()
    log.info("trained", extra={k: v for k, v in asdict(result).items() if k not in ("losses", "checkpoints")})
    return result


def _grad_norm(accelerator: Accelerator, params: list[torch.nn.Parameter], max_norm: float | None) -> float:
    """The (unscaled) total gradient norm, clipped to ``max_norm`` when set. Without a limit the clip is by
    inf, an exact no-op that still unscales fp16 gradients and measures them (the reference never clips)."""
    return float(accelerator.clip_grad_norm_(params, max_norm if max_norm else math.inf))


def _fp32_trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """LoRA params to fp32 in place (diffusers' ``cast_training_params`` without its slow import)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def _make_optimizer(
    spec: TrainSpec, params: list[torch.nn.Parameter], dev: torch.device
) -> torch.optim.Optimizer:
    if spec.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ManifestError(
                "spec.train.optimizer: adamw8bit needs bitsandbytes, which is not installed; use adamw"
            ) from None
        return bnb.optim.AdamW8bit(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(
        params,
        lr=spec.learning_rate,
        weight_decay=spec.weight_decay,
        fused=True if dev.type == "cuda" else None,
    )


def _loss(
    unet: torch.nn.Module,
    noise_scheduler: Any,
    batch: Batch,
    dev: torch.device,
    weight_dtype: torch.dtype,
    prediction_type: str,
) -> torch.Tensor:
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
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


def _agreed_stop(accelerator: Accelerator, should_stop: Callable[[], bool] | None) -> bool:
    """A signal may reach one rank only; every rank must stop at the same step or DDP deadlocks."""
    local = bool(should_stop and should_stop())
    if accelerator.num_processes == 1:
        return local
    flag = torch.tensor(1.0 if local else 0.0, device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum") > 0)


def _save_checkpoint(
    accelerator: Accelerator,
    work_dir: Path,
    step: int,
    state: dict[str, Any],
    on_checkpoint: Callable[[Path, int], None] | None,
) -> Path:
    """``accelerate.save_state`` into a temp dir, ``state.json``, ``COMPLETE`` last, rename into place.

    One rank per node prepares and publishes the node's directory (nodes do not share a disk; every
    rank writes its RNG state into its own node's copy); rank 0 alone hands it to ``on_checkpoint``.
    """
    final = work_dir / "checkpoints" / f"step-{step}"
    tmp = work_dir / "checkpoints" / f".step-{step}.partial"
    node_main = accelerator.is_local_main_process
    if node_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with _quiet("accelerate"):
        accelerator.save_state(str(tmp))  # every rank: each writes its own RNG state
    accelerator.wait_for_everyone()
    if node_main:
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=1) + "\n")
        (tmp / COMPLETE_NAME).write_text(f"step {step}\n")
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    if accelerator.is_main_process:
        log.info("checkpoint", extra={"step": step, "path": str(final)})
        if on_checkpoint is not None:
            on_checkpoint(final, step)
    if node_main:  # after the upload: a stale newer step-N left in the work dir must not evict this one first
        _prune_checkpoints(final.parent, keep=KEEP_LOCAL_CHECKPOINTS)
    accelerator.wait_for_everyone()
    return final


def _prune_checkpoints(root: Path, *, keep: int) -> None:
    done = sorted(
        (int(p.name.removeprefix("step-")), p)
        for p in root.glob("step-*")
        if p.name.removeprefix("step-").isdigit() and (p / COMPLETE_NAME).is_file()
    )
    for _, path in done[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _quiet(name: str) -> Any:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _progress_bar(total: int, done: int, *, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="train", unit="step", dynamic_ncols=True)


def _reset_accelerate_state() -> None:
    """Let a later ``train_lora`` in this process pick another precision (accelerate's state is a singleton).

    The process group (PartialState) is kept: DDP workers stay initialised.
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


# ------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m kolors_job.train`` (also under ``torchrun``): train from JSON inputs (tests, launches)."""
    from kolors_job.dataset import ImageItem

    p = argparse.ArgumentParser(prog="python -m kolors_job.train", description=main.__doc__)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--items-json", type=Path, required=True, help="[{path, caption, width, height}, ...]")
    p.add_argument("--spec-json", type=Path, help="TrainSpec as JSON (defaults otherwise)")
    p.add_argument("--work-dir", required=True, help="'{rank}' in it is replaced by the process rank")
    p.add_argument("--vae-dir", type=Path)
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
    items = [ImageItem(Path(r["path"]), r["caption"], int(r["width"]), int(r["height"])) for r in rows]
    result = train_lora(
        args.model_dir,
        items,
        spec,
        work_dir=Path(args.work_dir.format(rank=rank)),
        vae_dir=args.vae_dir,
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
