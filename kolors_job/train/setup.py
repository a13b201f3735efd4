"""The trainer's set-up steps and the decisions behind them: precision, accelerator, LoRA, optimizer.

Each step is a small function :func:`kolors_job.train.loop.train_lora` calls in order; the bench
(``bench/gpu.py``) calls the same ones on a randomly initialised full-size UNet, overriding only the
choices it measures (channels-last, fused AdamW, gradient checkpointing, compile).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kolors_job.core.errors import ManifestError
from kolors_job.models.loading import place
from kolors_job.train.adapter import load_lora_into, save_lora
from kolors_job.train.checkpoints import EMA_DIR

if TYPE_CHECKING:
    from accelerate import Accelerator

    from kolors_job.manifest.train import TrainSpec

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------- decisions


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


def weight_dtype_for(precision: str) -> torch.dtype:
    return {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def want_checkpointing(
    setting: str, device: torch.device, *, unet_params: int, batch_size: int, resolution: int
) -> bool:
    """``auto``: off on CPU; on a GPU, on only when the memory plan's activations of a step without it (scaled to
    this UNet's size, +20 % +1 GiB) won't fit in free memory. A job run with ``train.memory: auto`` gets ``on`` or
    ``off`` from its plan (:mod:`kolors_job.plan`) and never reaches this branch; direct callers (the bench) do.

    Checkpointing costs ~2x step time (docs/design.md §2: 1368 vs 629 ms), so it must not be on just in case.
    Call after the UNet is on the device: its weights are then already out of the free memory.
    """
    if setting != "auto":
        return setting == "on"
    if device.type != "cuda":
        return False
    from kolors_job.plan.runtime import step_activation_bytes

    free, _total = torch.cuda.mem_get_info(device)
    need = step_activation_bytes(unet_params, batch_size, resolution) * 1.2 + (1 << 30)
    return free < need


def total_steps(train: TrainSpec, n_items: int, samples_per_step: int) -> int:
    if train.steps is not None:
        return train.steps
    return max(1, math.ceil(train.epochs * n_items / samples_per_step))


# ------------------------------------------------------------------------------------------- setup


def setup_accelerator(
    train: TrainSpec, target: torch.device, precision: str, *, logs_dir: Path | None = None, resume_step: int = 0
) -> Accelerator:
    """The ``Accelerator`` for ``precision`` (see :func:`resolve_precision`) on ``target``; with ``logs_dir``,
    the trackers of ``spec.log_with`` (:mod:`kolors_job.train.tracking`) write there."""
    from accelerate import Accelerator

    from kolors_job.train.tracking import trackers

    return Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=train.gradient_accumulation,
        cpu=target.type == "cpu",
        log_with=trackers(train, logs_dir, resume_step) if logs_dir is not None and train.log_with else None,
        project_dir=str(logs_dir) if logs_dir is not None else None,
    )


def seed_and_tune(dev: torch.device, seed: int) -> None:
    """TF32 + cudnn autotuning on CUDA, peak-memory counter reset; the global seed (LoRA A init uses it)."""
    from accelerate.utils import set_seed

    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes: ~12 % faster steps (docs/design.md §2)
        torch.cuda.reset_peak_memory_stats(dev)
    set_seed(seed)  # identical on every rank


def add_lora(
    unet: torch.nn.Module,
    train: TrainSpec,
    dev: torch.device,
    *,
    dtype: torch.dtype | None = None,
    channels_last: bool | None = None,
) -> tuple[list[torch.nn.Parameter], bool]:
    """LoRA on the UNet only; trainable params in fp32 whatever the precision (fp16 GradScaler needs it,
    and bf16 weights would swallow lr 1e-4 updates). Returns the LoRA params and whether gradient
    checkpointing is on. ``dtype``: the frozen weights' (None: as loaded); the UNet is cast on its way to
    ``dev``. ``channels_last``: None is the trainer's choice (on CUDA); the bench overrides it."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    unet.requires_grad_(False)
    place(unet, dev, dtype or unet.dtype)
    if dev.type == "cuda" if channels_last is None else channels_last:
        unet.to(memory_format=torch.channels_last)
    unet.add_adapter(
        LoraConfig(
            r=train.rank,
            lora_alpha=train.alpha,
            init_lora_weights=True if train.init_lora_weights == "default" else "gaussian",
            target_modules=list(train.target_modules),
            **({"use_dora": True} if train.dora else {}),  # a plain LoRA's config stays as it always was
        )
    )
    cast_training_params(unet, dtype=torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    base_params = sum(p.numel() for p in unet.parameters()) - sum(p.numel() for p in params)
    use_ckpt = want_checkpointing(
        train.gradient_checkpointing,
        dev,
        unet_params=base_params,
        batch_size=train.batch_size,
        resolution=train.resolution,
    )
    if use_ckpt:
        unet.enable_gradient_checkpointing()
    if train.compile:
        if dev.type == "cuda":
            unet.compile_repeated_blocks()  # transformer blocks only: minutes less than the whole UNet
        else:
            log.info("spec.train.compile ignored on %s", dev.type)
    return params, use_ckpt


def make_optimizer(
    train: TrainSpec, params: list[torch.nn.Parameter], dev: torch.device, *, fused: bool | None = None
) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA unless ``fused`` says otherwise), bitsandbytes' 8-bit AdamW, or Prodigy."""
    if train.optimizer == "prodigy":
        return _prodigy(train, params)
    if train.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ManifestError(
                "spec.train.optimizer: adamw8bit needs bitsandbytes, which is not installed; use adamw"
            ) from None
        return bnb.optim.AdamW8bit(params, lr=train.learning_rate, weight_decay=train.weight_decay)
    use_fused = dev.type == "cuda" if fused is None else fused and dev.type == "cuda"
    return torch.optim.AdamW(
        params,
        lr=train.learning_rate,
        weight_decay=train.weight_decay,
        fused=True if use_fused else None,
    )


def _prodigy(train: TrainSpec, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """``prodigyopt.Prodigy`` at its defaults (Adam betas, d0 1e-6, decoupled weight decay), ``learning_rate``
    scaling its own step-size estimate. Its constructor prints to stdout, which here is the JSON log stream."""
    import contextlib
    import io

    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise ManifestError(
            "spec.train.optimizer: prodigy needs prodigyopt, which is not installed; use adamw"
        ) from None
    with contextlib.redirect_stdout(io.StringIO()):
        return Prodigy(params, lr=train.learning_rate, weight_decay=train.weight_decay)


def make_ema(train: TrainSpec, params: list[torch.nn.Parameter]) -> Any:
    """diffusers' ``EMAModel`` over the LoRA parameters (``train.ema``), or None. Its decay warms up as
    min(``ema_decay``, (1 + n) / (10 + n)) at update ``n``; its state goes into every checkpoint."""
    if not train.ema:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=train.ema_decay, foreach=True)  # a few fused kernels, not 3 per LoRA tensor


def make_lr_scheduler(train: TrainSpec, optimizer: torch.optim.Optimizer, n_steps: int) -> Any:
    """diffusers' schedule by name; ``constant`` with warmup is ``constant_with_warmup``."""
    from diffusers.optimization import get_scheduler

    schedule = train.lr_scheduler
    if schedule == "constant" and train.warmup_steps:
        schedule = "constant_with_warmup"  # else diffusers' "constant" silently ignores the warmup
    return get_scheduler(
        schedule, optimizer=optimizer, num_warmup_steps=train.warmup_steps, num_training_steps=n_steps
    )


def prepare(
    accelerator: Accelerator,
    unet: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    train: TrainSpec,
    ema: Any = None,
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """accelerate's wrapping, with checkpoint hooks that save and load the LoRA alone (and, with ``ema``, the
    averaged LoRA beside it in ``ema/``, what an export of that checkpoint takes)."""
    from diffusers.training_utils import cast_training_params

    def save_hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
        # Only the LoRA goes into a checkpoint: accelerate would otherwise write the whole 5 GB UNet.
        if accelerator.is_main_process:
            for model in models:
                unet = accelerator.unwrap_model(model)
                save_lora(unet, Path(output_dir), train)
                if ema is not None:
                    with ema_weights(ema, unet):
                        save_lora(unet, Path(output_dir) / EMA_DIR, train, extra={"ema": True})
        weights.clear()

    def load_hook(models: list[Any], input_dir: str) -> None:
        while models:
            model = accelerator.unwrap_model(models.pop())
            load_lora_into(model, Path(input_dir))
            cast_training_params(model, dtype=torch.float32)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    # Not passed to prepare(): accelerate would step it once per process per step under DDP.
    accelerator.register_for_checkpointing(lr_scheduler)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)  # its shadow weights and update count resume with the run
    return unet, optimizer


@contextlib.contextmanager
def ema_weights(ema: Any, unet: torch.nn.Module) -> Iterator[None]:
    """The LoRA parameters hold the EMA's averages inside the block, their trained values again after
    (``EMAModel.store``/``copy_to``/``restore``: exact copies, so training continues bit for bit)."""
    if ema is None:
        yield
        return
    params = [p for p in unet.parameters() if p.requires_grad]
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def resume(
    accelerator: Accelerator, resume_from: Path | None, resume_state: dict[str, Any] | None
) -> tuple[int, list[float]]:
    """Load a checkpoint's LoRA, optimizer, schedule and RNG; (steps done, their losses)."""
    if resume_state is None:
        return 0, []
    accelerator.load_state(str(resume_from))
    start_step, losses = int(resume_state["step"]), [float(x) for x in resume_state["losses"]]
    log.info("resumed", extra={"checkpoint": str(resume_from), "step": start_step})
    return start_step, losses


def _reset_accelerate_state() -> None:
    """Let a later ``train_lora`` in this process pick another precision (accelerate's state is a singleton).

    The process group (PartialState) is kept: DDP workers stay initialised.
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()

