"""The ``story`` stage: draw the frames not yet in the output with the exported LoRA, upload each as soon as
it exists, and write ``prompts.json``.

A rerun redraws nothing already uploaded; under DDP the missing frames are split between the ranks
and rank 0 gathers, keeps and alone uploads every PNG.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kolors_job.manifest.recipe import describe
from kolors_job.plan.runtime import story_kwargs, story_spec
from kolors_job.render.pipeline import sampler_record
from kolors_job.storage.atomic import atomic_target
from kolors_job.story.draw import generate_story

if TYPE_CHECKING:
    from kolors_job.job.context import Job
    from kolors_job.models.aesthetic import AestheticScorer
    from kolors_job.sources.stage import ResolvedModels
    from kolors_job.train.export import Exported

__all__ = ["DrawnStory", "StoryInput", "run_story"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoryInput:
    models: ResolvedModels
    export: Exported
    """The story draws with the exported LoRA (``<work>/lora``), as the output publishes it."""
    scorer: AestheticScorer | None
    """Picks the best of ``story.best_of`` candidates (None when each frame is drawn once)."""


@dataclass
class DrawnStory:
    frames: list[dict[str, Any]]
    """``prompts.json``'s frames (index, image, prompt, negative prompt, seed); empty on DDP workers."""


def run_story(job: Job, given: StoryInput) -> DrawnStory:
    """Generate the frames not yet in the output; upload each as soon as it exists.

    Under DDP the missing frames are split between the ranks (accelerate's ``split_between_processes``);
    each rank draws its share, and rank 0 gathers the PNGs, keeps them and alone uploads them.
    """
    models, scorer = given.models, given.scorer
    choices = job.memory_plan.choices if job.memory_plan else None
    spec = story_spec(job.manifest.spec.story, choices)  # the memory plan's batch and precision
    n_frames = len(spec.frames)
    images_local = job.work / "images"
    images_local.mkdir(parents=True, exist_ok=True)
    done: set[int] = set()
    if job.main:
        for i in range(1, n_frames + 1):
            if job.store.exists(f"images/{i:02d}.png"):
                job.store.download_file(f"images/{i:02d}.png", images_local / f"{i:02d}.png")
                done.add(i)
        if done:
            log.info("story: %d frame(s) already in the output, not regenerated", len(done))
    todo = [i for i in range(1, n_frames + 1) if i not in done]
    if job.dist:
        from accelerate.utils import broadcast_object_list

        shared = [todo]
        broadcast_object_list(shared)  # rank 0 read the output: every rank agrees on what is left
        with job.dist.split_between_processes(shared[0]) as mine:
            todo = list(mine)
        log.info("story: this rank draws frames %s", todo or "none", extra={"frames": todo})

    def on_frame(frame: Any) -> None:
        for _seed, path, _score in frame.candidates:
            job.upload(f"images/candidates/{path.name}", path)
        job.upload(f"images/{frame.path.name}", frame.path)
        job.status.progress(frame.index, len(spec.frames))
        job.check_stop()

    drawn = generate_story(
        models.base,
        spec,
        out_dir=job.work,
        lora_dir=job.work / "lora",
        vae_dir=models.vae,
        device=job.device,
        skip=set(range(1, n_frames + 1)) - set(todo),
        on_frame=on_frame,
        scorer=scorer if spec.best_of > 1 else None,
        progress=job.progress,
        **story_kwargs(choices),
    )
    if job.dist:
        _collect_frames(job, drawn, n_frames)
    if not job.main:
        return DrawnStory([])
    prompts = {
        "recipe": describe(job.manifest.spec),
        "negative_prompt": spec.negative_prompt,
        "sampler": {
            **sampler_record(models.base, spec, job.device),
            "scheduler": spec.scheduler,
            "cfg_scale": spec.cfg_scale,
            "steps": spec.steps,
            "width": spec.width,
            "height": spec.height,
            "lora_scale": spec.lora_scale,
            "best_of": spec.best_of,
        },
        "frames": [
            {
                "index": i,
                "image": f"images/{i:02d}.png",
                "prompt": f.prompt,
                "negative_prompt": spec.negative_for(f),
                "seed": f.seed,
            }
            for i, f in enumerate(spec.frames, start=1)
        ],
    }
    (job.work / "prompts.json").write_text(json.dumps(prompts, ensure_ascii=False, indent=2))
    job.upload("prompts.json", job.work / "prompts.json")
    return DrawnStory(prompts["frames"])


def _collect_frames(job: Job, drawn: list[Any], n_frames: int) -> None:
    """Every rank's PNGs (frames and best-of candidates) to rank 0, which stores and uploads them.

    One collective call after the drawing: a rank interrupted before it fails the whole torchrun group
    (its frames are redrawn by the rerun; rank 0's own are already uploaded).
    """
    from accelerate.utils import gather_object

    files = [] if job.main else [  # rank 0's own were uploaded as each was drawn
        (frame.index, path.relative_to(job.work).as_posix(), path.read_bytes())
        for frame in drawn
        for path in (*(c[1] for c in frame.candidates), frame.path)
    ]
    gathered = gather_object(files)
    if not job.main:
        return
    for index, key, data in gathered:
        with atomic_target(job.work / key) as tmp:
            tmp.write_bytes(data)
        job.upload(key, job.work / key)
        if key == f"images/{index:02d}.png":
            job.status.progress(index, n_frames)
