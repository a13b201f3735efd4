"""The kohya/WebUI format, the file ComfyUI reads: ``lora_unet_<diffusers module, . → _>`` with
``.lora_down/.lora_up.weight`` and a per-module ``.alpha`` = α, B as trained."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kolors_job.export.card import fmt
from kolors_job.export.lora_io import LoraInfo, file_metadata, lora_modules, resolve_info, save_lora, scaled
from kolors_job.export.registry import ExportFormat, ExportSource, register

if TYPE_CHECKING:
    import torch

__all__ = ["export_kohya", "kohya_file_name", "kohya_state_dict"]


KOHYA_DORA = (
    "its readers disagree on what `dora_scale` means: ComfyUI (comfy/weight_adapter/base.py, weight_decompose) "
    "wants it shaped [out, 1] and divides by the base weight's row norms, diffusers loads it as peft's [out] "
    "magnitude and divides by the adapted weight's, so no one file reproduces the trained DoRA in both; "
    "use the diffusers file"
)
"""Why ``train.dora`` gets no kohya file (sd-scripts' own ``networks.lora`` has no DoRA at all)."""


def kohya_state_dict(
    modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]], tensor_scale: float
) -> dict[str, torch.Tensor]:
    """Kohya keys from diffusers' own ``convert_state_dict_to_kohya``, with a real ``.alpha``.

    ``convert_state_dict_to_kohya`` writes ``alpha = rank`` (scale 1); we replace it with
    ``tensor_scale · rank`` (= the training α for a raw LoRA) so every kohya reader applies
    ``alpha / rank`` exactly as training did, and B stays as trained.
    """
    import torch
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    peft: dict[str, torch.Tensor] = {}
    for module, (a, b) in modules.items():
        peft[f"unet.{module}.lora_A.weight"] = scaled(a, 1.0)
        peft[f"unet.{module}.lora_B.weight"] = scaled(b, 1.0)
    kohya = convert_state_dict_to_kohya(peft)
    for key in list(kohya):
        if key.endswith(".alpha"):
            down = kohya[key.removesuffix(".alpha") + ".lora_down.weight"]
            kohya[key] = torch.tensor(float(tensor_scale) * down.shape[0], dtype=torch.float32)
    return kohya


def _check_kohya_roundtrip(kohya: Mapping[str, torch.Tensor], modules: Mapping[str, Any]) -> None:
    """diffusers' non-diffusers path must map every key back to the module it came from."""
    back, _ = lora_modules(kohya)
    if set(back) != set(modules):
        missing = sorted(set(modules) - set(back))[:3]
        extra = sorted(set(back) - set(modules))[:3]
        raise RuntimeError(
            f"kohya keys do not round-trip through diffusers: missing {missing}, extra {extra}"
        )


def export_kohya(
    state_dict: Mapping[str, torch.Tensor],
    info: LoraInfo,
    out_path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a kohya/WebUI-style file for ComfyUI: ``lora_unet_<module>.lora_down/up.weight``, ``.alpha``.

    Which spelling of the module path, checked against the sources:

    * ComfyUI ``comfy/lora.py::model_lora_keys_unet`` registers *both* ``lora_unet_<SGM key>``
      (``input_blocks_4_1_...``, from the model's own state dict) and ``lora_unet_<diffusers key>``
      (``down_blocks_1_attentions_0_...``, via ``comfy.utils.unet_to_diffusers(unet_config)``). The
      Kolors ComfyUI integrations (ComfyUI-Kolors-MZ registers ``class Kolors(supported_models.SDXL)``
      with the SDXL ``unet_config``) use that same key map, so both spellings load there. (WebUI-style
      loaders such as SD.Next's also build a diffusers → LDM map for SDXL ``lora_unet_down_blocks_*``.)
    * diffusers 0.39: ``KolorsPipeline`` uses ``StableDiffusionLoraLoaderMixin``, whose
      ``lora_state_dict`` remaps SGM block numbers only when the caller passes ``unet_config=...``
      (the SDXL mixin does it for you, the Kolors one does not). Without it
      ``_convert_unet_lora_key`` turns ``input_blocks_4_1`` into ``down_blocks.4.1``, a module that
      does not exist: tried here, ``pipe.load_lora_weights`` fails with peft's
      ``NoMatchingPeftModuleError`` (a file mixing spellings would lose the SGM part with only a
      warning). The diffusers spelling converts to the right module with no extra argument.

    So the diffusers spelling is the one both accept; the export verifies the round trip through
    diffusers' converter. Returns ``out_path``.
    """
    info, modules, tensor_scale = resolve_info(info, state_dict, metadata)
    kohya = kohya_state_dict(modules, tensor_scale)
    _check_kohya_roundtrip(kohya, modules)
    meta = file_metadata(info, "kohya")
    meta.update(
        {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(info.rank),
            "ss_network_alpha": repr(tensor_scale * (info.rank or 0)),
            "ss_sd_model_name": info.base_model,
        }
    )
    return save_lora(kohya, Path(out_path), meta)


def kohya_file_name(info: LoraInfo) -> str:
    return f"{info.slug}_comfyui.safetensors"


def _write(src: ExportSource, out_dir: Path) -> dict[str, Path]:
    path = out_dir / kohya_file_name(src.info)
    return {"kohya": export_kohya(src.state_dict, src.info, path, metadata=src.metadata)}


register(
    ExportFormat(
        name="kohya",
        title="kohya",
        file_names=lambda info: {"kohya": kohya_file_name(info)},
        write=_write,
        order=20,
        dora=KOHYA_DORA,
        card_rows=lambda info, load_alpha: {
            "kohya": ("ComfyUI / WebUI (kohya keys)", f"`.alpha` = {fmt(info.alpha)} per module")
        },
    )
)
