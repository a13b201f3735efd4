"""A training step at full size, on fake tensors: one optimizer step of the LoRA as the trainer takes it (eager,
or as AOTAutograd partitions it for ``torch.compile``), with AdamW (fused, foreach), 8-bit AdamW or Prodigy state,
and the training options that change device memory (DoRA, EMA, a bucket's size)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F  # noqa: N812

from kolors_job.plan.fake import LiveMemory, materialize, simulation
from kolors_job.plan.meta import DTYPES, SEQ, Result, Sim, autocast, module_tensors, unet_on_meta, weights_as

__all__ = ["LOSS_SCALE", "TrainStep", "lora_step"]


LOSS_SCALE = 65536.0
"""GradScaler's initial scale: fp16 backward runs on the scaled loss (in place, so it changes no memory)."""


@dataclass(frozen=True)
class TrainStep(Sim):
    """One optimizer step of :func:`kolors_job.train.step.train_step` at a micro-batch of ``batch``, in the steady
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
    trained instead of ``resolution``²: ``dataset.buckets``). What does not (read in ``train/loop.py`` and
    ``train/step.make_batch``): ``noise_offset`` is added to the noise on the CPU before the batch moves to the
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
            # noise_scheduler.add_noise on fp32 latents, then the UNet (train.step._loss)
            a = torch.empty(b, 1, 1, 1)
            noisy = a * x["latents"] + a * x["noise"]
            cond = {"text_embeds": x["pooled"], "time_ids": x["time_ids"]}
            return model(noisy, x["timesteps"], encoder_hidden_states=x["embeds"], added_cond_kwargs=cond,
                         return_dict=False)[0]  # fmt: skip

        with simulation():
            materialize(unet, weights_as(self.weights))
            if self.checkpointing:
                unet.enable_gradient_checkpointing()
            unet.train()
            return lora_step(unet, forward, inputs, mixed=self.mixed, optimizer=self.optimizer, compile=self.compile,
                             loss_scale=LOSS_SCALE if self.mixed == "fp16" else None, ema=self.ema)  # fmt: skip




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
    mem.add(module_tensors(model))
    mem.add(t for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor))
    mem.add(average.shadow_params if average is not None else ())
    start = mem.reset_peak()
    with mem:
        x = inputs()
        if step_fn is not None:
            pred = step_fn(x)
        else:
            with autocast(mixed):
                pred = forward(model, x)
        loss = F.mse_loss(pred.float(), x["noise"].float())
        del pred
        (loss * loss_scale if loss_scale else loss).backward()
        if loss_scale:
            for p in params:
                p.grad.mul_(1.0 / loss_scale)  # GradScaler.unscale_: in place
        torch.nn.utils.clip_grad_norm_(params, math.inf)  # train.step._grad_norm measures it every step
        opt.step()
        opt.zero_grad(set_to_none=True)
        if average is not None:
            average.step(params)  # train.step.train_step: once per optimizer step, after it
        del loss, x
    return Result(start, mem.peak)


def _ema(params: list[torch.nn.Parameter]) -> Any:
    """``train.setup.make_ema``'s average (the decay changes no memory)."""
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
        with torch.nn.utils.stateless._reparametrize_module(model, params), autocast(mixed):
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
