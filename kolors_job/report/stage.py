"""The ``report`` stage (rank 0): ``story.jpg``, the model card beside the LoRA files, report.json and report.html,
and the challenge submission, checked; all assembled from the earlier stages' outputs.

The sections of the stages this stage knows are built here (some combine several outputs: ``sources`` lists the
models' and the datasets' fetches, the model card reads the dataset and the scores). Any other stage's output
that has ``report_fields()`` lands in report.json under the fields it names (each a field of
``report.model.Report``): a stage added to the table adds its section without a change here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kolors_job.core.redact import redact_uri
from kolors_job.export import write_model_card
from kolors_job.manifest.recipe import describe
from kolors_job.render.pipeline import sampler_record
from kolors_job.report import model as rm
from kolors_job.report.html import device_info, package_versions, tile_frames, write_report
from kolors_job.report.submission import build_submission, check_submission
from kolors_job.storage.base import RETRIES
from kolors_job.train.export import lora_info
from kolors_job.train.validation import fetch_images

if TYPE_CHECKING:
    from kolors_job.data.stage import ScannedDataset
    from kolors_job.job.context import Job
    from kolors_job.score.stage import Scored
    from kolors_job.sources.stage import ResolvedModels
    from kolors_job.story.stage import DrawnStory
    from kolors_job.train.export import Exported
    from kolors_job.train.stage import Trained

__all__ = ["ReportInput", "run_report"]


@dataclass(frozen=True)
class ReportInput:
    models: ResolvedModels
    dataset: ScannedDataset
    train: Trained
    export: Exported
    story: DrawnStory
    score: Scored
    outputs: dict[str, Any]
    """Every output so far: those with ``report_fields()`` add their sections."""


def run_report(job: Job, given: ReportInput) -> rm.Report:
    """story.jpg, the model card, report.json/html and the submission, each uploaded."""
    spec = job.manifest.spec
    models, dataset, train, frames = given.models, given.dataset.summary, given.train, given.story.frames
    scores = given.score.result
    story_path = job.work / "story.jpg"
    # the reference notebook: 4 rows of 2 frames, resized to 1024 wide x 2048 high (story.tiling says how)
    tile_frames(given.score.images, spec.story.tiling).save(story_path, quality=92)

    for f, s in zip(frames, scores.per_image, strict=True):
        f["score"] = s
    score_dict = scores.to_dict()
    lora_files = {k: job.work / v for k, v in given.export.lora_files.items()}
    card_data = dict(dataset)
    if parts := card_data.pop("datasets", None):  # several: one line each, not their whole sections
        card_data["datasets"] = "; ".join(f"{d['source']}: {d['kept']} kept" for d in parts)
    card = write_model_card(job.work / "lora", lora_info(job, train), score_dict, card_data, files=lora_files)
    job.upload("lora/README.md", card)

    fetched = [d["fetched"] for d in dataset.get("datasets") or [dataset] if d.get("fetched")]  # hub datasets too
    fetch_images(job.store, job.work, train.validation)  # drawn by an earlier process of a rerun
    report = rm.Report(
        job_id=job.job_id,
        manifest_digest=job.digest,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        output=job.output_uri,
        model=rm.Model(
            base=redact_uri(spec.model.base),
            vae=redact_uri(spec.model.vae) if spec.model.vae else None,
            train_vae=redact_uri(spec.model.train_vae) if spec.model.train_vae else None,
            random_weights=models.random_weights,
        ),
        sources=[rm.Source.model_validate(s) for s in models.sources + fetched],
        dataset=rm.Dataset.model_validate(dataset),
        train=rm.Train.model_validate(train.summary()),
        story=rm.Story(
            frames=[rm.Frame.model_validate(f) for f in frames],
            settings=spec.story.model_dump(mode="json", exclude={"frames"}),
            sampler=rm.Sampler.model_validate(sampler_record(models.base, spec.story, job.device)),
        ),
        score=rm.Score.model_validate(score_dict),
        lora_files={**given.export.lora_files, "card": card.relative_to(job.work).as_posix()},
        lora_formats_skipped=given.export.lora_formats_skipped,
        validation=[rm.ValidationPoint.model_validate(p) for p in train.validation],
        selected_checkpoint=rm.SelectedCheckpoint.model_validate(train.selected_checkpoint),
        recipe=rm.Recipe.model_validate(describe(spec)),
        timings=dict(job.timings),
        storage=rm.Storage(retries=RETRIES.value - job.retries_before),
        device=rm.Device.model_validate(device_info()),
        versions=package_versions(),
        manifest=job.manifest.resolved(),
        **_sections(given.outputs),
    )
    if job.memory_plan is not None:
        report.memory = job.memory_plan.to_dict()
    sub = build_submission(
        job.work,
        lora_file=list(lora_files.values()),
        model_card=card,
        images=[job.work / f["image"] for f in frames],
        prompts=frames,
        story_jpg=story_path,
        score=score_dict,
    )
    report.submission = rm.Submission(problems=check_submission(sub))
    job.upload_dir(sub, "submission/")
    write_report(job.work, report)
    for name in ("story.jpg", "report.json", "report.html"):
        job.upload(name, job.work / name)
    return report


def _sections(outputs: dict[str, Any]) -> dict[str, Any]:
    """The report fields of every output that names its own (``report_fields()``)."""
    return {k: v for out in outputs.values() if hasattr(out, "report_fields") for k, v in out.report_fields().items()}
