"""The story's score as the challenge computes it: each frame's aesthetic score, their mean against the
threshold (``evaluate(folder)`` too), and the frames' style coherence. The predictor itself is
``kolors_job.models.aesthetic``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from kolors_job.core.errors import InputError
from kolors_job.manifest.spec import ScoreSpec
from kolors_job.models.aesthetic import AestheticScorer, pairwise_consistency

__all__ = ["ScoreResult", "score_folder", "score_story"]




@dataclass
class ScoreResult:
    """The score section of report.json; ``passed`` is the challenge's rule ``mean >= threshold``."""

    per_image: list[float]
    mean: float
    threshold: float
    passed: bool
    consistency: float | None
    """Mean pairwise cosine similarity of the frames' CLIP embeddings (style coherence); None for < 2."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)




def score_story(images: Sequence[Image.Image], score: ScoreSpec, scorer: AestheticScorer) -> ScoreResult:
    """Score the story frames as the challenge does and add the style-consistency number.

    The mean is ``sum / len`` of Python floats, exactly as the challenge's ``evaluate`` computes it,
    so a mean sitting on the threshold compares the same way here as there.
    """
    per_image, embeds = scorer.score_and_embed(images, batch_size=1)
    mean = sum(per_image) / len(per_image) if per_image else 0.0
    return ScoreResult(
        per_image=per_image,
        mean=mean,
        threshold=score.threshold,
        passed=bool(per_image) and mean >= score.threshold,
        consistency=pairwise_consistency(embeds),
    )


def score_folder(folder: Path | str, scorer: AestheticScorer) -> float:
    """The challenge's ``evaluate(folder)``: mean score of every file in ``folder`` (not recursive).

    Like the original, every regular file counts (so keep only the story images there) and an empty
    folder scores 0. A file that is not an image raises InputError naming it (the original crashes).
    """
    folder = Path(folder)
    scores: list[float] = []
    for name in sorted(os.listdir(folder)):
        path = folder / name
        if not path.is_file():
            continue
        try:
            image = Image.open(path)
        except (OSError, SyntaxError) as e:
            raise InputError(
                f"{path}: not an image ({type(e).__name__}); evaluate() would crash on it"
            ) from None
        with image:
            scores.append(scorer.score([image])[0])
    if not scores:
        return 0
    return sum(scores) / len(scores)
