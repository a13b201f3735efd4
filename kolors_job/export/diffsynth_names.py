"""DiffSynth-Studio's module names for the diffusers Kolors UNet, from DiffSynth's own converter.

Read by ``lora_io`` (a LoRA file keyed by DiffSynth names, such as the reference trainer's checkpoint) and by
the ``diffsynth`` format that writes them: so it stands below both.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Mapping
from typing import Any

__all__ = ["diffsynth_module_map", "kolors_unet_config"]


def kolors_unet_config() -> dict[str, Any]:
    from kolors_job.models.configs import KOLORS_UNET_CONFIG

    return copy.deepcopy(KOLORS_UNET_CONFIG)


@functools.lru_cache(maxsize=4)
def _diffsynth_module_map_cached(unet_config_json: str) -> dict[str, str]:
    import torch
    from diffsynth.models.sdxl_unet import SDXLUNet
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**json.loads(unet_config_json))
    names = list(unet.state_dict().keys())
    # Tag every base key with its index: the converter only renames (and squeezes proj_in/out),
    # so the tag tells us which diffusers key each DiffSynth key came from, whatever the order.
    tagged = {name: torch.tensor([i]) for i, name in enumerate(names)}
    converted = SDXLUNet.state_dict_converter().from_diffusers(tagged)
    if isinstance(converted, tuple):
        converted = converted[0]
    if len(converted) != len(names):
        raise RuntimeError(f"DiffSynth's converter merged keys: {len(names)} -> {len(converted)}")
    mapping: dict[str, str] = {}
    for new_name, tag in converted.items():
        old_name = names[int(tag.reshape(-1)[0])]
        if old_name.endswith(".weight") and new_name.endswith(".weight"):
            mapping[old_name.removesuffix(".weight")] = new_name.removesuffix(".weight")
    return mapping


def diffsynth_module_map(unet_config: Mapping[str, Any] | None = None) -> dict[str, str]:
    """``{diffusers module path: DiffSynth module path}`` for every weight of the base Kolors UNet.

    Derived by running DiffSynth's ``SDXLUNetStateDictConverter.from_diffusers`` over the base
    UNet's full key list (built on the meta device: no memory). The converter numbers DiffSynth
    blocks by counting the blocks it sees, so it must see all of them — a partial LoRA would be
    misnumbered (docs/design.md §5).
    """
    cfg = dict(unet_config) if unet_config is not None else kolors_unet_config()
    return dict(_diffsynth_module_map_cached(json.dumps(cfg, sort_keys=True)))
