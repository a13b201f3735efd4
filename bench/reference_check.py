"""Full-size check of the story's sampling-precision decisions (for a lent GPU; ``--tiny`` runs it on the CPU).

The CPU tests prove on the tiny model that a LoRA fused into fp16 weights draws what the unfused LoRA draws and
that bf16 rounds a small LoRA away (tests/test_reference_oracle.py). This repeats both on the real 2.6 B-parameter
Kolors UNet (random weights) with a default-shaped LoRA (r16, α4, at the story's scale 0.5) whose update is
``--ratio`` of each weight's norm, through the story's own code (``apply_lora``, ``to_device``: LoRA merged,
q/k/v fused, channels-last):

- ``retention[dtype]``: the fraction of the LoRA update that survives being fused into ``dtype`` weights;
- ``error[dtype/path]``: mean |UNet output − exact fp32 output with the LoRA unfused| on random inputs at
  ``--size`` (1024² by default), for the unfused and the fused path; ``effect``: the LoRA's own mean effect.

It prints one JSON object and exits 1 if fused fp16 is worse than 1.5 × unfused fp16 or keeps < 95 % of the LoRA.
Usage: ``python -m bench.reference_check`` on a GPU (about 30 GB, well under a minute after the imports);
``python -m bench.reference_check --tiny`` for the CPU self-check.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from kolors_job.manifest.story import StorySpec
from kolors_job.manifest.train import TrainSpec
from kolors_job.models.configs import KOLORS_UNET_CONFIG
from kolors_job.models.loading import load_kolors_components, make_pipeline
from kolors_job.models.tiny import build_tiny_kolors
from kolors_job.render.pipeline import apply_lora, to_device
from kolors_job.train.adapter import save_lora

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def base_unet(tiny: Path, full: bool, device: torch.device) -> torch.nn.Module:
    """The fp32 UNet under test: full-size Kolors with random weights, or the tiny model's."""
    from diffusers import UNet2DConditionModel

    if not full:
        return UNet2DConditionModel.from_pretrained(tiny / "unet", torch_dtype=torch.float32).to(device)
    torch.manual_seed(0)
    with torch.device(device):
        return UNet2DConditionModel(**copy.deepcopy(KOLORS_UNET_CONFIG))


def write_lora(unet: torch.nn.Module, out: Path, ratio: float, *, spec: TrainSpec | None = None,
               scale: float | None = None) -> Path:  # fmt: skip
    """A LoRA shaped as ``spec`` trains it (rank, alpha, targets; default ``TrainSpec()``) whose update at the
    sampling scale ``scale`` (default the story's) is ``ratio`` of each weight's norm."""
    from peft import LoraConfig

    spec = spec or TrainSpec()
    scale = StorySpec().lora_scale if scale is None else scale
    torch.manual_seed(0)
    lora = copy.deepcopy(unet)
    lora.add_adapter(LoraConfig(r=spec.rank, lora_alpha=spec.alpha, init_lora_weights="gaussian",
                                target_modules=spec.target_modules))
    with torch.no_grad():
        for module in lora.modules():
            if "default" in getattr(module, "lora_B", {}):
                b, a = module.lora_B["default"].weight, module.lora_A["default"].weight
                b.normal_()
                effective = (b @ a) * module.scaling["default"] * scale
                b.mul_(ratio * module.base_layer.weight.norm() / effective.norm())
    save_lora(lora, out, spec)
    return out


def story_unet(tiny: Path, unet: torch.nn.Module, lora: Path | None, dtype: torch.dtype, fused: bool,
               device: torch.device, *, fast: bool = True) -> torch.nn.Module:
    """``unet`` in ``dtype`` with the LoRA applied as the story applies it (tiny text encoder/VAE around it)."""
    comps = load_kolors_components(tiny, dtype=dtype)
    comps.unet = torch.nn.Module.to(copy.deepcopy(unet), dtype=dtype)  # diffusers' .to warns about nothing
    pipe = make_pipeline(comps, "reference")
    if lora is not None:
        apply_lora(pipe, lora, StorySpec().lora_scale, fuse=fused)
    if fast:
        to_device(pipe, StorySpec(), device, fused=fused)
    return pipe.unet.to(device)


def inputs(unet: torch.nn.Module, size: int, device: torch.device) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    hidden = unet.config.encoder_hid_dim
    return {
        "sample": torch.randn(2, 4, size // 8, size // 8, generator=gen).to(device),
        "timestep": torch.tensor([500.0, 500.0], device=device),
        "encoder_hidden_states": torch.randn(2, 256, hidden, generator=gen).to(device),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(2, hidden, generator=gen).to(device),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32, device=device),
        },
    }


@torch.no_grad()
def output(unet: torch.nn.Module, x: dict[str, Any]) -> torch.Tensor:
    dtype = unet.dtype
    cond = x["added_cond_kwargs"]
    cast = {k: (v.to(dtype) if k in ("sample", "encoder_hidden_states") else v) for k, v in x.items()}
    cast["added_cond_kwargs"] = {**cond, "text_embeds": cond["text_embeds"].to(dtype)}
    return unet(**cast).sample.float()


def error(unet: torch.nn.Module, x: dict[str, Any], exact: torch.Tensor) -> float:
    return (output(unet, x) - exact).abs().mean().item()


def retention(tiny: Path, unet: torch.nn.Module, lora: Path, dtype: torch.dtype, device: torch.device) -> float:
    exact = dict(story_unet(tiny, unet, lora, torch.float32, True, device, fast=False).named_parameters())
    low = dict(story_unet(tiny, unet, lora, dtype, True, device, fast=False).named_parameters())
    kept = total = 0.0
    for name, w0 in unet.named_parameters():
        delta = exact[name].detach() - w0.detach()
        if delta.abs().max() == 0:
            continue
        got = low[name].detach().float() - w0.detach().to(dtype).float()
        kept += float((got * delta).sum())
        total += float((delta * delta).sum())
    return kept / total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (self-check)")
    parser.add_argument("--ratio", type=float, default=1e-3, help="‖ΔW‖/‖W‖ of the LoRA at the story's scale")
    parser.add_argument("--size", type=int, default=None, help="image size (default 1024, tiny 64)")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.tiny else "cuda")
    size = args.size or (64 if args.tiny else 1024)
    work = Path(tempfile.mkdtemp(prefix="reference-check-"))
    tiny = build_tiny_kolors(work / "tiny-kolors", seed=0)
    unet = base_unet(tiny, not args.tiny, device)
    lora = write_lora(unet, work / "lora", args.ratio)
    x = inputs(unet, size, device)
    exact = output(story_unet(tiny, unet, lora, torch.float32, False, device, fast=False), x)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "ratio": args.ratio,
        "size": size,
        "effect": (exact - output(story_unet(tiny, unet, None, torch.float32, False, device, fast=False), x))
        .abs().mean().item(),
        "retention": {k: retention(tiny, unet, lora, d, device) for k, d in DTYPES.items()},
        "error": {
            f"{k}/{'fused' if fused else 'unfused'}": error(story_unet(tiny, unet, lora, d, fused, device), x, exact)
            for k, d in DTYPES.items()
            for fused in (False, True)
        },
    }
    ok = result["error"]["fp16/fused"] <= 1.5 * result["error"]["fp16/unfused"] and result["retention"]["fp16"] > 0.95
    result["ok"] = ok
    print(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
