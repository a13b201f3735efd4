"""The job's GPU work at full size, run on fake tensors: each function is one stage's device work as our code does
it, and returns the bytes live when it started and at its peak.

Modules are built on the meta device from the real configs (:mod:`kolors_job.kolors_configs`), then their
weights become fake CPU tensors (:func:`kolors_job.plan.fake.materialize`). Each ``Sim`` is a small frozen record
of what decides the memory (batch, size, dtypes, checkpointing...); :mod:`kolors_job.plan.table` caches its
result under :meth:`Sim.key`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F  # noqa: N812

from kolors_job.kolors_configs import KOLORS_TEXT_ENCODER_CONFIG, KOLORS_UNET_CONFIG, KOLORS_VAE_CONFIG
from kolors_job.plan.fake import LiveMemory, materialize, simulation

__all__ = [
    "AESTHETIC_CONFIG",
    "DTYPES",
    "Count",
    "Denoise",
    "Result",
    "ScoreImages",
    "Sim",
    "TextEncode",
    "TrainStep",
    "VaeDecode",
    "VaeEncode",
    "lora_step",
]

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SEQ = 256
"""ChatGLM tokens per prompt (``KolorsPipeline.encode_prompt``'s ``max_sequence_length``)."""
LOSS_SCALE = 65536.0
"""GradScaler's initial scale: fp16 backward runs on the scaled loss (in place, so it changes no memory)."""

AESTHETIC_CONFIG: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 768,
}
"""CLIP ViT-L/14's vision tower, the aesthetics-predictor-v2 backbone (its ``config.json``)."""


@dataclass(frozen=True)
class Result:
    start: int
    """Bytes live on the device when the measured work began (the weights and state the sim placed)."""
    peak: int
    """The most bytes live at once, ``start`` included (what ``torch.cuda.max_memory_allocated`` reports)."""

    @property
    def transient(self) -> int:
        return self.peak - self.start


@dataclass(frozen=True)
class Sim:
    """One simulated piece of device work; subclasses are its inputs. ``run`` builds, runs and measures it."""

    kind: ClassVar[str] = ""
    added: ClassVar[tuple[str, ...]] = ()
    """Fields added after the table's first keys were written: in a key only when not at their default, so a key
    without them still names the same work (a plain LoRA, AdamW, the square) and its result stays valid."""

    def key(self) -> str:
        fields = ",".join(
            f"{f.name}={_text(getattr(self, f.name))}"
            for f in dataclasses.fields(self)
            if f.name not in self.added or getattr(self, f.name) != f.default
        )
        return f"{self.kind}({fields})"

    def run(self) -> Result:
        raise NotImplementedError


def _text(v: Any) -> str:
    return "+".join(map(str, v)) if isinstance(v, tuple) else str(v)


# ------------------------------------------------------------------------------------------------ modules


def unet_on_meta(rank: int | None = None, targets: tuple[str, ...] = (), dora: bool = False) -> torch.nn.Module:
    """Kolors' UNet (diffusers) with shapes only, frozen, with a peft LoRA of ``rank`` on ``targets`` (a DoRA, as
    ``train_setup.add_lora`` asks peft for it, with ``dora``: a magnitude vector per adapted layer)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(copy.deepcopy(KOLORS_UNET_CONFIG))
        unet.requires_grad_(False)
        if rank:
            from peft import LoraConfig

            unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets),
                                        **({"use_dora": True} if dora else {})))  # fmt: skip
    return unet


def vae_on_meta() -> torch.nn.Module:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL.from_config(copy.deepcopy(KOLORS_VAE_CONFIG)).requires_grad_(False)


def text_encoder_on_meta() -> torch.nn.Module:
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel

    with torch.device("meta"):  # empty_init=True would allocate the 12 GB on the CPU (skip_init + to_empty)
        return ChatGLMModel(ChatGLMConfig(**KOLORS_TEXT_ENCODER_CONFIG), empty_init=False).requires_grad_(False)


def aesthetic_on_meta() -> torch.nn.Module:
    from aesthetics_predictor import AestheticsPredictorV2Linear
    from transformers import CLIPVisionConfig

    with torch.device("meta"):
        return AestheticsPredictorV2Linear(CLIPVisionConfig(**AESTHETIC_CONFIG)).requires_grad_(False)


def _weights(dtype: str, trainable: str = "fp32") -> Callable[[str, torch.Tensor], torch.dtype]:
    """Frozen floating tensors in ``dtype``, trainable ones (the LoRA) in ``trainable``, integers as they are."""

    def dtype_of(_name: str, t: torch.Tensor) -> torch.dtype:
        if not t.is_floating_point():
            return t.dtype
        return DTYPES[trainable] if t.requires_grad else DTYPES[dtype]

    return dtype_of


def _module_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


# ------------------------------------------------------------------------------------------------ counts


@dataclass(frozen=True)
class Count(Sim):
    """Parameter count of a part (``unet``, ``vae``, ``text_encoder``, ``aesthetic``) or of the UNet's LoRA, kept in
    the table like a measurement (``Result.peak`` holds the count): building ChatGLM even on meta takes seconds.
    ``dora``: the LoRA's count includes DoRA's magnitudes."""

    kind: ClassVar[str] = "count"
    added: ClassVar[tuple[str, ...]] = ("dora",)
    part: str
    rank: int = 0
    targets: tuple[str, ...] = ()
    dora: bool = False

    def run(self) -> Result:
        if self.part == "lora":
            module = unet_on_meta(self.rank, self.targets, self.dora)
            n = sum(p.numel() for p in module.parameters() if p.requires_grad)
        else:
            build = {"unet": unet_on_meta, "vae": vae_on_meta, "text_encoder": text_encoder_on_meta,
                     "aesthetic": aesthetic_on_meta}[self.part]  # fmt: skip
            n = sum(p.numel() for p in build().parameters())
        return Result(start=n, peak=n)


# ------------------------------------------------------------------------------------------------ stages


@dataclass(frozen=True)
class TextEncode(Sim):
    """``KolorsPipeline.encode_prompt`` of ``batch`` prompts (256 tokens) by ChatGLM in ``dtype``, no grad."""

    kind: ClassVar[str] = "text_encode"
    batch: int = 1
    dtype: str = "fp16"

    def run(self) -> Result:
        model = text_encoder_on_meta()
        with simulation(), torch.no_grad():
            materialize(model, _weights(self.dtype))
            mem = LiveMemory()
            mem.add(_module_tensors(model))
            start = mem.reset_peak()
            with mem:
                ids = torch.ones(self.batch, SEQ, dtype=torch.long)
                # No padding mask: ChatGLM reads the mask's values to choose its path (a fake tensor has none);
                # the mask it would build is B × 256² booleans, and at 256 tokens attention is small either way.
                out = model(input_ids=ids, position_ids=ids.clone(), output_hidden_states=True)
                embeds = out.hidden_states[-2].permute(1, 0, 2).clone()
                pooled = out.hidden_states[-1][-1, :, :].clone()
                del out, embeds, pooled
        return Result(start, mem.peak)


@dataclass(frozen=True)
class VaeEncode(Sim):
    """``cache_latents``: ``vae.encode`` of ``batch`` images at ``resolution``² (or ``bucket``, width × height: one
    chunk holds one bucket's images) in ``dtype``, no grad."""

    kind: ClassVar[str] = "vae_encode"
    added: ClassVar[tuple[str, ...]] = ("bucket",)
    batch: int
    resolution: int
    dtype: str
    bucket: tuple[int, ...] = ()

    def run(self) -> Result:
        width, height = self.bucket or (self.resolution, self.resolution)
        vae = vae_on_meta()
        with simulation(), torch.no_grad():
            materialize(vae, _weights(self.dtype))
            mem = LiveMemory()
            mem.add(_module_tensors(vae))
            start = mem.reset_peak()
            with mem:
                pixels = torch.empty(self.batch, 3, height, width, dtype=DTYPES[self.dtype])
                dist = vae.encode(pixels).latent_dist
                mean, std = dist.mean.float(), dist.std.float()
                del dist, mean, std, pixels
        return Result(start, mem.peak)


@dataclass(frozen=True)
class VaeDecode(Sim):
    """The pipeline's decode of ``images`` latents in ``dtype``: one at a time when ``sliced``, in 512² tiles
    when ``tiled``."""

    kind: ClassVar[str] = "vae_decode"
    images: int
    height: int
    width: int
    dtype: str = "fp32"
    sliced: bool = True
    tiled: bool = False

    def run(self) -> Result:
        vae = vae_on_meta()
        if self.sliced:
            vae.enable_slicing()
        if self.tiled:
            enable_tiling(vae, self.height, self.width)
        with simulation(), torch.no_grad():
            materialize(vae, _weights(self.dtype))
            mem = LiveMemory()
            mem.add(_module_tensors(vae))
            start = mem.reset_peak()
            with mem:
                z = torch.empty(self.images, 4, self.height // 8, self.width // 8, dtype=DTYPES[self.dtype])
                image = vae.decode(z / 0.13025, return_dict=False)[0]
                del image, z
        return Result(start, mem.peak)


def enable_tiling(vae: Any, height: int, width: int) -> None:
    """diffusers tiles only above the config's sample size (1024 for Kolors): tiles of half the image."""
    vae.enable_tiling()
    vae.tile_sample_min_size = max(256, min(height, width) // 2)
    vae.tile_latent_min_size = vae.tile_sample_min_size // 8


@dataclass(frozen=True)
class Denoise(Sim):
    """One classifier-free-guidance step of ``KolorsPipeline`` for ``images`` images (the UNet on 2 × images).

    ``lora``: ``fused`` (merged into the weights: the story in fp16/fp32), ``branch`` (peft layers beside the
    weights in ``dtype``: the story in bf16) or ``training`` (the trainer's fp32 LoRA under ``autocast``, as
    validation draws with the UNet being trained). ``fuse_qkv``: ``fuse_qkv_projections()`` on the device, as the
    story's speed path does with the LoRA merged — diffusers keeps the separate q/k/v weights beside the fused
    ones, so it costs weights, not just time. ``dora``: the LoRA (``training`` or ``branch``) is a DoRA, whose
    forward computes each adapted layer's weight norm."""

    kind: ClassVar[str] = "denoise"
    added: ClassVar[tuple[str, ...]] = ("dora",)
    images: int
    height: int
    width: int
    dtype: str
    lora: str = "fused"
    rank: int = 16
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    autocast: str = "no"
    fuse_qkv: bool = False
    dora: bool = False

    def run(self) -> Result:
        unet = unet_on_meta(self.rank if self.lora != "fused" else None, self.targets, self.dora)
        trainable = "fp32" if self.lora == "training" else self.dtype
        dtype = DTYPES[self.dtype]
        n, h, w = self.images, self.height // 8, self.width // 8
        with simulation(), torch.no_grad():
            materialize(unet, _weights(self.dtype, trainable))
            unet.eval()
            if self.fuse_qkv:
                unet.fuse_qkv_projections()
            mem = LiveMemory()
            mem.add(_module_tensors(unet))
            start = mem.reset_peak()
            with mem:
                latents = torch.empty(n, 4, h, w, dtype=dtype)
                embeds = torch.empty(2 * n, SEQ, 4096, dtype=dtype)
                pooled = torch.empty(2 * n, 4096, dtype=dtype)
                time_ids = torch.empty(2 * n, 6, dtype=dtype)
                x = torch.cat([latents] * 2) / 2.0  # scale_model_input makes a new tensor
                added = {"text_embeds": pooled, "time_ids": time_ids}
                with _autocast(self.autocast):
                    pred = unet(x, torch.tensor(999.0), encoder_hidden_states=embeds, added_cond_kwargs=added,
                                return_dict=False)[0]  # fmt: skip
                    if self.autocast != "no":
                        pred = pred.float()  # accelerate's wrapper returns fp32
                uncond, text = pred.chunk(2)
                guided = uncond + 4.0 * (text - uncond)
                latents = latents + 0.1 * guided.to(latents.dtype)  # the scheduler's step
                del pred, uncond, text, guided, x, latents
        return Result(start, mem.peak)


@dataclass(frozen=True)
class ScoreImages(Sim):
    """The aesthetic predictor (fp32) on ``images`` 224² images, no grad."""

    kind: ClassVar[str] = "score"
    images: int = 1

    def run(self) -> Result:
        model = aesthetic_on_meta()
        with simulation(), torch.no_grad():
            materialize(model, _weights("fp32"))
            mem = LiveMemory()
            mem.add(_module_tensors(model))
            start = mem.reset_peak()
            with mem:
                out = model(pixel_values=torch.empty(self.images, 3, 224, 224))
                del out
        return Result(start, mem.peak)


@dataclass(frozen=True)
class TrainStep(Sim):
    """One optimizer step of :func:`kolors_job.train.train_step` at a micro-batch of ``batch``, in the steady
    state (the optimizer's state exists; gradients are set to None after the step).

    ``weights``: the frozen UNet's dtype; ``mixed``: accelerate's autocast dtype (``no`` for fp32); the LoRA and
    its optimizer are fp32. ``optimizer``: ``adamw_fused`` (ours on CUDA), ``adamw_foreach`` (torch's CUDA
    default), ``adamw8bit`` (bitsandbytes: two uint8 moments + fp32 absmax per 256 values, updated in place),
    ``prodigy`` (prodigyopt: four tensors per parameter, see :class:`_ProdigyState`). ``compile``: ``no``, or
    ``whole`` (AOTAutograd's min-cut partition of the joint graph, what ``torch.compile`` saves for backward).

    The training options of ``train`` that change device memory: ``dora`` (peft's DoRA: a magnitude per output row,
    and a forward that builds each adapted layer's full weight norm and saves the base output for the magnitude's
    gradient), ``ema`` (diffusers' ``EMAModel``: an fp32 copy of the LoRA on the device, and its ``foreach`` update
    after the optimizer step, which makes one more copy for a moment), and ``bucket`` (width × height in pixels
    trained instead of ``resolution``²: ``dataset.buckets``). What does not (read in ``train.py`` and
    ``train_data.make_batch``): ``noise_offset`` is added to the noise on the CPU before the batch moves to the
    device; ``loss_weighting: min_snr`` keeps the per-sample squared errors (``batch`` × 4 × h/8 × w/8 fp32, the
    tensor the plain mean reduces too: 256 KiB a 1024² sample) and ``batch`` SNR weights; ``ema_decay`` is a
    number. Neither is in the key."""

    kind: ClassVar[str] = "train_step"
    added: ClassVar[tuple[str, ...]] = ("dora", "ema", "bucket")
    batch: int
    resolution: int
    weights: str
    mixed: str
    checkpointing: bool
    rank: int = 16
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    optimizer: str = "adamw_fused"
    compile: str = "no"
    dora: bool = False
    ema: bool = False
    bucket: tuple[int, ...] = ()

    def run(self) -> Result:
        unet = unet_on_meta(self.rank, self.targets, self.dora)
        dtype = DTYPES[self.weights]
        width, height = self.bucket or (self.resolution, self.resolution)
        b, h, w = self.batch, height // 8, width // 8

        def inputs() -> dict[str, torch.Tensor]:
            return {
                "latents": torch.empty(b, 4, h, w),
                "noise": torch.empty(b, 4, h, w),
                "timesteps": torch.zeros(b, dtype=torch.long),
                "embeds": torch.empty(b, SEQ, 4096, dtype=dtype),
                "pooled": torch.empty(b, 4096, dtype=dtype),
                "time_ids": torch.empty(b, 6),
            }

        def forward(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
            # noise_scheduler.add_noise on fp32 latents, then the UNet (train._loss)
            a = torch.empty(b, 1, 1, 1)
            noisy = a * x["latents"] + a * x["noise"]
            cond = {"text_embeds": x["pooled"], "time_ids": x["time_ids"]}
            return model(noisy, x["timesteps"], encoder_hidden_states=x["embeds"], added_cond_kwargs=cond,
                         return_dict=False)[0]  # fmt: skip

        with simulation():
            materialize(unet, _weights(self.weights))
            if self.checkpointing:
                unet.enable_gradient_checkpointing()
            unet.train()
            return lora_step(unet, forward, inputs, mixed=self.mixed, optimizer=self.optimizer, compile=self.compile,
                             loss_scale=LOSS_SCALE if self.mixed == "fp16" else None, ema=self.ema)  # fmt: skip


def _autocast(mixed: str) -> Any:
    import contextlib

    return torch.autocast("cpu", dtype=DTYPES[mixed]) if mixed != "no" else contextlib.nullcontext()


def lora_step(
    model: torch.nn.Module,
    forward: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor],
    inputs: Callable[[], dict[str, torch.Tensor]],
    *,
    mixed: str,
    optimizer: str,
    compile: str = "no",
    loss_scale: float | None = None,
    ema: bool = False,
) -> Result:
    """Measure one steady-state training step of ``model`` (materialized, trainable parameters marked) inside
    :func:`simulation`: ``forward(model, inputs())`` under autocast, an fp32 MSE against ``inputs()["noise"]``,
    backward (scaled by ``loss_scale``, unscaled in place), the gradient norm, the optimizer step, gradients to
    None, then with ``ema`` diffusers' ``EMAModel`` step (``make_ema``'s, its shadow copy made before). Shared by
    our trainer's step and the reference trainer's (``bench.plan_calibration``)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    opt = _optimizer(optimizer, named)
    average = _ema(params) if ema else None
    step_fn = _compiled(model, forward, mixed) if compile == "whole" else None
    if step_fn is not None:  # trace and partition first: tracing's own tensors are not the step's
        step_fn(inputs()).float().sum().backward()
        for p in params:
            p.grad = None
    mem = LiveMemory()
    mem.add(_module_tensors(model))
    mem.add(t for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor))
    mem.add(average.shadow_params if average is not None else ())
    start = mem.reset_peak()
    with mem:
        x = inputs()
        if step_fn is not None:
            pred = step_fn(x)
        else:
            with _autocast(mixed):
                pred = forward(model, x)
        loss = F.mse_loss(pred.float(), x["noise"].float())
        del pred
        (loss * loss_scale if loss_scale else loss).backward()
        if loss_scale:
            for p in params:
                p.grad.mul_(1.0 / loss_scale)  # GradScaler.unscale_: in place
        torch.nn.utils.clip_grad_norm_(params, math.inf)  # train._grad_norm measures it every step
        opt.step()
        opt.zero_grad(set_to_none=True)
        if average is not None:
            average.step(params)  # train.train_step: once per optimizer step, after it
        del loss, x
    return Result(start, mem.peak)


def _ema(params: list[torch.nn.Parameter]) -> Any:
    """``train_setup.make_ema``'s average (the decay changes no memory)."""
    from diffusers.training_utils import EMAModel

    return EMAModel(params, foreach=True)


class _AdamW8bitState(torch.optim.Optimizer):
    """bitsandbytes' AdamW8bit's memory (its kernels cannot run on fake tensors): per tensor of ≥ 4096 values two
    uint8 moments and an fp32 absmax per block of 256 of each; smaller tensors keep fp32 moments. The update is
    in place and allocates nothing."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        super().__init__(params, {})
        for p in params:
            if p.numel() >= 4096:
                blocks = -(-p.numel() // 256)
                self.state[p] = {"state1": torch.empty(p.shape, dtype=torch.uint8),
                                 "state2": torch.empty(p.shape, dtype=torch.uint8),
                                 "absmax1": torch.empty(blocks), "absmax2": torch.empty(blocks)}  # fmt: skip
            else:
                self.state[p] = {"state1": torch.empty(p.shape), "state2": torch.empty(p.shape)}

    def step(self, closure: Any = None) -> None:
        return None


class _ProdigyState(torch.optim.Optimizer):
    """prodigyopt's ``Prodigy`` as ``make_optimizer`` builds it (``slice_p`` 1, ``beta1`` > 0), for fake tensors: its
    step reads values (``.item()``, ``p.any()``), which fake tensors have not. Its first step makes, per
    parameter, ``s``, ``exp_avg`` and ``exp_avg_sq`` like it and ``p0``, a copy of the parameter — a 0-d tensor
    where the parameter is all zeros then, as peft's LoRA B always is (``init_lora_weights`` default or
    gaussian); its step makes the same temporaries (``p0 - p``, ``|s|``, ``sqrt(exp_avg_sq)``) one parameter at a
    time. ``test_plan`` checks both against the real optimizer on real tensors."""

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]]) -> None:
        super().__init__([p for _, p in named], {})
        for name, p in named:
            zero = "lora_B" in name
            self.state[p] = {"s": torch.zeros_like(p.flatten()),
                             "p0": torch.zeros((), dtype=p.dtype) if zero else p.flatten().clone(),
                             "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}  # fmt: skip

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for p in self.param_groups[0]["params"]:
            if p.grad is None:
                continue
            state, grad = self.state[p], p.grad
            torch.dot(grad.flatten(), state["p0"] - p.flatten())
            state["exp_avg"].mul_(0.9).add_(grad, alpha=0.1)
            state["exp_avg_sq"].mul_(0.999).addcmul_(grad, grad, value=0.001)
            state["s"].mul_(0.999).add_(grad.flatten(), alpha=0.1)
            state["s"].abs().sum()
        for p in self.param_groups[0]["params"]:
            if p.grad is not None:
                denom = self.state[p]["exp_avg_sq"].sqrt().add_(1e-8)
                p.addcdiv_(self.state[p]["exp_avg"], denom, value=-1e-4)


def _optimizer(name: str, named: list[tuple[str, torch.nn.Parameter]]) -> torch.optim.Optimizer:
    """The optimizer with its state already made (a steady-state step), as ``make_optimizer`` builds it. Prodigy
    itself on real tensors (``test_plan``'s reference), its stand-in on fake ones."""
    params = [p for _, p in named]
    if name == "adamw8bit":
        return _AdamW8bitState(params)
    if name == "prodigy":
        from torch._subclasses.fake_tensor import is_fake

        if any(is_fake(p) for p in params):
            return _ProdigyState(named)
        from prodigyopt import Prodigy

        opt: torch.optim.Optimizer = Prodigy(params, lr=1.0)
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()  # all-zero gradients: makes the state, changes nothing
        opt.zero_grad(set_to_none=True)
        return opt
    opt = torch.optim.AdamW(params, lr=1e-4, fused=name == "adamw_fused", foreach=name == "adamw_foreach" or None)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def _compiled(
    model: torch.nn.Module, forward: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor], mixed: str
) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """``forward`` as torch.compile's AOTAutograd splits it: inductor's decompositions, the min-cut partition
    (what is saved for backward, what is recomputed), the graphs then run op by op."""
    from torch._functorch.aot_autograd import aot_function
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table

    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    tensors = [p for _, p in model.named_parameters()] + [b for _, b in model.named_buffers()]
    keys: list[str] = []

    def fn(state: list[torch.Tensor], *values: torch.Tensor) -> torch.Tensor:
        params = dict(zip(names, state, strict=True))
        with torch.nn.utils.stateless._reparametrize_module(model, params), _autocast(mixed):
            return forward(model, dict(zip(keys, values, strict=True)))

    compiled = aot_function(
        fn, fw_compiler=_graph, bw_compiler=_graph, partition_fn=min_cut_rematerialization_partition,
        decompositions=select_decomp_table(),
    )

    def step(x: dict[str, torch.Tensor]) -> torch.Tensor:
        keys[:] = list(x)
        return compiled(tensors, *x.values())

    return step


def _graph(gm: Any, _example_inputs: Any) -> Any:
    return gm
