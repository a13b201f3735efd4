"""Drawing a story's frames in batches, each with its own seeded generator; with ``best_of = N`` each frame draws
N candidates (seeds ``seed + k * 10007``), the scorer keeps the best as ``images/NN.png`` and the others go to
``images/candidates/NN-<seed>.png``. Frames in ``skip`` are already in the output and are not drawn again.
The pipeline itself (loading, the LoRA, prompt encoding, one batch) is :mod:`kolors_job.render.pipeline`'s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from diffusers.training_utils import free_memory

from kolors_job.core.device import resolve_device
from kolors_job.manifest.story import StorySpec
from kolors_job.models.loading import enable_tiling
from kolors_job.render.pipeline import ImageJob, encode_texts, load_story_pipeline, render, to_device
from kolors_job.storage.atomic import atomic_target

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["CANDIDATE_SEED_STRIDE", "FrameResult", "Scorer", "generate_story", "plan_jobs"]

log = logging.getLogger(__name__)


CANDIDATE_SEED_STRIDE = 10007
"""Candidate k of a frame uses ``seed + k * 10007``: far from the small seeds stories use for other frames."""


class Scorer(Protocol):
    def score(self, images: Sequence[Image.Image]) -> list[float]: ...


@dataclass
class FrameResult:
    index: int
    """1-based frame number (``images/NN.png``)."""
    prompt: str
    negative_prompt: str
    seed: int
    """Seed of the kept image (the frame's seed unless a best-of candidate won)."""
    path: Path
    candidates: list[tuple[int, Path, float | None]] = field(default_factory=list)
    """The *rejected* best-of candidates ``(seed, path under images/candidates/, score)``."""
    score: float | None = None


def plan_jobs(story: StorySpec, skip: Collection[int] = frozenset()) -> list[ImageJob]:
    jobs = []
    for index, frame in enumerate(story.frames, start=1):
        if index in skip:
            continue
        for k in range(story.best_of):
            jobs.append(
                ImageJob(
                    index, k, frame.prompt, story.negative_for(frame), frame.seed + k * CANDIDATE_SEED_STRIDE
                )
            )
    return jobs


def _save_png(image: Image.Image, path: Path) -> Path:
    """Write then rename: an interrupted run never leaves a truncated PNG that looks like a finished frame."""
    with atomic_target(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def generate_story(
    model_dir: Path,
    story: StorySpec,
    *,
    out_dir: Path,
    lora_dir: Path | None,
    vae_dir: Path | None = None,
    device: str | None = None,
    skip: Collection[int] = frozenset(),
    on_frame: Callable[[FrameResult], None] | None = None,
    scorer: Scorer | None = None,
    progress: bool = True,
    text_encoder_device: str | None = None,
    vae_tiling: bool = False,
) -> list[FrameResult]:
    """Draw the story's frames into ``out_dir/images/NN.png``; returns the frames drawn (not the skipped).

    ``text_encoder_device`` (``cpu``: ChatGLM encodes there) and ``vae_tiling`` come from the memory plan.

    ``on_frame`` is called once per frame as soon as its files exist (the runner uploads them), in
    frame order within each batch. ``scorer`` is required when ``best_of > 1``; with ``best_of = 1``
    it is optional and only fills ``score``.
    """
    if story.best_of > 1 and scorer is None:
        raise ValueError("spec.story.best_of > 1 needs an aesthetic scorer to pick the best candidate")
    start = time.monotonic()
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    jobs = plan_jobs(story, skip)
    if not jobs:
        log.info("story: every frame already exists; nothing to draw")
        return []
    dev = resolve_device(device)
    pipe = load_story_pipeline(model_dir, story, lora_dir=lora_dir, vae_dir=vae_dir, device=dev)
    texts = encode_texts(pipe, jobs, text_encoder_device or dev)  # ChatGLM on the GPU alone ...
    if dev.type == "cuda":  # ... and gone (12.5 GB; denoising takes embeddings) before the UNet and VAE arrive
        pipe.text_encoder = None
        free_memory()
    to_device(pipe, story, dev)
    if vae_tiling:
        enable_tiling(pipe.vae, story.height, story.width)
    log.info(
        "story",
        extra={
            "frames": len({j.index for j in jobs}),
            "images": len(jobs),
            "batch_size": story.batch_size,
            "device": str(pipe.unet.device),
            "dtype": str(pipe.unet.dtype),
            "lora": str(lora_dir),
        },
    )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="story", unit="img", dynamic_ncols=True)
        # Under it, the pipeline's own bar: the denoising steps of the batch being drawn (minutes on an A10).
        pipe.set_progress_bar_config(disable=False, leave=False, desc="denoise", dynamic_ncols=True)

    results: list[FrameResult] = []
    pending: dict[int, list[tuple[ImageJob, Image.Image]]] = {}
    try:
        done, size = 0, story.batch_size
        while done < len(jobs):
            batch = jobs[done : done + size]
            t0 = time.monotonic()
            try:
                images = render(pipe, batch, story, texts=texts)
            except torch.OutOfMemoryError:
                if size == 1:
                    raise
                # A smaller card than the batch was sized for: halve it and redraw. Each image has its own
                # generator, so the pixels do not depend on the batch size (to float rounding).
                size = max(1, size // 2)
                log.warning("story: out of GPU memory; retrying with batches of %d", size, extra={"batch_size": size})
                free_memory()
                continue
            done += len(batch)
            log.info("batch", extra={"images": len(batch), "seconds": round(time.monotonic() - t0, 3)})
            if bar is not None:
                bar.update(len(batch))
            for job, image in zip(batch, images, strict=True):
                pending.setdefault(job.index, []).append((job, image))
            for index in sorted(pending):
                if len(pending[index]) == story.best_of:
                    result = _finish_frame(pending.pop(index), images_dir, scorer)
                    results.append(result)
                    log.info(
                        "frame",
                        extra={
                            "index": result.index,
                            "seed": result.seed,
                            "score": result.score,
                            "path": str(result.path),
                        },
                    )
                    if on_frame is not None:
                        on_frame(result)
    finally:
        if bar is not None:
            bar.close()
        del pipe
        free_memory()
    log.info("story done", extra={"frames": len(results), "seconds": round(time.monotonic() - start, 3)})
    return results


def _finish_frame(
    candidates: list[tuple[ImageJob, Image.Image]], images_dir: Path, scorer: Scorer | None
) -> FrameResult:
    """Score, keep the argmax (first on ties: the frame's own seed) as NN.png, the rest as candidates."""
    candidates.sort(key=lambda c: c[0].k)
    scores: list[float | None] = (
        [float(s) for s in scorer.score([im for _, im in candidates])]
        if scorer is not None
        else [None] * len(candidates)
    )
    best = max(range(len(candidates)), key=lambda i: (scores[i] if scores[i] is not None else 0.0, -i))
    job, image = candidates[best]
    path = _save_png(image, images_dir / f"{job.index:02d}.png")
    rejected = []
    for i, (cand, cand_image) in enumerate(candidates):
        if i != best:
            p = _save_png(cand_image, images_dir / "candidates" / f"{cand.index:02d}-{cand.seed}.png")
            rejected.append((cand.seed, p, scores[i]))
    return FrameResult(
        index=job.index,
        prompt=job.prompt,
        negative_prompt=job.negative_prompt,
        seed=job.seed,
        path=path,
        candidates=rejected,
        score=scores[best],
    )
