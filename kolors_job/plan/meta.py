"""Kolors' modules with shapes only (on the meta device, from the real configs of :mod:`kolors_job.models.configs`),
and what every simulation is: a frozen record of what decides the memory (``Sim``, cached by ``table`` under its
``key``) and what it measures (``Result``)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kolors_job.models.configs import KOLORS_TEXT_ENCODER_CONFIG, KOLORS_UNET_CONFIG, KOLORS_VAE_CONFIG

__all__ = [
    "AESTHETIC_CONFIG", "DTYPES", "SEQ", "Result", "Sim", "aesthetic_on_meta", "autocast", "module_tensors",
    "text_encoder_on_meta", "unet_on_meta", "vae_on_meta", "weights_as",
]  # fmt: skip


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


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


def unet_on_meta(rank: int | None = None, targets: tuple[str, ...] = (), dora: bool = False) -> torch.nn.Module:
    """Kolors' UNet (diffusers) with shapes only, frozen, with a peft LoRA of ``rank`` on ``targets`` (a DoRA, as
    ``train.setup.add_lora`` asks peft for it, with ``dora``: a magnitude vector per adapted layer)."""
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


def weights_as(dtype: str, trainable: str = "fp32") -> Callable[[str, torch.Tensor], torch.dtype]:
    """Frozen floating tensors in ``dtype``, trainable ones (the LoRA) in ``trainable``, integers as they are."""

    def dtype_of(_name: str, t: torch.Tensor) -> torch.dtype:
        if not t.is_floating_point():
            return t.dtype
        return DTYPES[trainable] if t.requires_grad else DTYPES[dtype]

    return dtype_of


def module_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def autocast(mixed: str) -> Any:
    import contextlib

    return torch.autocast("cpu", dtype=DTYPES[mixed]) if mixed != "no" else contextlib.nullcontext()


SEQ = 256
"""ChatGLM tokens per prompt (``KolorsPipeline.encode_prompt``'s ``max_sequence_length``)."""
