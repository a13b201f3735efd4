"""Full-size GPU benchmark: the reference trainer vs our code path on the real Kolors architecture, random weights.

``python -m bench.gpu [--quick] [--out bench/results.json]`` on a CUDA machine; ``python -m bench.gpu --smoke``
runs the same code paths on the tiny Kolors on the CPU (tests/test_bench.py), so the script is exercised without
a GPU. Why it looks like this:

* Lent GPU time is short (one ~15 min lease, start-up included), so every measurement runs in its own
  try/except, results are written after each one (to ``--out`` and ``$OUT``), the list runs most important first
  (reference step, our step, CFG step eager vs fused, story, whole job; compile runs last), and with a time
  budget (``--quick``: 390 s) a measurement whose estimate no longer fits is skipped, not started.
* Random weights make outputs meaningless but timings and memory real: the full-size modules are built directly
  on the GPU (seconds), never loaded.
* "The reference" is what the seed baseline runs: DiffSynth 1.1.9's ``SDXLUNet(is_kolors=True)``, fp16 weights,
  peft LoRA r16/α4 on ``to_q,to_k,to_v,to_out`` (fp32), Lightning ``16-mixed`` (autocast fp16 + GradScaler),
  AdamW lr 1e-4, gradient checkpointing on; sampling runs CFG as two batch-1 passes with the LoRA unmerged.
* "Ours" goes through the job's own functions: ``kolors_job.train.loop``'s set-up steps and ``train_step`` (what
  ``train_lora``'s loop calls), and ``train_lora``/``generate_story`` themselves on a model written in diffusers
  layout. Compile always uses the default mode (max-autotune's compile time never pays back here)
  and the compile seconds are reported, because compile time is job time.
* FLOP counts were counted with ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (full-size
  UNet, LoRA r16, 1024², 256 tokens): 13.93 TFLOP per CFG step (forward, batch 2), 7.01 TFLOP forward and
  14.55 TFLOP forward+backward per training sample.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import gc
import importlib
import importlib.metadata
import importlib.util
import itertools
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.plan_calibration import predicted_gib

GIB = float(1 << 30)
BENCH_VERSION = 1

CFG_TFLOP = 13.93
"""One CFG denoising step at 1024² (UNet forward, batch 2, 256 tokens), counted on the meta device."""
TRAIN_TFLOP_PER_SAMPLE = 14.55
"""One LoRA training sample at 1024² (forward 7.01 + backward 7.54), counted on the meta device; grad-ckpt
recomputes the forward on top (≈21.6 executed), which this floor does not count."""

PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 790.0),  # measured on this workplace's H200 (KINDS.md): 769-798 on an 8192³ bf16 matmul
    ("H100", 800.0),  # measured here: 798 on an 8192³ bf16 matmul (dense; datasheet 989)
    ("H800", 800.0),
    ("H20", 148.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10", 125.0),
    ("L4", 121.0),
)
"""Dense bf16 matmul rate by device-name substring (first match wins: A100 before A10)."""

GOALS = {
    "train_vs_ref_as_run": 6.0,
    "train_vs_ref_no_ckpt": 2.0,
    "cfg_step_ms": 30.0,
    "story_s": 30.0,
    "job_s": 150.0,
    "peak_gib": 20.0,
}
"""The issue's targets: training ≥ 6× the reference as it runs and ≥ 2× it without grad-ckpt (per sample),
≤ 30 ms per CFG step, story ≤ 30 s including compile, the whole reference job (500 steps + 8 frames × 50 steps)
≤ 2.5 min, peak GPU memory ≤ 20 GiB."""

REFERENCE_ANCHORS = {
    "ref_train_ckpt": "1223 ms, 6.2 GiB",
    "ref_train_no_ckpt": "417 ms, 12.7 GiB",
    "ours_train_bf16": "629 ms, 12.7 GiB (556 ms with cudnn.benchmark)",
    "ours_train_bf16_ckpt": "1368 ms, 5.9 GiB",
    "ref_cfg_fp16": "60 ms",
    "cfg_bf16_eager": "116 ms",
    "cfg_fp16_eager": "122 ms",
    "cfg_bf16_fused_cl": "65 ms",
    "cfg_bf16_fused_cl_compile": "36 ms after a 127 s compile",
    "vae_decode_fp16": "92 ms",
}
"""docs/design.md §2 (2026-11-24, one H100, torch 2.11, a throwaway script): shown beside ours, never as ours."""

TRAIN_STEPS_FULL = 500
TRAIN_STEPS_QUICK = 20
STORY_STEPS = 50
STORY_FRAMES_PER_BATCH = 8
MIN_FREE_DISK_BYTES = 40e9
REF_TARGETS = ["to_q", "to_k", "to_v", "to_out"]
CAPTION = "二次元"

log = logging.getLogger("bench.gpu")


class CannotRunError(Exception):
    """A measurement that cannot run here (no CUDA, no disk, a prerequisite missing): recorded, not an error."""


# ------------------------------------------------------------------------------------------------ context


@dataclass
class Ctx:
    """Everything a measurement needs: settings, the device, the results document and its writers."""

    args: argparse.Namespace
    dev: torch.device
    tiny: bool
    mode: str
    budget_s: float | None
    work_dir: Path
    out_paths: list[Path]
    doc: dict[str, Any]
    t0: float = field(default_factory=time.perf_counter)
    shared: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False
    """Set by SIGINT/SIGTERM (``timeout``): a compile step may swallow the KeyboardInterrupt, this flag cannot be."""

    @property
    def cuda(self) -> bool:
        return self.dev.type == "cuda"

    @property
    def unet_cfg(self) -> dict[str, Any]:
        from kolors_job.models.configs import KOLORS_UNET_CONFIG
        from kolors_job.models.tiny import TINY_UNET_CONFIG

        return TINY_UNET_CONFIG if self.tiny else KOLORS_UNET_CONFIG

    @property
    def vae_cfg(self) -> dict[str, Any]:
        from kolors_job.models.configs import KOLORS_VAE_CONFIG
        from kolors_job.models.tiny import TINY_VAE_CONFIG

        return TINY_VAE_CONFIG if self.tiny else KOLORS_VAE_CONFIG

    @property
    def latent(self) -> int:
        return int(self.unet_cfg["sample_size"])

    @property
    def res(self) -> int:
        return self.latent * 8

    @property
    def seq(self) -> int:
        return 256

    @property
    def text_dim(self) -> int:
        return int(self.unet_cfg["encoder_hid_dim"])

    @property
    def pooled_dim(self) -> int:
        cfg = self.unet_cfg
        return int(cfg["projection_class_embeddings_input_dim"]) - 6 * int(cfg["addition_time_embed_dim"])

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def dtype(self, want: torch.dtype) -> torch.dtype:
        """The dtype a variant asks for on CUDA; fp32 on the CPU (the smoke checks code paths, not precisions)."""
        return want if self.cuda else torch.float32

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.dev)

    def peak_gib(self) -> float | None:
        return round(torch.cuda.max_memory_allocated(self.dev) / GIB, 2) if self.cuda else None

    # ---- timing

    def bench(
        self, fn: Callable[[], Any], *, warmup: int = 2, min_iters: int = 3, max_iters: int = 30
    ) -> dict[str, Any]:
        """Median wall time of ``fn`` with a device sync around each call, after ``warmup`` untimed calls.

        Iterations adapt to the last warm-up's duration so each measurement costs about ``--target-s`` of
        timed work (a 1.2 s step gets 3, a 60 ms step 30); warm-up times are kept (compile shows up there).
        """
        warm: list[float] = []
        if self.args.smoke:
            warmup = 1  # the smoke checks code paths; its numbers are not timings
        for _ in range(max(1, warmup)):
            self.sync()
            t = time.perf_counter()
            fn()
            self.sync()
            warm.append(time.perf_counter() - t)
        if self.args.iters:
            iters = self.args.iters
        else:
            iters = int(self.args.target_s / max(warm[-1], 1e-4))
            iters = max(min_iters, min(max_iters, iters))
        times: list[float] = []
        for _ in range(iters):
            self.sync()
            t = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        return {
            "ms": round(med * 1e3, 3),
            "ms_min": round(min(times) * 1e3, 3),
            "ms_max": round(max(times) * 1e3, 3),
            "iters": iters,
            "warmup_s": [round(w, 3) for w in warm],
            "ms_all": [round(x * 1e3, 2) for x in times],
        }

    # ---- builders (random weights, directly on the device)

    def build_unet(self, dtype: torch.dtype) -> torch.nn.Module:
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        with torch.device(self.dev):
            unet = UNet2DConditionModel(**copy.deepcopy(self.unet_cfg))
        # nn.Module.to: diffusers' own .to(dtype) warns about fp32-only modules even when there are none.
        return torch.nn.Module.to(unet, dtype=dtype)

    def build_vae(self, dtype: torch.dtype) -> torch.nn.Module:
        from diffusers import AutoencoderKL

        torch.manual_seed(0)
        with torch.device(self.dev):
            vae = AutoencoderKL(**copy.deepcopy(self.vae_cfg))
        return torch.nn.Module.to(vae, dtype=dtype)

    # ---- results

    def record(self, name: str, entry: dict[str, Any]) -> None:
        self.doc["results"][name] = entry
        self.write()

    def write(self) -> None:
        """Rewrite the JSON (and the markdown table beside it) atomically: a kill leaves the last complete file."""
        summarize(self.doc)
        text = json.dumps(self.doc, indent=1, ensure_ascii=False, default=str) + "\n"
        for path in self.out_paths:
            _atomic_write(path, text)
            _atomic_write(path.with_suffix(".md"), self.doc["table_md"])


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _free(ctx: Ctx, *, dynamo: bool = False) -> None:
    """Drop what a measurement left behind so the next one starts from an empty GPU."""
    if dynamo:
        with contextlib.suppress(Exception):
            torch._dynamo.reset()
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _cuda_flags(ctx: Ctx, *, benchmark: bool) -> Iterator[None]:
    """cudnn.benchmark/TF32 as the code under test sets them: train_lora turns all on, Lightning leaves them off."""
    if not ctx.cuda:
        yield
        return
    old = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cudnn.benchmark = benchmark
    torch.backends.cuda.matmul.allow_tf32 = benchmark
    torch.backends.cudnn.allow_tf32 = benchmark
    try:
        yield
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = old


# ------------------------------------------------------------------------------------------------ reference


_DIFFSYNTH_PKG = "_bench_diffsynth_models"


def load_diffsynth_sdxl_unet() -> type[torch.nn.Module]:
    """DiffSynth 1.1.9's ``SDXLUNet`` class, without importing the ``diffsynth`` package.

    ``import diffsynth`` imports every pipeline (modelscope, imageio, controlnets, ...) and fails under
    transformers 5; ``models/sdxl_unet.py`` itself needs only torch and einops. Its folder is mounted as a
    private package so the relative imports resolve and nothing named ``diffsynth`` enters ``sys.modules``
    (``kolors_job.models.tiny.chatglm_tokenizer_dir`` finds the package with ``find_spec`` and must see the real one).
    """
    loaded = sys.modules.get("diffsynth.models.sdxl_unet")
    if loaded is not None:
        return loaded.SDXLUNet
    spec = importlib.util.find_spec("diffsynth")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("diffsynth is not installed (the reference needs diffsynth==1.1.9)")
    models_dir = Path(next(iter(spec.submodule_search_locations))) / "models"
    if _DIFFSYNTH_PKG not in sys.modules:
        pkg = types.ModuleType(_DIFFSYNTH_PKG)
        pkg.__path__ = [str(models_dir)]
        pkg.__package__ = _DIFFSYNTH_PKG
        sys.modules[_DIFFSYNTH_PKG] = pkg
    return importlib.import_module(f"{_DIFFSYNTH_PKG}.sdxl_unet").SDXLUNet


def _build_reference(ctx: Ctx, *, lora_alpha: float | None, train: bool) -> tuple[torch.nn.Module, list[str]]:
    """The reference UNet as DiffSynth's Kolors trainer/pipeline holds it: fp16 weights, LoRA (fp32 when training)."""
    from peft import LoraConfig, inject_adapter_in_model

    sdxl_unet = load_diffsynth_sdxl_unet()
    torch.manual_seed(0)
    with torch.device(ctx.dev):
        model = sdxl_unet(is_kolors=True)
    model = model.to(torch.float16)
    model.requires_grad_(False)
    lora_names: list[str] = []
    if lora_alpha is not None:
        config = LoraConfig(r=16, lora_alpha=lora_alpha, init_lora_weights=True, target_modules=REF_TARGETS)
        model = inject_adapter_in_model(config, model)
        lora_names = [n for n, p in model.named_parameters() if "lora_" in n]
        for p in model.parameters():
            if p.requires_grad:
                if train:
                    p.data = p.to(torch.float32)  # DiffSynth's add_lora_to_model upcasts the LoRA
                else:
                    p.requires_grad_(False)
    model.train(train)
    return model, lora_names


def _ref_inputs(ctx: Ctx, batch: int) -> dict[str, torch.Tensor]:
    """DiffSynth's Kolors call: 256×4096 ChatGLM states (its UNet projects them to 2048), pooled 4096, and the six
    SDXL size ids flattened to ``[h, w, 0, 0, h, w] * batch`` (int64, as ``prepare_extra_input`` builds them)."""
    torch.manual_seed(0)
    r, lat = ctx.res, ctx.latent
    kw = {"device": ctx.dev, "dtype": torch.float16}
    return {
        "sample": torch.randn(batch, 4, lat, lat, **kw),
        "timestep": torch.tensor([499.0], device=ctx.dev),
        "encoder_hidden_states": torch.randn(batch, ctx.seq, 4096, **kw),
        "add_text_embeds": torch.randn(batch, 4096, **kw),
        "add_time_id": torch.tensor([r, r, 0, 0, r, r], device=ctx.dev).repeat(batch),
    }


def m_ref_train(ctx: Ctx, *, ckpt: bool) -> dict[str, Any]:
    """One reference training step as Lightning 16-mixed runs it: autocast fp16, scaled backward, unscale, step."""
    import torch.nn.functional as F  # noqa: N812

    if not ctx.cuda or ctx.tiny:
        raise CannotRunError("DiffSynth's UNet has hard-coded full sizes and runs fp16 autocast: CUDA + full size only")
    with _cuda_flags(ctx, benchmark=False):  # Lightning's default: cudnn.benchmark off
        model, lora_names = _build_reference(ctx, lora_alpha=4.0, train=True)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)  # configure_optimizers: plain AdamW (foreach)
        scaler = torch.amp.GradScaler("cuda")
        inp = _ref_inputs(ctx, 1)
        noise = torch.randn_like(inp["sample"])
        noisy = inp["sample"] * 0.8 + noise * 0.6
        losses: list[float] = []

        def step() -> None:
            with torch.autocast("cuda", dtype=torch.float16):
                pred = model(
                    noisy, timestep=inp["timestep"], encoder_hidden_states=inp["encoder_hidden_states"],
                    add_time_id=inp["add_time_id"], add_text_embeds=inp["add_text_embeds"],
                    use_gradient_checkpointing=ckpt,
                )
                loss = F.mse_loss(pred.float(), noise.float())
            scaler.scale(loss).backward()
            scaler.unscale_(opt)  # Lightning unscales before every step (for its clipping hooks)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))

        ctx.reset_peak()
        r = ctx.bench(step, warmup=2)
    r.update(
        peak_gib=ctx.peak_gib(), batch=1, kind="train", lora_tensors=len(lora_names),
        lora_example=lora_names[0] if lora_names else None, loss_finite=all(map(math.isfinite, losses)),
        grad_scale=float(scaler.get_scale()),
        config={"dtype": "fp16 weights, autocast fp16, GradScaler", "grad_ckpt": ckpt, "lora": "r16 α4 fp32",
                "optimizer": "AdamW lr 1e-4 (foreach)", "cudnn_benchmark": False},
    )
    return r


def m_ref_cfg(ctx: Ctx, *, batched: bool, lora: bool) -> dict[str, Any]:
    """One reference CFG step. DiffSynth's SDXLImagePipeline runs the positive and negative prompts as two
    batch-1 passes (``lets_dance_xl`` = the UNet's forward minus grad-ckpt), with the LoRA injected unmerged."""
    if not ctx.cuda or ctx.tiny:
        raise CannotRunError("DiffSynth's UNet: CUDA + full size only")
    model, lora_names = _build_reference(ctx, lora_alpha=2.0 if lora else None, train=False)
    model = model.to(torch.float16)  # an injected LoRA follows the base dtype for sampling
    b = 2 if batched else 1
    inp = _ref_inputs(ctx, b)
    neg = {k: (torch.randn_like(v) if v.is_floating_point() and k != "timestep" else v) for k, v in inp.items()}

    @torch.no_grad()
    def step() -> torch.Tensor:
        if batched:
            out = model(**inp)
            uncond, cond = out.chunk(2)
        else:
            cond = model(**inp)
            uncond = model(**neg)
        return uncond + 4.0 * (cond - uncond)

    ctx.reset_peak()
    r = ctx.bench(step, warmup=2)
    r.update(peak_gib=ctx.peak_gib(), batch=2, kind="cfg", lora_tensors=len(lora_names),
             config={"dtype": "fp16", "passes": "1 × batch 2" if batched else "2 × batch 1",
                     "lora": "r16 α2 unmerged (as the reference samples)" if lora else None})
    return r


def m_ref_lora_injection(ctx: Ctx) -> dict[str, Any]:
    """Both full-size UNets on the meta device: the reference's LoRA injection and ours must hit the same
    layers (same count, same shapes) and DiffSynth's names must be the ``to_q/to_k/to_v/to_out`` it loads."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model

    from kolors_job.manifest.train import TrainSpec
    from kolors_job.models.configs import KOLORS_UNET_CONFIG

    sdxl_unet = load_diffsynth_sdxl_unet()
    t = time.perf_counter()
    with torch.device("meta"):
        ref = sdxl_unet(is_kolors=True)
        ref.requires_grad_(False)
        ref = inject_adapter_in_model(
            LoraConfig(r=16, lora_alpha=4.0, init_lora_weights=True, target_modules=REF_TARGETS), ref
        )
        ours = UNet2DConditionModel(**copy.deepcopy(KOLORS_UNET_CONFIG))
        ours.requires_grad_(False)
        spec = TrainSpec()
        ours.add_adapter(
            LoraConfig(
                r=spec.rank, lora_alpha=spec.alpha, init_lora_weights=True, target_modules=list(spec.target_modules)
            )
        )
    ref_lora = {n: tuple(p.shape) for n, p in ref.named_parameters() if "lora_" in n}
    our_lora = {n: tuple(p.shape) for n, p in ours.named_parameters() if "lora_" in n}
    pattern = re.compile(r"\.(to_q|to_k|to_v|to_out)\.lora_[AB]\.default\.weight$")
    odd = [n for n in ref_lora if not pattern.search(n)]
    shapes_match = sorted(ref_lora.values()) == sorted(our_lora.values())
    result = {
        "kind": "check", "seconds_meta": round(time.perf_counter() - t, 2),
        "reference_lora_tensors": len(ref_lora), "our_lora_tensors": len(our_lora), "shapes_match": shapes_match,
        "reference_example": next(iter(ref_lora), None), "our_example": next(iter(our_lora), None),
        "unexpected_reference_names": odd[:3],
    }
    if not shapes_match or odd or len(ref_lora) != 1120:
        raise AssertionError(f"LoRA injection mismatch: {result}")
    return result


# ------------------------------------------------------------------------------------------------ ours: training


def m_ours_train(
    ctx: Ctx,
    *,
    batch_size: int = 1,
    ckpt: bool = False,
    channels_last: bool = True,
    fused: bool = True,
    compile_blocks: bool = False,
) -> dict[str, Any]:
    """One optimizer step by the trainer itself: ``train_lora``'s set-up steps (``setup_accelerator``, ``add_lora``,
    ``make_optimizer``, ``make_lr_scheduler``, ``prepare``) on a randomly initialised UNet, then its ``train_step``
    (``make_batch`` on the CPU, the loss under the ``Accelerator``, backward, grad-norm clip, AdamW, lr schedule,
    one host sync for the loss). Only the caches are synthetic (latent posteriors, prompt embeddings), like after
    ``build_caches``. Variants override what the trainer decides (channels-last, fused AdamW, ckpt, compile)."""
    from diffusers import DDPMScheduler

    from kolors_job.data.images import ImageItem
    from kolors_job.manifest.train import TrainSpec
    from kolors_job.models.configs import KOLORS_SCHEDULER_CONFIG
    from kolors_job.models.prompts import PromptEmbeds
    from kolors_job.train import loop as kt
    from kolors_job.train.latents import LatentEntry

    if compile_blocks and not ctx.cuda:
        raise CannotRunError("compile: CUDA only (train_lora ignores spec.train.compile on the CPU)")
    spec = TrainSpec(
        batch_size=batch_size, resolution=ctx.res, gradient_checkpointing="on" if ckpt else "off",
        compile=compile_blocks,
    )
    precision = kt.resolve_precision(spec.precision, ctx.dev)
    weight_dtype = kt.weight_dtype_for(precision)
    kt._reset_accelerate_state()
    accelerator = kt.setup_accelerator(spec, ctx.dev, precision)
    try:
        with _cuda_flags(ctx, benchmark=True):  # train_lora: TF32 + cudnn.benchmark on CUDA
            unet = ctx.build_unet(weight_dtype)
            params, use_ckpt = kt.add_lora(unet, spec, ctx.dev, channels_last=channels_last)
            optimizer = kt.make_optimizer(spec, params, ctx.dev, fused=fused)
            lr_scheduler = kt.make_lr_scheduler(spec, optimizer, n_steps=10**6)
            unet, optimizer = kt.prepare(accelerator, unet, optimizer, lr_scheduler, spec)
            noise_scheduler = DDPMScheduler.from_config(KOLORS_SCHEDULER_CONFIG)
            n_items, lat, r = 8, ctx.latent, ctx.res
            gen = torch.Generator().manual_seed(0)
            items = [ImageItem(Path(f"synthetic-{i}.png"), CAPTION, r, r) for i in range(n_items)]
            latents = {
                (i, False): LatentEntry(
                    mean=torch.randn(4, lat, lat, generator=gen), std=torch.full((4, lat, lat), 0.05),
                    time_ids=(r, r, 0, 0, r, r),
                )
                for i in range(n_items)
            }
            prompts = {
                CAPTION: PromptEmbeds(
                    embeds=torch.randn(ctx.seq, ctx.text_dim, generator=gen).to(weight_dtype),
                    pooled=torch.randn(ctx.pooled_dim, generator=gen).to(weight_dtype),
                )
            }
            run = kt.Run(
                accelerator, spec, unet, optimizer, lr_scheduler, params, noise_scheduler,
                kt.SampleStream(n_items, spec.seed), items, latents, prompts, scaling_factor=0.13025,
                prediction_type="epsilon", num_train_timesteps=int(noise_scheduler.config.num_train_timesteps),
                weight_dtype=weight_dtype, caption_dropout=0.0,
            )
            steps = itertools.count(1)
            losses: list[float] = []
            run.unet.train()

            def step() -> None:
                losses.append(kt.train_step(run, next(steps)).loss)

            ctx.reset_peak()
            res = ctx.bench(step, warmup=3 if compile_blocks else 2)
        if compile_blocks:
            res["compile_s"] = round(sum(res["warmup_s"]) - len(res["warmup_s"]) * res["ms"] / 1e3, 1)
        res.update(
            peak_gib=ctx.peak_gib(), batch=batch_size, kind="train", loss_finite=all(map(math.isfinite, losses)),
            ms_per_sample=round(res["ms"] / batch_size, 3),
            config={"precision": precision, "channels_last": channels_last, "fused_adamw": fused and ctx.cuda,
                    "grad_ckpt": use_ckpt,
                    "compile": "compile_repeated_blocks (default mode)" if compile_blocks else None,
                    "lora": f"r{spec.rank} α{spec.alpha} fp32 {list(spec.target_modules)}",
                    "max_grad_norm": spec.max_grad_norm, "cudnn_benchmark": ctx.cuda},
        )
        return res
    finally:
        accelerator.free_memory()
        kt._reset_accelerate_state()


def m_ours_train_batch(ctx: Ctx) -> dict[str, Any]:
    """The largest batch of {8, 4, 2} that fits (--smoke: 2), default variant: per-sample throughput and peak."""
    tried: dict[int, str] = {}
    for bs in (2,) if ctx.args.smoke else (8, 4, 2):
        res = None
        try:
            res = m_ours_train(ctx, batch_size=bs)
        except torch.cuda.OutOfMemoryError:
            tried[bs] = "oom"
        if res is None:
            _free(ctx)  # after the except block: the traceback (and the tensors its frames hold) is gone
            continue
        res["tried"] = {**tried, bs: "ok"}
        return res
    raise CannotRunError(f"no batch of 8, 4 or 2 fits: {tried}")


# ------------------------------------------------------------------------------------------------ ours: sampling


def m_cfg(
    ctx: Ctx,
    *,
    dtype: torch.dtype,
    fuse: bool = False,
    channels_last: bool = False,
    compile_mode: str | None = None,
) -> dict[str, Any]:
    """One CFG denoising step as ``KolorsPipeline`` runs it: the UNet on batch 2 (negative + positive) under
    ``no_grad``, then the guidance combine. ``compile_mode``: ``blocks`` = ``compile_repeated_blocks()``,
    ``whole`` = ``torch.compile(unet)`` as ``generate.py`` does; both default mode."""
    if compile_mode and not ctx.cuda:
        raise CannotRunError("compile: CUDA only (generate.py ignores spec.story.compile on the CPU)")
    dtype = ctx.dtype(dtype)
    unet = ctx.build_unet(dtype).eval()
    unet.requires_grad_(False)
    if fuse:
        unet.fuse_qkv_projections()
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    model: Any = unet
    if compile_mode == "blocks":
        unet.compile_repeated_blocks()
    elif compile_mode == "whole":
        model = torch.compile(unet)
    torch.manual_seed(0)
    kw = {"device": ctx.dev, "dtype": dtype}
    lat, r = ctx.latent, ctx.res
    x = torch.randn(2, 4, lat, lat, **kw)
    t = torch.tensor(499.0, device=ctx.dev)
    emb = torch.randn(2, ctx.seq, ctx.text_dim, **kw)
    added = {
        "text_embeds": torch.randn(2, ctx.pooled_dim, **kw),
        "time_ids": torch.tensor([[r, r, 0, 0, r, r]] * 2, device=ctx.dev, dtype=dtype),
    }

    @torch.no_grad()
    def step() -> torch.Tensor:
        out = model(x, t, encoder_hidden_states=emb, added_cond_kwargs=added, return_dict=False)[0]
        uncond, cond = out.chunk(2)
        return uncond + 4.0 * (cond - uncond)

    ctx.reset_peak()
    res = ctx.bench(step, warmup=3 if compile_mode else 2)
    if compile_mode:
        res["compile_s"] = round(sum(res["warmup_s"]) - len(res["warmup_s"]) * res["ms"] / 1e3, 1)
    res.update(peak_gib=ctx.peak_gib(), batch=2, kind="cfg",
               config={"dtype": str(dtype).removeprefix("torch."), "fuse_qkv": fuse, "channels_last": channels_last,
                       "compile": compile_mode, "attention": "SDPA (diffusers default)"})
    return res


def m_vae_decode(ctx: Ctx, *, dtype: torch.dtype, tiled: bool = False, batch: int = 1) -> dict[str, Any]:
    """``vae.decode`` of 1024² latents as the pipeline calls it; tiled = 512² tiles (diffusers only tiles above
    its config's sample_size, 1024 for Kolors, so the tile size is lowered to make it tile at all)."""
    dtype = ctx.dtype(dtype)
    vae = ctx.build_vae(dtype).eval()
    vae.requires_grad_(False)
    if tiled:
        vae.enable_tiling()
        vae.tile_latent_min_size = ctx.latent // 2
        vae.tile_sample_min_size = ctx.res // 2
    torch.manual_seed(0)
    z = torch.randn(batch, 4, ctx.latent, ctx.latent, device=ctx.dev, dtype=dtype)
    scale = float(ctx.vae_cfg["scaling_factor"])

    @torch.no_grad()
    def step() -> torch.Tensor:
        return vae.decode(z / scale, return_dict=False)[0]

    ctx.reset_peak()
    res = ctx.bench(step, warmup=2, max_iters=20)
    res.update(peak_gib=ctx.peak_gib(), batch=batch, kind="vae",
               config={"dtype": str(dtype).removeprefix("torch."), "tiled": tiled,
                       "tile": f"{ctx.res // 2}² px" if tiled else None})
    return res


def m_device(ctx: Ctx) -> dict[str, Any]:
    """A large bf16 matmul: the device's achievable dense rate, to read the percentages below against."""
    n = 8192 if ctx.cuda else 512
    dtype = ctx.dtype(torch.bfloat16)
    a = torch.randn(n, n, device=ctx.dev, dtype=dtype)
    b = torch.randn(n, n, device=ctx.dev, dtype=dtype)
    res = ctx.bench(lambda: a @ b, warmup=3, min_iters=10, max_iters=50)
    res.update(kind="device", n=n, tflops_measured=round(2 * n**3 / (res["ms"] / 1e3) / 1e12, 1))
    return res


# ------------------------------------------------------------------------------------------------ the job


class _LogTimes(logging.Handler):
    """Timestamps of the job's own log records (``step``, ``batch``, ...): per-step times without touching its code."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.events: list[tuple[float, str, dict[str, Any]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        extra = {k: getattr(record, k) for k in ("seconds", "step", "images") if hasattr(record, k)}
        self.events.append((time.perf_counter(), record.getMessage(), extra))

    def times(self, message: str) -> list[float]:
        return [t for t, m, _ in self.events if m == message]

    def extra(self, message: str, key: str) -> list[Any]:
        return [e[key] for _, m, e in self.events if m == message and key in e]


@contextlib.contextmanager
def _capture(*names: str) -> Iterator[_LogTimes]:
    handler = _LogTimes()
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)


class _HostPeak:
    """This process's peak private (``RssAnon``) and total resident memory while the block runs, sampled every
    20 ms. Private memory is what each DDP rank adds to its pod (``k8s.HOST_MEMORY_PER_RANK_GIB``); the rest
    is the page-cached weight files every rank maps, counted once per pod (``k8s.HOST_MEMORY_BASE_GIB``)."""

    def __init__(self) -> None:
        import threading

        self.private = self.resident = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _now() -> tuple[int, int]:
        fields = {}
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("RssAnon", "VmRSS"):
                    fields[key] = int(value.split()[0]) * 1024
        return fields.get("RssAnon", 0), fields.get("VmRSS", 0)

    def _run(self) -> None:
        while True:
            private, resident = self._now()
            self.private, self.resident = max(self.private, private), max(self.resident, resident)
            if self._stop.wait(0.02):
                return

    def __enter__(self) -> _HostPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def record(self) -> dict[str, float]:
        return {"host_private_peak_gib": round(self.private / GIB, 2),
                "host_resident_peak_gib": round(self.resident / GIB, 2)}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def m_job_write_model(ctx: Ctx) -> dict[str, Any]:
    """The full-size random Kolors in diffusers layout (what ``resolve_model`` hands the job), once per machine.

    Built on the GPU by ``build_full_size_kolors_random`` (bf16, ≈17 GB), saved like ``build_tiny_kolors``
    saves the tiny one (real tokenizer files and scheduler config verbatim), published with ``atomic_dir`` so a
    second run on the same warm machine reuses it.
    """
    from kolors_job.models.tiny import build_tiny_kolors
    from kolors_job.storage.atomic import COMPLETE_MARKER, atomic_dir

    if ctx.tiny:
        t = time.perf_counter()
        path = build_tiny_kolors(ctx.work_dir / "model-tiny")
        ctx.shared["model_dir"] = path
        return {"kind": "job", "s": round(time.perf_counter() - t, 2), "path": str(path),
                "bytes": _dir_bytes(path)}
    path = ctx.work_dir / "model-full-size-random-bf16"
    info = {"kind": "full-size-random-kolors", "dtype": "bf16", "bench_version": BENCH_VERSION}
    reused = (path / COMPLETE_MARKER).is_file()
    if not reused:
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(ctx.work_dir).free
        if free < MIN_FREE_DISK_BYTES:
            raise CannotRunError(
                f"only {free / 1e9:.0f} GB free under {ctx.work_dir}; the model needs ~17 GB (40 GB asked)"
            )
    times: dict[str, float] = {}

    def write(out: Path) -> None:
        from diffusers import KolorsPipeline

        from kolors_job.models.configs import KOLORS_SCHEDULER_CONFIG
        from kolors_job.models.tiny import build_full_size_kolors_random, chatglm_tokenizer_dir

        t = time.perf_counter()
        unet, vae, text_encoder, tokenizer, scheduler = build_full_size_kolors_random(ctx.dev, torch.bfloat16)
        ctx.sync()
        times["build_s"] = time.perf_counter() - t
        t = time.perf_counter()
        unet, vae, text_encoder = unet.to("cpu"), vae.to("cpu"), text_encoder.to("cpu")
        _free(ctx)
        KolorsPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            force_zeros_for_empty_prompt=False,
        ).save_pretrained(out, safe_serialization=True)
        shutil.rmtree(out / "tokenizer")
        shutil.copytree(chatglm_tokenizer_dir(), out / "tokenizer")
        (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(KOLORS_SCHEDULER_CONFIG, indent=2) + "\n")
        times["save_s"] = time.perf_counter() - t

    t = time.perf_counter()
    atomic_dir(path, info, write, replace_stale=True)
    ctx.shared["model_dir"] = path
    return {"kind": "job", "s": round(time.perf_counter() - t, 2), "reused": reused, "path": str(path),
            "bytes": _dir_bytes(path), **{k: round(v, 2) for k, v in times.items()}}


def _dataset(ctx: Ctx) -> list[Any]:
    """``--images`` JPEGs at the training resolution (smooth random colour fields): real files for ``train_lora``."""
    import numpy as np
    from PIL import Image

    from kolors_job.data.images import ImageItem

    root = ctx.work_dir / f"dataset-{ctx.res}-{ctx.args.images}"
    root.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(ctx.args.images):
        path = root / f"img_{i:03d}.jpg"
        if not path.is_file():
            rng = np.random.default_rng(i)
            small = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
            small.resize((ctx.res, ctx.res), Image.Resampling.BICUBIC).save(path, quality=90)
        items.append(ImageItem(path, CAPTION, ctx.res, ctx.res))
    return items


def m_job_train(ctx: Ctx) -> dict[str, Any]:
    """``train_lora`` itself on the written model: load, encode captions, cache latents, N steps, save the LoRA."""
    from kolors_job.manifest.train import TrainSpec
    from kolors_job.train.loop import train_lora

    model_dir = ctx.shared.get("model_dir")
    if model_dir is None:
        raise CannotRunError("no model on disk (job_write_model did not run or failed)")
    items = _dataset(ctx)
    spec = TrainSpec(steps=ctx.args.train_steps, checkpoint_every=10**6, resolution=ctx.res)
    work = ctx.work_dir / "job-train"
    shutil.rmtree(work, ignore_errors=True)
    ctx.reset_peak()
    with _capture("kolors_job.train.loop") as logs, _HostPeak() as host:
        t = time.perf_counter()
        result = train_lora(model_dir, items, spec, work_dir=work, device=str(ctx.dev), progress=False)
        wall = time.perf_counter() - t
    ctx.shared["lora_dir"] = result.lora_dir
    steps = logs.times("step")
    start = logs.times("training")
    loop_start = start[0] if start else (steps[0] if steps else t)
    intervals = [b - a for a, b in itertools.pairwise([loop_start, *steps])]
    steady = intervals[2:] if len(intervals) > 4 else intervals
    step_ms = statistics.median(steady) * 1e3 if steady else None
    setup_s = loop_start - t
    return {
        "kind": "job", "s": round(wall, 2), "steps": result.steps, "images": len(items),
        "setup_s": round(setup_s, 2), "loop_s": round((steps[-1] - loop_start) if steps else 0.0, 2),
        "after_loop_s": round(wall - ((steps[-1] - t) if steps else wall), 2),
        "step_ms": round(step_ms, 2) if step_ms else None,
        "steps_per_s": round(1e3 / step_ms, 3) if step_ms else None,
        "first_step_ms": round(intervals[0] * 1e3, 1) if intervals else None,
        "encode_captions_s": (logs.extra("encoded captions", "seconds") or [None])[0],
        "cache_latents_s": (logs.extra("cached latents", "seconds") or [None])[0],
        "peak_gib": round(result.peak_memory_bytes / GIB, 2) if result.peak_memory_bytes else None,
        **host.record(),
        "precision": result.precision, "gradient_checkpointing": result.gradient_checkpointing,
        "loss_first": result.losses[0] if result.losses else None,
        "loss_last": result.losses[-1] if result.losses else None,
        "config": {"spec": spec.model_dump(mode="json", include={"rank", "alpha", "batch_size", "resolution",
                                                                  "precision", "gradient_checkpointing", "compile"})},
    }


def m_job_story(ctx: Ctx, *, compile_story: bool) -> dict[str, Any]:
    """``generate_story`` itself: load the pipeline (+ LoRA), 8 frames × ``--story-steps`` steps in one batch of 8,
    decode, write PNGs. The wall time includes loading and, with ``compile``, compilation: that is job time."""
    from kolors_job.manifest.story import StorySpec
    from kolors_job.story.draw import generate_story

    if compile_story and not ctx.cuda:
        raise CannotRunError("compile: CUDA only (generate.py ignores spec.story.compile on the CPU)")
    model_dir = ctx.shared.get("model_dir")
    if model_dir is None:
        raise CannotRunError("no model on disk (job_write_model did not run or failed)")
    lora_dir = ctx.shared.get("lora_dir")
    spec = StorySpec(steps=ctx.args.story_steps, width=ctx.res, height=ctx.res,
                     batch_size=STORY_FRAMES_PER_BATCH, compile=compile_story)
    out = ctx.work_dir / ("job-story-compile" if compile_story else "job-story")
    shutil.rmtree(out, ignore_errors=True)
    ctx.reset_peak()
    with _capture("kolors_job.render.pipeline") as logs, _HostPeak() as host:
        t = time.perf_counter()
        frames = generate_story(model_dir, spec, out_dir=out, lora_dir=lora_dir, device=str(ctx.dev), progress=False)
        wall = time.perf_counter() - t
    batches = logs.extra("batch", "seconds")
    render = float(sum(batches)) if batches else None
    n = len(frames)
    return {
        "kind": "job", "s": round(wall, 2), "frames": n, "steps": spec.steps, "batch_size": spec.batch_size,
        "render_s": round(render, 2) if render is not None else None,
        "load_and_write_s": round(wall - render, 2) if render is not None else None,
        "per_step_ms": round(render / spec.steps * 1e3, 1) if render else None,
        "per_image_cfg_step_ms": round(render / (spec.steps * max(n, 1)) * 1e3, 2) if render else None,
        "peak_gib": ctx.peak_gib(), **host.record(), "lora": str(lora_dir) if lora_dir else None,
        "config": {"compile": compile_story, "lora_scale": spec.lora_scale, "scheduler": spec.scheduler},
    }


# ------------------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class Task:
    name: str
    est_s: float
    """Seconds on an H100 (--quick iteration counts), for the budget: a task that would overrun is skipped."""
    fn: Callable[[Ctx], dict[str, Any]]
    quick: bool = True
    """False: not in --quick (low value per device second)."""
    reference: bool = False
    compile: bool = False
    """Compiles (CUDA only: the job ignores compile on the CPU); dynamo's caches are reset afterwards."""


def tasks(args: argparse.Namespace) -> list[Task]:
    """Most important first: a timeout or the budget cuts from the end."""
    bf16, fp16 = torch.bfloat16, torch.float16
    steps = args.train_steps
    out = [
        Task("device_matmul", 3, m_device),
        Task("ref_lora_injection", 15, m_ref_lora_injection, reference=True),
        Task("ref_train_ckpt", 14, lambda c: m_ref_train(c, ckpt=True), reference=True),
        Task("ref_train_no_ckpt", 8, lambda c: m_ref_train(c, ckpt=False), reference=True),
        Task("ours_train_bf16_cl_fused", 8, lambda c: m_ours_train(c)),
        Task("cfg_bf16_eager", 6, lambda c: m_cfg(c, dtype=bf16)),
        Task("cfg_bf16_fused_cl", 6, lambda c: m_cfg(c, dtype=bf16, fuse=True, channels_last=True)),
        Task("cfg_fp16_eager", 6, lambda c: m_cfg(c, dtype=fp16)),
        Task("ref_cfg_fp16", 6, lambda c: m_ref_cfg(c, batched=False, lora=False), reference=True),
        Task("ref_cfg_fp16_lora", 6, lambda c: m_ref_cfg(c, batched=False, lora=True), reference=True),
        Task("ours_train_bf16", 8, lambda c: m_ours_train(c, channels_last=False, fused=False)),
        Task("ours_train_bf16_ckpt", 10, lambda c: m_ours_train(c, ckpt=True)),
        Task("vae_decode_bf16", 4, lambda c: m_vae_decode(c, dtype=bf16)),
        Task("vae_decode_bf16_tiled", 4, lambda c: m_vae_decode(c, dtype=bf16, tiled=True)),
        Task("ours_train_batch", 30, m_ours_train_batch),
        Task("job_write_model", 60, m_job_write_model),
        Task("job_train", 30 + 0.6 * steps, m_job_train),
        Task("job_story", 65, lambda c: m_job_story(c, compile_story=False)),
        Task("cfg_bf16_fused_cl_compile_blocks", 60, lambda c: m_cfg(c, dtype=bf16, fuse=True, channels_last=True,
                                                                    compile_mode="blocks"), compile=True),
        Task("ours_train_bf16_cl_fused_compile_blocks", 120, lambda c: m_ours_train(c, compile_blocks=True),
             compile=True),
        Task("cfg_bf16_fused_cl_compile", 150, lambda c: m_cfg(c, dtype=bf16, fuse=True, channels_last=True,
                                                              compile_mode="whole"), compile=True),
        Task("job_story_compile", 220, lambda c: m_job_story(c, compile_story=True), compile=True),
        Task("ref_cfg_fp16_b2", 6, lambda c: m_ref_cfg(c, batched=True, lora=False), quick=False, reference=True),
        Task("vae_decode_fp16", 4, lambda c: m_vae_decode(c, dtype=fp16), quick=False),
        Task("vae_decode_bf16_b8", 8, lambda c: m_vae_decode(c, dtype=bf16, batch=8), quick=False),
    ]
    return out


def _selected(name: str, patterns: list[str]) -> bool:
    return any(name == p or name.startswith(p) for p in patterns)


def run_task(ctx: Ctx, task: Task) -> None:
    """Run one measurement in isolation: budget check, try/except, timing, memory release, incremental write."""
    args = ctx.args
    base: dict[str, Any] = {"est_s": task.est_s}
    reason = None
    if args.only and not _selected(task.name, args.only):
        reason = "not selected (--only)"
    elif args.skip and _selected(task.name, args.skip):
        reason = "skipped (--skip)"
    elif task.name == "ref_lora_injection":
        if not (args.with_reference or args.only):
            reason = "meta-device LoRA check: pass --with-reference"
    elif task.reference and ctx.tiny:
        reason = "DiffSynth's UNet is full size only: needs CUDA without --tiny"
    elif task.compile and not ctx.cuda:
        reason = "compile: CUDA only (train_lora and generate_story ignore compile on the CPU)"
    elif (args.quick or args.smoke) and not task.quick and not args.only:
        reason = "not in --quick"
    elif ctx.budget_s is not None and not args.only:
        left = ctx.budget_s - ctx.elapsed()
        est = 2.0 if (task.name == "job_write_model" and ctx.tiny) else task.est_s
        if est > left:
            reason = f"budget: needs ~{est:.0f} s, {max(left, 0):.0f} s of {ctx.budget_s:.0f} s left"
    if reason:
        ctx.record(task.name, {**base, "status": "skipped", "reason": reason})
        print(f"[{ctx.elapsed():7.1f}s] {task.name}: skipped ({reason})", flush=True)
        return
    print(f"[{ctx.elapsed():7.1f}s] {task.name}: running", flush=True)
    ctx.record(task.name, {**base, "status": "running", "started_s": round(ctx.elapsed(), 1)})
    _free(ctx)
    t = time.perf_counter()
    entry: dict[str, Any]
    try:
        entry = {"status": "ok", **task.fn(ctx)}
    except CannotRunError as exc:
        entry = {"status": "skipped", "reason": str(exc)}
    except torch.cuda.OutOfMemoryError as exc:
        entry = {"status": "oom", "error": _one_line(exc)}
    except Exception as exc:
        entry = {"status": "error", "error": f"{type(exc).__name__}: {_one_line(exc)}",
                 "traceback": traceback.format_exc(limit=-6)[-3000:]}
    if ctx.interrupted:
        entry = {"status": "interrupted", "reason": f"signal during the run; partial result: {_short(entry)}"}
    entry = {**base, **entry, "wall_s": round(time.perf_counter() - t, 2)}
    if entry.get("peak_gib") is not None and not ctx.tiny:  # the memory planner's prediction, to check it
        entry["predicted_peak_gib"] = predicted_gib(task.name, entry)
    if entry["status"] in ("error", "oom") and ctx.cuda:
        entry["peak_gib"] = ctx.peak_gib()
    _free(ctx, dynamo=task.compile)
    ctx.record(task.name, entry)
    print(f"[{ctx.elapsed():7.1f}s] {task.name}: {_short(entry)}", flush=True)
    if ctx.interrupted:
        raise KeyboardInterrupt


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:400] + ("..." if len(text) > 400 else "")


def _short(entry: dict[str, Any]) -> str:
    if entry["status"] != "ok":
        return f"{entry['status']}: {entry.get('reason') or entry.get('error')}"
    parts = []
    if "ms" in entry:
        parts.append(f"{entry['ms']:.1f} ms")
    if "s" in entry:
        parts.append(f"{entry['s']:.1f} s")
    if entry.get("compile_s") is not None:
        parts.append(f"compile {entry['compile_s']:.0f} s")
    if entry.get("peak_gib") is not None:
        parts.append(f"peak {entry['peak_gib']} GiB")
    if entry.get("step_ms") is not None:
        parts.append(f"{entry['step_ms']:.0f} ms/step")
    return "ok " + ", ".join(parts)


# ------------------------------------------------------------------------------------------------ summary


def _peak_tflops(name: str | None) -> float | None:
    if not name:
        return None
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value
    return None


def _ok(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    r = results.get(name)
    return r if r and r.get("status") == "ok" else None


def summarize(doc: dict[str, Any]) -> None:
    """Derived numbers (TFLOP/s, distance from the floor, ratios to the reference, goals) and the markdown table."""
    results: dict[str, Any] = doc["results"]
    meta = doc["meta"]
    full = not meta.get("tiny", True)
    peak = meta.get("peak_tflops_assumed")
    ref_ckpt = _ok(results, "ref_train_ckpt")
    ref_nockpt = _ok(results, "ref_train_no_ckpt")
    ref_cfg = _ok(results, "ref_cfg_fp16_lora") or _ok(results, "ref_cfg_fp16")
    for name, r in results.items():
        if r.get("status") != "ok" or "ms" not in r:
            continue
        kind = r.get("kind")
        flop = None
        if full and kind == "train":
            flop = TRAIN_TFLOP_PER_SAMPLE * r.get("batch", 1)
        elif full and kind == "cfg":
            flop = CFG_TFLOP
        if flop is not None:
            r["tflop"] = round(flop, 2)
            r["tflops"] = round(flop / (r["ms"] / 1e3), 1)
            if peak:
                r["pct_of_peak"] = round(100 * r["tflops"] / peak, 1)
                r["floor_ms"] = round(flop / peak * 1e3, 1)
                r["x_floor"] = round(r["ms"] / r["floor_ms"], 1)
        per = r["ms"] / r.get("batch", 1)
        if kind == "train" and not name.startswith("ref_"):
            if ref_ckpt:
                r["speedup_vs_ref_as_run"] = round(ref_ckpt["ms"] / per, 2)
            if ref_nockpt:
                r["speedup_vs_ref_no_ckpt"] = round(ref_nockpt["ms"] / per, 2)
        if kind == "cfg" and not name.startswith("ref_") and ref_cfg:
            r["speedup_vs_ref"] = round(ref_cfg["ms"] / r["ms"], 2)
    doc["goals"] = _goals(results)
    doc["estimates"] = _estimates(results)
    doc["table_md"] = _table(doc)


def _goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    goals: list[dict[str, Any]] = []

    def add(goal: str, target: float, value: float | None, source: str | None, higher: bool) -> None:
        met = None if value is None else (value >= target if higher else value <= target)
        goals.append({"goal": goal, "target": target, "value": value, "from": source, "met": met})

    train = {n: r for n, r in results.items() if r.get("status") == "ok" and r.get("kind") == "train"
             and not n.startswith("ref_")}
    default = train.get("ours_train_bf16_cl_fused")

    def best(key: str) -> tuple[float | None, str | None]:
        cands = [(r[key], n) for n, r in train.items() if r.get(key) is not None
                 and (r.get("peak_gib") is None or r["peak_gib"] <= GOALS["peak_gib"])]
        return max(cands) if cands else (None, None)

    v, src = best("speedup_vs_ref_as_run")
    add("train ≥ 6× reference as it runs (per sample, best variant within 20 GiB)", GOALS["train_vs_ref_as_run"],
        v, src, True)
    if default and default.get("speedup_vs_ref_as_run") is not None:
        add("train ≥ 6× reference as it runs (train.py default, batch 1)", GOALS["train_vs_ref_as_run"],
            default["speedup_vs_ref_as_run"], "ours_train_bf16_cl_fused", True)
    v, src = best("speedup_vs_ref_no_ckpt")
    add("train ≥ 2× reference without grad-ckpt (per sample, best variant within 20 GiB)",
        GOALS["train_vs_ref_no_ckpt"], v, src, True)
    cfg = [(r["ms"], n) for n, r in results.items() if r.get("status") == "ok" and r.get("kind") == "cfg"
           and not n.startswith("ref_")]
    v2 = min(cfg) if cfg else (None, None)
    add("CFG step ≤ 30 ms (batch 2, 1024²)", GOALS["cfg_step_ms"], v2[0], v2[1], False)
    story = [(r["s"], n) for n in ("job_story", "job_story_compile") if (r := _ok(results, n))]
    v3 = min(story) if story else (None, None)
    add("story (8 frames × 50 steps) ≤ 30 s incl. load + compile", GOALS["story_s"], v3[0], v3[1], False)
    est = _estimates(results).get("our_job_s")
    add("whole job (500 steps + story) ≤ 150 s", GOALS["job_s"], est, "estimates.our_job_s", False)
    if default:
        add("peak ≤ 20 GiB (train.py default step)", GOALS["peak_gib"], default.get("peak_gib"),
            "ours_train_bf16_cl_fused", False)
    job_train = _ok(results, "job_train")
    if job_train:
        add("peak ≤ 20 GiB (train_lora, incl. ChatGLM encode)", GOALS["peak_gib"], job_train.get("peak_gib"),
            "job_train", False)
    return goals


def _estimates(results: dict[str, Any]) -> dict[str, Any]:
    """Whole-job numbers for the reference workload (500 steps at 1024², 8 frames × 50 CFG steps), from the parts."""
    est: dict[str, Any] = {}
    ref = _ok(results, "ref_train_ckpt")
    ref_cfg = _ok(results, "ref_cfg_fp16_lora") or _ok(results, "ref_cfg_fp16")
    vae = _ok(results, "vae_decode_fp16") or _ok(results, "vae_decode_bf16")
    if ref and ref_cfg:
        est["reference_job_unet_s"] = round(
            TRAIN_STEPS_FULL * ref["ms"] / 1e3 + 8 * STORY_STEPS * ref_cfg["ms"] / 1e3
            + (8 * vae["ms"] / 1e3 if vae else 0.0), 1)
        est["reference_job_note"] = ("500 × ref_train_ckpt + 400 × ref CFG step + 8 decodes; excludes loading, "
                                     "and the reference's per-step ChatGLM + VAE encode")
    train = _ok(results, "job_train")
    stories = [r["s"] for n in ("job_story", "job_story_compile") if (r := _ok(results, n))]
    if train and train.get("step_ms") and stories:
        steps_left = max(0, TRAIN_STEPS_FULL - int(train["steps"]))
        est["our_job_s"] = round(train["s"] + steps_left * train["step_ms"] / 1e3 + min(stories), 1)
        est["our_job_note"] = (f"job_train ({train['steps']} steps measured, {train['images']} images) "
                               f"+ {steps_left} × its steady step + the faster story; excludes download, scan, "
                               "scoring and upload")
    return est


def _fmt(v: Any, unit: str = "", nd: int = 1) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{nd}f}{unit}"
    return f"{v}{unit}"


def _table(doc: dict[str, Any]) -> str:
    meta = doc["meta"]
    lines = [
        f"# bench.gpu — {meta.get('device_name')}, torch {meta.get('versions', {}).get('torch')}, "
        f"{meta.get('mode')}, {meta.get('date')}",
        "",
        "| measurement | time | peak GiB | TFLOP/s | % of peak | × floor | vs reference | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in doc["results"].items():
        status = r.get("status")
        if status != "ok":
            detail = r.get("reason") or r.get("error") or ""
            lines.append(f"| {name} | {status} | | | | | | {detail[:120]} |")
            continue
        if "ms" in r:
            time_s = f"{r['ms']:.1f} ms"
            if r.get("batch", 1) > 1 and r.get("kind") == "train":
                time_s += f" (b{r['batch']}, {r['ms'] / r['batch']:.1f}/sample)"
        elif "s" in r:
            time_s = f"{r['s']:.1f} s"
        else:
            time_s = "ok"
        vs = r.get("speedup_vs_ref_as_run") or r.get("speedup_vs_ref")
        vs_s = ""
        if vs is not None:
            vs_s = f"{vs:.2f}×"
            if r.get("speedup_vs_ref_no_ckpt") is not None:
                vs_s += f" ({r['speedup_vs_ref_no_ckpt']:.2f}× no-ckpt)"
        notes = []
        if r.get("compile_s") is not None:
            notes.append(f"compile {r['compile_s']:.0f} s")
        if r.get("step_ms") is not None:
            notes.append(f"{r['step_ms']:.0f} ms/step, setup {r.get('setup_s')} s")
        if r.get("render_s") is not None:
            notes.append(f"render {r['render_s']} s, {r.get('per_image_cfg_step_ms')} ms/img/step")
        if r.get("tflops_measured") is not None:
            notes.append(f"{r['tflops_measured']} TFLOP/s matmul")
        if r.get("lora_tensors"):
            notes.append(f"{r['lora_tensors']} LoRA tensors")
        if r.get("tried"):
            notes.append(f"tried {r['tried']}")
        if r.get("predicted_peak_gib") is not None:
            notes.append(f"planner predicted {r['predicted_peak_gib']:.2f} GiB")
        if name in REFERENCE_ANCHORS:
            notes.append(f"docs/design.md §2 anchor: {REFERENCE_ANCHORS[name]}")
        lines.append(
            f"| {name} | {time_s} | {_fmt(r.get('peak_gib'), nd=2)} | {_fmt(r.get('tflops'))} | "
            f"{_fmt(r.get('pct_of_peak'), '%')} | {_fmt(r.get('x_floor'))} | {vs_s} | {'; '.join(notes)} |"
        )
    lines += ["", "| goal | target | measured | from | met |", "|---|---:|---:|---|---|"]
    for g in doc.get("goals", []):
        met = {True: "yes", False: "**no**", None: "not measured"}[g["met"]]
        lines.append(f"| {g['goal']} | {g['target']} | {_fmt(g['value'], nd=2)} | {g['from'] or ''} | {met} |")
    if doc.get("estimates"):
        lines.append("")
        lines += [f"- {key}: {value}" for key, value in doc["estimates"].items()]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ main


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                                  "cudnn": str(torch.backends.cudnn.version())}
    for pkg in ("diffusers", "transformers", "peft", "accelerate", "huggingface_hub", "diffsynth", "tokenizers",
                "safetensors", "pydantic"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the lent-GPU run: 390 s budget, 20 train steps, no extras")
    p.add_argument("--smoke", action="store_true", help="--tiny --device cpu with minimal steps (tests)")
    p.add_argument("--tiny", action="store_true", help="the tiny Kolors instead of the full-size architecture")
    p.add_argument("--device", help="cuda (default when available) or cpu (needs --tiny)")
    p.add_argument("--with-reference", action="store_true",
                   help="tiny mode: build DiffSynth's and our full-size UNets on the meta device and check the LoRA")
    p.add_argument("--out", type=Path, default=Path("bench/results.json"))
    p.add_argument("--only", type=lambda s: [x for x in s.split(",") if x], default=[],
                   help="comma-separated task names or prefixes (ignores the budget)")
    p.add_argument("--skip", type=lambda s: [x for x in s.split(",") if x], default=[])
    p.add_argument("--budget-s", type=float, help="skip tasks whose estimate would overrun (default: 390 with --quick)")
    p.add_argument("--work-dir", type=Path, help="model, dataset and job outputs (default: $TMPDIR/kolors-bench)")
    p.add_argument("--train-steps", type=int, help=f"job_train steps (default {TRAIN_STEPS_QUICK} with --quick, "
                                                  f"{TRAIN_STEPS_FULL} otherwise, 2 with --smoke)")
    p.add_argument("--story-steps", type=int, help=f"denoising steps per frame (default {STORY_STEPS}; 2 with --smoke)")
    p.add_argument("--images", type=int, help="training images written for job_train (default 8; 2 with --smoke)")
    p.add_argument("--target-s", type=float, help="timed seconds per measurement (default 2 quick, 6 otherwise)")
    p.add_argument("--iters", type=int, help="fixed timed iterations per measurement (overrides --target-s)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 with --smoke, which on a "
                                              "shared 2-core machine avoids OpenMP spin-waits 10x slower than work)")
    p.add_argument("--list", action="store_true", help="print the tasks in run order and exit")
    args = p.parse_args(argv)
    if args.smoke:
        args.tiny = True
        args.device = args.device or "cpu"
    args.train_steps = args.train_steps or (2 if args.smoke else TRAIN_STEPS_QUICK if args.quick else TRAIN_STEPS_FULL)
    args.story_steps = args.story_steps or (2 if args.smoke else STORY_STEPS)
    args.images = args.images or (2 if args.smoke else 8)
    args.target_s = args.target_s or (2.0 if (args.quick or args.smoke) else 6.0)
    if args.smoke and not args.iters:
        args.iters = 1
    if args.smoke and not args.threads:
        args.threads = 1
    if args.budget_s is None and args.quick:
        args.budget_s = 390.0
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.list:
        for task in tasks(args):
            print(f"{task.name:45s} ~{task.est_s:5.0f} s{'' if task.quick else '  (not in --quick)'}")
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cpu" and not args.tiny:
        print("error: the full-size architecture needs a GPU; use --tiny (or --smoke) on the CPU", file=sys.stderr)
        return 2
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    work_dir = args.work_dir or Path(tempfile.gettempdir()) / ("kolors-bench-tiny" if args.tiny else "kolors-bench")
    out_paths = [args.out.resolve()]
    env_out = os.environ.get("OUT")
    if env_out and not str(out_paths[0]).startswith(str(Path(env_out).resolve()) + os.sep):
        out_paths.append(Path(env_out).resolve() / "bench.json")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    meta: dict[str, Any] = {
        "command": "python -m bench.gpu " + " ".join(argv),
        "argv": argv,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "mode": mode,
        "tiny": args.tiny,
        "device": str(dev),
        "device_name": name,
        "gpu_memory_gib": round(torch.cuda.get_device_properties(dev).total_memory / GIB, 1)
        if dev.type == "cuda" else None,
        "cpu_count": os.cpu_count(),
        "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "versions": _versions(),
        "peak_tflops_assumed": _peak_tflops(name) if dev.type == "cuda" else None,
        "flops": {"cfg_step_tflop": CFG_TFLOP, "train_sample_tflop": TRAIN_TFLOP_PER_SAMPLE,
                  "how": "FlopCounterMode on the meta device, full-size UNet, 1024², 256 tokens, LoRA r16"},
        "budget_s": args.budget_s,
        "settings": {"train_steps": args.train_steps, "story_steps": args.story_steps, "images": args.images,
                     "target_s": args.target_s, "iters": args.iters, "work_dir": str(work_dir)},
        "goals": GOALS,
        "reference_anchors": {"source": "docs/design.md §2 (2026-11-24, H100, torch 2.11; not measured by this run)",
                              **REFERENCE_ANCHORS},
    }
    ctx = Ctx(args=args, dev=dev, tiny=args.tiny, mode=mode, budget_s=args.budget_s, work_dir=work_dir,
              out_paths=out_paths, doc={"meta": meta, "results": {}, "goals": [], "estimates": {}, "table_md": ""})
    print(f"bench.gpu: {mode} on {name} ({dev}), budget {args.budget_s} s, results -> "
          f"{', '.join(map(str, out_paths))}", flush=True)
    ctx.write()

    def on_signal(signum: int, _frame: Any) -> None:
        ctx.interrupted = True
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    current = None
    try:
        for task in tasks(args):
            current = task.name
            run_task(ctx, task)
        current = None
    except KeyboardInterrupt:  # `timeout -s INT`: keep what was measured
        if current and ctx.doc["results"].get(current, {}).get("status") == "running":
            ctx.doc["results"][current] = {"status": "interrupted", "reason": "signal (timeout?) during this task"}
        code = 130
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    ctx.doc["meta"]["total_s"] = round(ctx.elapsed(), 1)
    ctx.write()
    print()
    print(ctx.doc["table_md"])
    return code


if __name__ == "__main__":
    raise SystemExit(main())
