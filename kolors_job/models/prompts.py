"""Prompt embeddings exactly as ``KolorsPipeline`` computes them: ChatGLM3's 256 tokens, the ``hidden_states[-2]``
sequence and the last token of ``hidden_states[-1]`` pooled, each prompt encoded alone. Training conditions on
them and sampling draws with them: re-implementing the encoder is how trainers drift (wrong layer, wrong length,
zeroed empties)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import KolorsPipeline

__all__ = ["MAX_SEQUENCE_LENGTH", "PromptEmbeds", "encode_captions"]


MAX_SEQUENCE_LENGTH = 256
"""Kolors' ChatGLM prompt length at sampling time (``KolorsPipeline.__call__``'s default)."""


@dataclass(frozen=True)
class PromptEmbeds:
    """One caption's conditioning, batch dim removed: ``embeds`` [seq, hidden], ``pooled`` [hidden]."""

    embeds: torch.Tensor
    pooled: torch.Tensor


@torch.no_grad()
def encode_captions(
    pipe: KolorsPipeline,
    captions: Iterable[str],
    *,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    max_sequence_length: int = MAX_SEQUENCE_LENGTH,
) -> dict[str, PromptEmbeds]:
    """Encode each distinct caption (``""`` included: empty prompts are *encoded*, never zeroed).

    One caption per call, exactly like a direct ``encode_prompt(caption)``, so the tensors equal it bit
    for bit (a batched call may round differently). Results go to the CPU (in ``dtype`` if given).
    """
    out: dict[str, PromptEmbeds] = {}
    for caption in dict.fromkeys(captions):
        embeds, _, pooled, _ = pipe.encode_prompt(
            caption,
            device=torch.device(device),
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        out[caption] = PromptEmbeds(
            embeds=embeds[0].to("cpu", dtype or embeds.dtype),
            pooled=pooled[0].to("cpu", dtype or pooled.dtype),
        )
    return out
