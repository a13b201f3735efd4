"""The LoRA adapter on a peft-wrapped UNet: written as diffusers-format files (what ``load_lora_weights``
reads, rank/alpha kept), read back strictly, and digested.

Written by the trainer at the end and inside every checkpoint (accelerate's save hook), read back on
resume; the digest identifies the weights independent of file headers (equal on all DDP ranks).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kolors_job.export.lora_io import LORA_CONFIG_NAME, LORA_WEIGHT_NAME, canonical_safetensors

if TYPE_CHECKING:
    from kolors_job.manifest.train import TrainSpec


def lora_metadata(unet: torch.nn.Module) -> dict[str, Any]:
    """The adapter's peft config as stored in the safetensors header; sets sorted so the bytes are stable."""
    cfg = unet.peft_config["default"].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in cfg.items()}


def save_lora(
    unet: torch.nn.Module, out_dir: Path, train: TrainSpec, extra: dict[str, Any] | None = None
) -> Path:
    """Write the diffusers-format LoRA; rank/alpha go into the header (``load_lora_weights`` reads them
    back, else it would assume alpha = rank: a 4x stronger LoRA for r16/α4) and into ``lora_config.json``."""
    from diffusers import KolorsPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    out_dir.mkdir(parents=True, exist_ok=True)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    layers = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in layers.items()}
    KolorsPipeline.save_lora_weights(
        save_directory=out_dir,
        unet_lora_layers=layers,
        weight_name=LORA_WEIGHT_NAME,
        safe_serialization=True,
        unet_lora_adapter_metadata=lora_metadata(unet),
    )
    canonical_safetensors(out_dir / LORA_WEIGHT_NAME)
    config = {
        "rank": train.rank,
        "alpha": train.alpha,
        "scale": train.alpha / train.rank,
        "target_modules": list(train.target_modules),
        "init_lora_weights": train.init_lora_weights,
        "format": "diffusers",
        "tensors": len(layers),
        **(extra or {}),
    }
    (out_dir / LORA_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def lora_digest(unet: torch.nn.Module) -> str:
    """sha256 over the LoRA tensors (names + fp32 bytes), independent of file headers."""
    from peft.utils import get_peft_model_state_dict

    h = hashlib.sha256()
    for key, value in sorted(get_peft_model_state_dict(unet).items()):
        h.update(key.encode())
        h.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def load_lora_into(unet: torch.nn.Module, lora_dir: Path) -> None:
    """Load a LoRA written by :func:`save_lora` into a peft-adapted UNet (adapter ``default``), strictly."""
    from diffusers import KolorsPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    state, _alphas = KolorsPipeline.lora_state_dict(str(lora_dir), weight_name=LORA_WEIGHT_NAME)
    unet_state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    result = set_peft_model_state_dict(
        unet, convert_unet_state_dict_to_peft(unet_state), adapter_name="default"
    )
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(
            f"{lora_dir}: {len(unexpected)} LoRA keys do not fit this UNet, e.g. {unexpected[0]}"
        )
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise ValueError(f"{lora_dir}: {len(missing)} LoRA tensors missing, e.g. {missing[0]}")
