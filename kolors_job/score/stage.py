"""The ``score`` stage (rank 0): the story's frames scored by the aesthetic predictor, as the challenge scores
them, and their coherence; then the quality gate (exit 3 when the mean is under the threshold, after the report).

The scorer is loaded once per run, when a first stage needs it (``load_scorer``, a resource of the runner):
training to score validation frames, the story to pick the best of its candidates, this stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image

from kolors_job.models.aesthetic import AestheticScorer
from kolors_job.score.challenge import ScoreResult, score_story

if TYPE_CHECKING:
    from kolors_job.job.context import Job
    from kolors_job.sources.stage import ResolvedModels
    from kolors_job.story.stage import DrawnStory

__all__ = ["ScoreInput", "Scored", "gate_failure", "load_scorer", "run_score"]


@dataclass(frozen=True)
class ScoreInput:
    story: DrawnStory
    scorer: AestheticScorer


@dataclass
class Scored:
    result: ScoreResult
    images: list[Any]
    """The frames as RGB images, decoded once for scoring and the report's ``story.jpg``."""


def run_score(job: Job, given: ScoreInput) -> Scored:
    images = [Image.open(job.work / f["image"]).convert("RGB") for f in given.story.frames]
    return Scored(score_story(images, job.manifest.spec.score, given.scorer), images)


def load_scorer(job: Job, outputs: dict[str, Any]) -> AestheticScorer | None:
    """The aesthetic predictor of ``score.aesthetic_model`` on the job's device, where this process needs it:
    rank 0 validates and scores the story; every rank picks best-of candidates."""
    models: ResolvedModels = outputs["models"]
    if job.main or job.manifest.spec.story.best_of > 1:
        return AestheticScorer.load(models.aesthetic, device=job.device)
    return None


def gate_failure(job: Job, scored: Scored) -> str | None:
    """Why the quality gate fails this job (``score.gate``: the mean under the threshold), or None."""
    gate = job.manifest.spec.score
    if gate.gate and not scored.result.passed:
        return f"quality gate: mean aesthetic score {scored.result.mean:.3f} is below the threshold {gate.threshold}"
    return None
