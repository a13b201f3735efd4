"""The reference's side of ``bench.gpu``: what the seed baseline runs (DiffSynth 1.1.9's ``SDXLUNet(is_kolors=True)``,
fp16 weights, a peft LoRA r16/α4 in fp32, Lightning ``16-mixed``, gradient checkpointing on; CFG as two batch-1
passes with the LoRA unmerged), measured the same way as ours."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import math
import re
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch

from bench.context import CannotRunError, Ctx, cuda_flags
from bench.facts import REF_TARGETS

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
    with cuda_flags(ctx, benchmark=False):  # Lightning's default: cudnn.benchmark off
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
