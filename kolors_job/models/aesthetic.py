"""The aesthetics-predictor-v2 (CLIP ViT-L/14 + a linear head), loaded once and scoring as the challenge does.

The challenge's seed code (docs/design.md §7) scores each image with::

    inputs = processor(images=image, return_tensors="pt")
    score = predictor(**inputs).logits[0][0]     # AestheticsPredictorV2Linear, float32

The quality gate must reproduce that number, not an approximation of it, so ``AestheticScorer.score`` runs
the same processor and model one image at a time by default (batching changes GEMM shapes and can move the
last digits). The predictor is a ``CLIPVisionModelWithProjection``: its forward already returns the
L2-normalised CLIP image embedding it scores (``hidden_states``), which gives the style-consistency metric
(``pairwise_consistency``) for free.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from kolors_job.core.errors import InputError

__all__ = ["AestheticScorer", "pairwise_consistency"]


@dataclass
class AestheticScorer:
    """The challenge's predictor + processor, loaded once and reused for every frame/candidate."""

    predictor: Any  # aesthetics_predictor.AestheticsPredictorV2Linear
    processor: Any  # transformers.CLIPProcessor
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def load(cls, path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> AestheticScorer:
        """Load from a local directory (the resolved ``ScoreSpec.aesthetic_model``).

        fp32 is what the challenge runs; fp16/bf16 are allowed for speed but move scores slightly.
        """
        from aesthetics_predictor import AestheticsPredictorV2Linear
        from transformers import CLIPProcessor

        path = Path(path)
        if not path.is_dir():
            raise InputError(f"aesthetic model {path} is not a directory")
        try:
            predictor = AestheticsPredictorV2Linear.from_pretrained(str(path))
            processor = CLIPProcessor.from_pretrained(str(path))
        except (OSError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"aesthetic model {path}: cannot load: {first}") from None
        dev = torch.device(device)
        predictor = predictor.to(device=dev, dtype=dtype).eval()
        return cls(predictor=predictor, processor=processor, device=dev, dtype=dtype)

    def _forward(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self.processor(images=list(images), return_tensors="pt")
        inputs = {
            k: v.to(self.device, self.dtype) if torch.is_floating_point(v) else v.to(self.device)
            for k, v in inputs.items()
        }
        with torch.no_grad():
            out = self.predictor(**inputs)
        logits = out.logits[:, 0].float().cpu()
        embeds = torch.nn.functional.normalize(out.hidden_states.float(), dim=-1).cpu()
        return logits, embeds

    def score_and_embed(
        self, images: Sequence[Image.Image], batch_size: int = 1
    ) -> tuple[list[float], torch.Tensor]:
        """Scores and L2-normalised CLIP image embeddings from one forward pass per batch."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        scores: list[float] = []
        embeds: list[torch.Tensor] = []
        for start in range(0, len(images), batch_size):
            logits, emb = self._forward(images[start : start + batch_size])
            scores.extend(float(x) for x in logits.tolist())
            embeds.append(emb)
        dim = int(getattr(self.predictor.config, "projection_dim", 0))
        return scores, torch.cat(embeds) if embeds else torch.empty(0, dim)

    def score(self, images: Sequence[Image.Image], batch_size: int = 1) -> list[float]:
        """Per-image aesthetic scores, identical to the challenge's ``get_aesthetics_score``."""
        return self.score_and_embed(images, batch_size)[0]

    def embeddings(self, images: Sequence[Image.Image], batch_size: int = 8) -> torch.Tensor:
        """``(N, projection_dim)`` float32 CLIP image embeddings, unit length (the ones being scored)."""
        return self.score_and_embed(images, batch_size)[1]


def pairwise_consistency(embeddings: torch.Tensor) -> float | None:
    """Mean cosine similarity over all unordered pairs of rows (rows are normalised here again)."""
    n = embeddings.shape[0]
    if n < 2:
        return None
    e = torch.nn.functional.normalize(embeddings.double(), dim=-1)
    sims = e @ e.T
    pairs = [float(sims[i, j]) for i, j in itertools.combinations(range(n), 2)]
    return sum(pairs) / len(pairs)
