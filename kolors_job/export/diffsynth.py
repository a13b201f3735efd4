"""The DiffSynth-Studio 1.1.9 format (the challenge baseline): ``<DiffSynth module>.lora_A/B.default.weight``
with B pre-scaled by α/α_load for the reference's load α, as ``.safetensors`` and, for the notebook's plain
``torch.load``, the same tensors as a ``.ckpt`` beside it.

Module names come from DiffSynth's own ``SDXLUNetStateDictConverter`` applied to the *base* UNet's key
names (docs/design.md §5), and every export is checked against the parameters the consumer actually
creates, because the reference loader uses ``strict=False`` and would silently drop a wrong key.
DiffSynth builds only the full-size Kolors UNet, so whether a LoRA fits it is decided here, once
(``needs_full_size_kolors``), for ``export_all`` and the runner alike.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kolors_job.export.diffsynth_names import diffsynth_module_map, kolors_unet_config
from kolors_job.export.lora_io import LoraInfo, file_metadata, resolve_info, save_lora, scaled
from kolors_job.export.registry import ExportFormat, ExportSource, register

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_DIFFSYNTH_LOAD_ALPHA",
    "DIFFSYNTH_TARGET_MODULES",
    "FULL_SIZE_ONLY",
    "diffsynth_file_names",
    "diffsynth_lora_parameter_shapes",
    "diffsynth_state_dict",
    "export_diffsynth",
    "fits_full_size_kolors",
    "model_manager_alpha",
    "needs_full_size_kolors",
]

log = logging.getLogger(__name__)

DEFAULT_DIFFSYNTH_LOAD_ALPHA = 2.0
"""The reference notebook injects ``LoraConfig(r=16, lora_alpha=2.0)`` at sampling time (docs/design.md §7)."""

DIFFSYNTH_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out")
"""The reference's peft ``target_modules`` for DiffSynth's ``SDXLUNet`` (its ``to_out`` is a bare Linear)."""

FULL_SIZE_ONLY = "the base UNet is not the full-size Kolors architecture (e.g. tiny://kolors)"
"""Why a LoRA of another UNet size gets no DiffSynth file (report.json ``lora_formats_skipped``)."""


DIFFSYNTH_DORA = (
    "DiffSynth 1.1.9 loads a LoRA as plain A/B pairs (the reference injects `LoraConfig` without `use_dora` and "
    "loads with strict=False; `ModelManager.load_lora` merges B·A), so it would silently drop the magnitudes"
)
"""Why ``train.dora`` gets no DiffSynth file."""








@functools.lru_cache(maxsize=4)
def diffsynth_lora_parameter_shapes(rank: int) -> dict[str, tuple[int, ...]]:
    """Name → shape of every LoRA parameter the reference loader creates in ``SDXLUNet(is_kolors=True)``.

    Built on the meta device with the reference's exact ``LoraConfig``; the ground truth that an
    export is checked against (α does not change names or shapes).
    """
    import torch
    from diffsynth.models.sdxl_unet import SDXLUNet
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=rank,
        lora_alpha=DEFAULT_DIFFSYNTH_LOAD_ALPHA,
        init_lora_weights="gaussian",
        target_modules=list(DIFFSYNTH_TARGET_MODULES),
    )
    with torch.device("meta"):
        model = inject_adapter_in_model(config, SDXLUNet(is_kolors=True))
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if ".lora_" in k}


def diffsynth_state_dict(
    modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    tensor_scale: float,
    rank: int,
    *,
    load_alpha: float = DEFAULT_DIFFSYNTH_LOAD_ALPHA,
    unet_config: Mapping[str, Any] | None = None,
    validate: bool = True,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``(DiffSynth LoRA state dict, modules zero-filled)``.

    The reference injects with ``lora_alpha=load_alpha`` → peft scale ``load_alpha / r``; we want
    ``tensor_scale`` (α/r), so B is multiplied by ``tensor_scale · r / load_alpha``. With
    ``validate`` the key set and shapes must equal exactly the LoRA parameters DiffSynth creates:
    an unexpected key or wrong shape raises; a DiffSynth LoRA module we have no weights for (the
    training targeted fewer modules) is written as zeros, so ``load_state_dict(strict=False)``
    reports nothing missing and that module stays a no-op, as in training.
    """
    import torch

    name_map = diffsynth_module_map(unet_config)
    factor = tensor_scale * rank / load_alpha
    out: dict[str, torch.Tensor] = {}
    for module, (a, b) in modules.items():
        if module not in name_map:
            raise ValueError(f"LoRA module {module!r} is not a weight of the Kolors UNet")
        target = name_map[module]
        out[f"{target}.lora_A.default.weight"] = scaled(a, 1.0)
        out[f"{target}.lora_B.default.weight"] = scaled(b, factor)
    zero_filled: list[str] = []
    if validate:
        expected = diffsynth_lora_parameter_shapes(rank)
        unexpected = sorted(set(out) - set(expected))
        if unexpected:
            raise ValueError(
                f"{len(unexpected)} DiffSynth LoRA keys are not parameters of SDXLUNet(is_kolors=True), "
                f"e.g. {unexpected[0]!r} (strict=False would silently drop them)"
            )
        wrong = [(k, tuple(v.shape), expected[k]) for k, v in out.items() if tuple(v.shape) != expected[k]]
        if wrong:
            raise ValueError(f"DiffSynth LoRA shape mismatch: {wrong[0]}")
        dtype = next(iter(out.values())).dtype
        for key in sorted(set(expected) - set(out)):
            out[key] = torch.zeros(expected[key], dtype=dtype)
            module = key.split(".lora_")[0]
            if not zero_filled or zero_filled[-1] != module:
                zero_filled.append(module)
        if zero_filled:
            log.warning("DiffSynth export: %d untrained LoRA modules written as zeros", len(zero_filled))
    return out, zero_filled


def export_diffsynth(
    state_dict: Mapping[str, torch.Tensor],
    info: LoraInfo,
    out_path: str | os.PathLike[str],
    *,
    load_alpha: float = DEFAULT_DIFFSYNTH_LOAD_ALPHA,
    metadata: Mapping[str, str] | None = None,
    unet_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write the LoRA as DiffSynth 1.1.9's reference loader expects it.

    Keys are the parameter names peft creates in DiffSynth's ``SDXLUNet(is_kolors=True)`` with
    ``LoraConfig(r=rank, lora_alpha=load_alpha, init_lora_weights="gaussian",
    target_modules=["to_q","to_k","to_v","to_out"])`` — e.g.
    ``blocks.7.transformer_blocks.0.attn1.to_q.lora_A.default.weight`` — and B is rescaled so that
    injecting with ``load_alpha`` reproduces the trained update (see ``diffsynth_state_dict``). The
    load α is recorded in the metadata (``kolors_job.diffsynth_load_alpha``) and the model card.
    ``.safetensors`` (default) or ``.ckpt``/``.pt`` (``torch.load``-able, as the reference notebook
    reads its Lightning checkpoint). Returns ``out_path``.
    """
    info, modules, tensor_scale = resolve_info(info, state_dict, metadata)
    assert info.rank is not None
    tensors, zero_filled = diffsynth_state_dict(
        modules, tensor_scale, info.rank, load_alpha=load_alpha, unet_config=unet_config
    )
    meta = file_metadata(
        info,
        "diffsynth",
        diffsynth_load_alpha=repr(float(load_alpha)),
        diffsynth_lora_rank=str(info.rank),
        diffsynth_target_modules=json.dumps(list(DIFFSYNTH_TARGET_MODULES)),
        zero_filled_modules=str(len(zero_filled)),
    )
    return save_lora(tensors, Path(out_path), meta)


# --------------------------------------------------------------------------------------------
# the one full-size policy, the file pair, the registration
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _full_size_weight_shapes() -> dict[str, tuple[int, ...]]:
    """``{diffusers module: weight shape}`` of the full-size Kolors UNet (meta device: no memory, ~0.1 s)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**kolors_unet_config())
    return {k.removesuffix(".weight"): tuple(v.shape) for k, v in unet.state_dict().items() if k.endswith(".weight")}


def fits_full_size_kolors(modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Does any LoRA module have the shape the full-size Kolors UNet gives that module?

    No match at all means a differently sized UNet (the tiny test/demo model), which DiffSynth cannot
    load; a partial match is a real mismatch and is left to ``export_diffsynth`` to reject loudly.
    """
    shapes = _full_size_weight_shapes()
    return any(shapes.get(m, ())[:2] == (b.shape[0], a.shape[1]) for m, (a, b) in modules.items())


def needs_full_size_kolors(modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> str | None:
    """The registry's skip check: ``FULL_SIZE_ONLY`` for a LoRA of another UNet size, else ``None``."""
    return None if fits_full_size_kolors(modules) else FULL_SIZE_ONLY


def model_manager_alpha(load_alpha: float, rank: int) -> float:
    """The ``lora_alpha`` for ``ModelManager.load_lora``: it merges ``lora_alpha · B A`` with no ``/ r``
    (``GeneralLoRAFromPeft.load``), so the injection's ``load_alpha / r`` must be passed; ``load_alpha``
    itself would be r times too strong."""
    return float(load_alpha) / rank


def diffsynth_file_names(info: LoraInfo) -> dict[str, str]:
    """``{"diffsynth": safetensors, "diffsynth_ckpt": the same tensors as a torch pickle}``."""
    return {"diffsynth": f"{info.slug}_diffsynth.safetensors", "diffsynth_ckpt": f"{info.slug}_diffsynth.ckpt"}


def _write(src: ExportSource, out_dir: Path) -> dict[str, Path]:
    """The safetensors file, then a ``.ckpt`` of exactly its tensors: the challenge notebook reads its LoRA
    with a bare ``torch.load(path)``, which a torch without safetensors routing cannot do on ``.safetensors``."""
    from safetensors.torch import load_file

    names = diffsynth_file_names(src.info)
    path = export_diffsynth(
        src.state_dict, src.info, out_dir / names["diffsynth"], load_alpha=src.load_alpha, metadata=src.metadata
    )
    ckpt = save_lora(load_file(str(path)), out_dir / names["diffsynth_ckpt"], {})
    return {"diffsynth": path, "diffsynth_ckpt": ckpt}


def _card_rows(info: LoraInfo, load_alpha: float) -> dict[str, tuple[str, str]]:
    note = f"inject with `lora_alpha={float(load_alpha)!r}`"
    if info.rank:
        note += f"; `ModelManager.load_lora(..., lora_alpha={model_manager_alpha(load_alpha, info.rank)!r})`"
    return {"diffsynth": ("DiffSynth-Studio 1.1.9", note), "diffsynth_ckpt": ("the same, for `torch.load`", note)}


register(
    ExportFormat(
        name="diffsynth",
        title="DiffSynth",
        file_names=diffsynth_file_names,
        write=_write,
        order=30,
        card_rows=_card_rows,
        skip_reason=needs_full_size_kolors,
        dora=DIFFSYNTH_DORA,
    )
)
