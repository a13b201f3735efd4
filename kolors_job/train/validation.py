"""Watching the LoRA learn: at checkpoints, draw a few story frames with the LoRA so far and score them.

Each validation frame is drawn through the story's own sampling code (:func:`kolors_job.render.pipeline.render`:
the story's sampler, cfg, size, negative prompt and LoRA scale, the frame's seed in its own
``torch.Generator``) with ``train.validation.steps`` steps, by the UNet being trained — no second copy of
the model. Its prompt embeddings are computed once by the trainer's cache step, before ChatGLM leaves
(:func:`texts`). The frames are scored with the story's aesthetic predictor (loaded once by the runner)
and the style coherence of :func:`kolors_job.models.aesthetic.pairwise_consistency`.

Validation must not change training: it runs under ``no_grad`` in eval mode, inside
``torch.random.fork_rng`` (the training RNG state, which checkpoints carry, is untouched), and puts the
UNet back in train mode with its LoRA scale restored. So the final LoRA of ``train.select: last`` is bit
for bit the one a run without validation trains.

Under DDP rank 0 draws every validation frame while the other ranks wait at a barrier (a handful of
frames: splitting them would cost more collective calls than it saves); rank 0 alone writes.

The points are carried in each checkpoint's ``state.json``: a rerun resumes with every point recorded
up to its checkpoint and does not validate those steps again. :func:`select_checkpoint` then picks the
checkpoint the story and the exported LoRA use (``train.select``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kolors_job.manifest.story import StorySpec
from kolors_job.manifest.train import TrainSpec
from kolors_job.models.aesthetic import pairwise_consistency
from kolors_job.render.pipeline import ImageJob, render
from kolors_job.storage.atomic import atomic_target

if TYPE_CHECKING:
    from kolors_job.models.aesthetic import AestheticScorer
    from kolors_job.models.loading import KolorsComponents
    from kolors_job.models.prompts import PromptEmbeds
    from kolors_job.storage import Store

log = logging.getLogger(__name__)

ROOT = "validation"


def step_prefix(step: int) -> str:
    """Where one validation's PNGs live, under the job root (local work dir and output store alike)."""
    return f"{ROOT}/step-{step}"


@dataclass
class ValidationPoint:
    """One validation: report.json's ``validation`` entry."""

    step: int
    images: list[str]
    """PNG paths relative to the job root: ``validation/step-N/NN.png`` (NN: the story frame)."""
    scores: list[float]
    mean_aesthetic: float
    consistency: float | None
    """Mean pairwise CLIP cosine of the frames; None for a single frame."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def frame_jobs(train: TrainSpec, story: StorySpec) -> list[ImageJob]:
    """The validation frames as the story would draw them (its prompts, negative prompts and seeds)."""
    jobs = []
    for index in train.validation.frames:
        frame = story.frames[index - 1]
        jobs.append(ImageJob(index, 0, frame.prompt, story.negative_for(frame), frame.seed))
    return jobs


class Validator:
    """Draws and scores the validation frames at the steps that are due; remembers every point."""

    def __init__(
        self,
        train: TrainSpec,
        story: StorySpec,
        scorer: AestheticScorer | None,
        root: Path,
        *,
        on_point: Callable[[ValidationPoint], None] | None = None,
    ) -> None:
        self.every = train.validation_every
        self.jobs = frame_jobs(train, story)
        self.story = story.model_copy(update={"steps": train.validation.steps})
        self.scorer = scorer
        self.root = Path(root)
        self.on_point = on_point
        self.points: list[ValidationPoint] = []

    def texts(self) -> list[str]:
        """Every prompt and negative prompt to draw (encoded once, before the text encoder leaves)."""
        return [t for j in self.jobs for t in (j.prompt, j.negative_prompt)] if self.every else []

    def restore(self, points: Sequence[dict[str, Any]]) -> None:
        """The points a checkpoint recorded (a resumed run does not draw them again)."""
        self.points = [ValidationPoint(**p) for p in points]

    def due(self, step: int, n_steps: int) -> bool:
        done = {p.step for p in self.points}
        return bool(self.every) and (step % self.every == 0 or step == n_steps) and step not in done

    def run(
        self, unet: torch.nn.Module, comps: KolorsComponents, prompts: dict[str, PromptEmbeds], step: int
    ) -> tuple[ValidationPoint, list[Any]]:
        """Draw, save and score the frames with ``unet`` (peft adapter ``default``) as it is at ``step``;
        the point and the images. Rank 0 only (it needs the scorer)."""
        if self.scorer is None:
            raise ValueError("validation needs the aesthetic scorer")
        from kolors_job.models.loading import make_pipeline

        comps.unet = unet
        dev = next(unet.parameters()).device
        images: list[Any] = []
        with _sampling(unet, comps, dev, self.story.lora_scale):
            pipe = make_pipeline(comps, self.story.scheduler)  # a fresh scheduler each time
            pipe.set_progress_bar_config(disable=True)
            for start in range(0, len(self.jobs), self.story.batch_size):
                batch = self.jobs[start : start + self.story.batch_size]
                images.extend(render(pipe, batch, self.story, texts=prompts))
            del pipe
        paths = []
        for job, image in zip(self.jobs, images, strict=True):
            paths.append(self.root / step_prefix(step) / f"{job.index:02d}.png")
            with atomic_target(paths[-1]) as tmp:  # a killed run never leaves a truncated PNG
                image.save(tmp, format="PNG")
        scores, embeds = self.scorer.score_and_embed(images, batch_size=1)
        point = ValidationPoint(
            step=step,
            images=[p.relative_to(self.root).as_posix() for p in paths],
            scores=scores,
            mean_aesthetic=sum(scores) / len(scores),
            consistency=pairwise_consistency(embeds),
        )
        self.add(point)
        log.info("validation", extra={"step": step, "mean_aesthetic": point.mean_aesthetic,
                                      "consistency": point.consistency})  # fmt: skip
        if self.on_point is not None:
            self.on_point(point)
        return point, images

    def add(self, point: ValidationPoint) -> None:
        """Record a point (rank 0's own, or on the other ranks the one rank 0 broadcast)."""
        self.points.append(point)

    def best_step(self) -> int | None:
        best = best_point([p.to_dict() for p in self.points])
        return None if best is None else best["step"]


@contextlib.contextmanager
def _sampling(unet: torch.nn.Module, comps: KolorsComponents, dev: torch.device, lora_scale: float) -> Iterator[None]:
    """Eval mode, no_grad, the story's LoRA scale, the VAE on the device, the RNG forked; all undone after.

    The VAE decodes in fp32: under mixed precision accelerate's wrapper returns the UNet's output in fp32,
    so the latents reaching the decoder are fp32 whatever the weights' dtype."""
    from diffusers.training_utils import offload_models
    from peft.tuners.lora import LoraLayer

    layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
    saved = [dict(m.scaling) for m in layers]
    vae_dtype = next(comps.vae.parameters()).dtype
    was_training = unet.training
    devices = [dev] if dev.type == "cuda" else []
    try:
        with offload_models(comps.vae, device=dev), torch.random.fork_rng(devices=devices), torch.no_grad():
            unet.eval()
            for m in layers:
                m.set_scale("default", lora_scale)  # scale * alpha / r, as the story's set_adapters gives
            comps.vae.float()  # .float(): diffusers' .to(dtype) warns on stdout about fp32 modules
            comps.vae.enable_slicing()  # decode one frame at a time, as the story does (the memory plan counts so)
            try:
                yield
            finally:
                comps.vae.type(vae_dtype)  # back in its dtype, then (offload_models) on its device
    finally:
        for m, scaling in zip(layers, saved, strict=True):
            m.scaling.update(scaling)
        unet.train(was_training)
        if dev.type == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------- selection


def best_point(points: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The point with the highest mean aesthetic (the earliest on a tie)."""
    return max(points, key=lambda p: p["mean_aesthetic"], default=None)


def select_checkpoint(points: Sequence[dict[str, Any]], select: str, last_step: int) -> dict[str, Any]:
    """report.json's ``selected_checkpoint``: the step whose LoRA the story and the exports use, and why."""
    by_step = {p["step"]: p for p in points}
    best = best_point(points)
    if select == "best_aesthetic" and best is not None:
        return {
            "step": best["step"],
            "reason": f"best_aesthetic: highest validation mean aesthetic of {len(points)} checkpoint(s)",
            "mean_aesthetic": best["mean_aesthetic"],
        }
    point = by_step.get(last_step)
    return {
        "step": last_step,
        "reason": "last: the final step (train.select: last)",
        "mean_aesthetic": None if point is None else point["mean_aesthetic"],
    }


def use_checkpoint_lora(lora_dir: Path, store: Store, train_dir: Path, step: int) -> None:
    """Make ``lora_dir`` the LoRA of checkpoint ``step`` (its weights file as written, the average's with
    ``train.ema``; its config with ``steps``): the local copy when still complete on disk, else the store's
    (pruning keeps it there)."""
    import json
    import shutil

    from kolors_job.export.lora_io import LORA_CONFIG_NAME, LORA_WEIGHT_NAME
    from kolors_job.train import checkpoints

    ckpt = checkpoints.step_dir(train_dir, step)
    if not (ckpt / checkpoints.COMPLETE_NAME).is_file():
        ckpt = checkpoints.download(store, step, train_dir)
    checkpoints.check_checkpoint(ckpt)
    ckpt = checkpoints.lora_of(ckpt)  # train.ema: the average, as the last step's export is
    shutil.copyfile(ckpt / LORA_WEIGHT_NAME, lora_dir / LORA_WEIGHT_NAME)
    config = json.loads((ckpt / LORA_CONFIG_NAME).read_text())
    (lora_dir / LORA_CONFIG_NAME).write_text(json.dumps({**config, "steps": step}, indent=2, sort_keys=True) + "\n")


def fetch_images(store: Store, root: Path, points: Sequence[dict[str, Any]]) -> None:
    """Download the points' PNGs not on local disk (a resumed run drew them in an earlier process)."""
    for point in points:
        for rel in point.get("images", []):
            if not (root / rel).is_file() and store.exists(rel):
                store.download_file(rel, root / rel)
