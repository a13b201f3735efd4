"""The diffusers/peft format: ``unet.<module>.lora.down/up.weight`` with α/r baked into B, under the
name ``KolorsPipeline.load_lora_weights(dir)`` looks for. ComfyUI does not read it (the kohya file is ComfyUI's)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from kolors_job.export.lora_io import (
    LORA_WEIGHT_NAME,
    LoraInfo,
    file_metadata,
    lora_magnitudes,
    resolve_info,
    save_lora,
    scaled,
)
from kolors_job.export.registry import ExportFormat, ExportSource, register

if TYPE_CHECKING:
    import torch

__all__ = ["diffusers_state_dict", "export_diffusers"]


def diffusers_state_dict(
    modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    tensor_scale: float,
    magnitudes: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The keys ``KolorsPipeline.save_lora_weights`` writes, with α/r baked into B; a DoRA's magnitudes as
    ``unet.<module>.lora_magnitude_vector``, the key from which diffusers' ``get_peft_kwargs`` turns on
    ``use_dora`` (DoRA normalises ``W + s·B A``, so baking ``s`` into B keeps it exact)."""
    out: dict[str, torch.Tensor] = {}
    for module, (a, b) in modules.items():
        out[f"unet.{module}.lora.down.weight"] = scaled(a, 1.0)
        out[f"unet.{module}.lora.up.weight"] = scaled(b, tensor_scale)
    for module, m in (magnitudes or {}).items():
        out[f"unet.{module}.lora_magnitude_vector"] = scaled(m, 1.0)
    return out


def export_diffusers(
    state_dict: Mapping[str, torch.Tensor],
    info: LoraInfo,
    out_dir: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``out_dir/pytorch_lora_weights.safetensors`` for ``KolorsPipeline.load_lora_weights``.

    Why bake α/r into B instead of writing diffusers' ``lora_adapter_metadata``: without metadata
    diffusers builds its ``LoraConfig`` with ``lora_alpha = r`` (``get_peft_kwargs``), and a
    ``LoraConfig.to_dict()`` from a new peft fails to construct on older peft versions. Baking gives
    the same output in both. (ComfyUI is not a reader of this file: its key map matches essentially
    none of these keys, 0 of the reference LoRA's 1120; it reads the kohya export.) The training
    α is kept as informational ``kolors_job.*`` metadata (with ``alpha_baked=true``) so reading the
    file back never scales twice. Returns the file path.
    """
    info, modules, tensor_scale = resolve_info(info, state_dict, metadata)
    magnitudes = lora_magnitudes(state_dict)
    tensors = diffusers_state_dict(modules, tensor_scale, magnitudes)
    extra = {"dora": "true"} if magnitudes else {}
    meta = file_metadata(info, "diffusers", alpha_baked="true", baked_scale=repr(tensor_scale), **extra)
    return save_lora(tensors, Path(out_dir) / LORA_WEIGHT_NAME, meta)


def _write(src: ExportSource, out_dir: Path) -> dict[str, Path]:
    return {"diffusers": export_diffusers(src.state_dict, src.info, out_dir, metadata=src.metadata)}


register(
    ExportFormat(
        name="diffusers",
        title="diffusers",
        file_names=lambda info: {"diffusers": LORA_WEIGHT_NAME},
        write=_write,
        order=10,
        dora=None,  # diffusers' loader reads lora_magnitude_vector and builds peft's DoRA layers
        card_rows=lambda info, load_alpha: {
            "diffusers": ("diffusers `load_lora_weights`", "α/r baked into the up weights: load at scale 1")
        },
    )
)
