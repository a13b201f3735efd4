"""The job runner: the one place that knows the order of the stages.

``STAGES`` is the recipe, one entry per stage (:class:`kolors_job.job.stage.Stage`): models → dataset → train →
export → story → score → report, then the quality gate and ``_SUCCESS``. ``run_job`` checks the device before any
network call, takes the output prefix (or finds the job already finished), runs each stage inside
``job.stage(name)`` (status.json, timings), skips a resumable one whose ``_state/<name>.json`` a finished run
recorded, and maps every failure to one line and an exit code. A stage is a typed function in its own package;
it does not know what ran before it or comes next.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kolors_job.core.errors import ExitCode, JobError
from kolors_job.core.redact import scrub
from kolors_job.core.stop import stop_on_signals
from kolors_job.data.stage import ScannedDataset, run_dataset
from kolors_job.job import scratch
from kolors_job.job.context import Job
from kolors_job.job.output import already_finished, claim_output, prepare_output
from kolors_job.job.preflight import check_device_first
from kolors_job.job.stage import Stage, read_record, write_record
from kolors_job.report.model import Report
from kolors_job.report.stage import ReportInput, run_report
from kolors_job.score.stage import Scored, ScoreInput, gate_failure, load_scorer, run_score
from kolors_job.sources.stage import ResolvedModels, resolve_models
from kolors_job.storage.local import TEMPORARY_ERRNOS, os_error
from kolors_job.story.stage import DrawnStory, StoryInput, run_story
from kolors_job.train.export import Exported, ExportInput, restore_export, run_export
from kolors_job.train.stage import Trained, TrainInput, run_train

__all__ = ["RESOURCES", "STAGES", "JobOutcome", "run_job"]

log = logging.getLogger(__name__)

STAGES: tuple[Stage[Any, Any], ...] = (
    Stage("models", resolve_models, None, ResolvedModels, node_first=True),
    Stage("dataset", run_dataset, None, ScannedDataset, node_first=True),
    Stage("train", run_train, TrainInput, Trained, resumable=True, total=lambda spec: spec.train.steps),
    Stage("export", run_export, ExportInput, Exported, resumable=True, restore=restore_export),
    Stage("story", run_story, StoryInput, DrawnStory, total=lambda spec: len(spec.story.frames)),
    Stage("score", run_score, ScoreInput, Scored, ranks="main"),
    Stage("report", run_report, ReportInput, Report, ranks="main"),
)
"""The recipe, in order. ``node_first`` stages run together, one process per node first (downloads)."""

RESOURCES: dict[str, Callable[[Job, dict[str, Any]], Any]] = {"scorer": load_scorer}
"""What a stage's input may name besides earlier outputs: loaded once, before the first stage that needs it."""


@dataclass
class JobOutcome:
    job_id: str
    output_uri: str
    exit_code: ExitCode
    state: str
    message: str = ""
    report: dict[str, Any] | None = None


def run_job(job: Job) -> JobOutcome:
    """The whole recipe. Exceptions become a failed/interrupted ``status.json`` and an exit code."""
    with stop_on_signals(job.stop):
        try:
            try:
                return _run(job)
            except OSError as e:  # the scratch or cache disk: full, read-only, a file where a dir must be
                if e.errno not in _FILESYSTEM_FAULTS:
                    raise
                raise os_error(e, f"local file {scrub(str(e.filename or job.work))}") from None
        except JobError as e:
            state = "interrupted" if e.exit_code == ExitCode.TEMPORARY else "failed"
            message = scrub(str(e))
            log.error("%s", message, extra={"exit_code": int(e.exit_code)})
            _safe_finish(job, state, e.exit_code, message)
            return JobOutcome(job.job_id, job.output_uri, e.exit_code, state, message)
        except Exception as e:  # a bug: keep the traceback in the log, one line in status.json
            message = scrub(f"{type(e).__name__}: {e}")
            log.exception("internal error: %s", message)
            _safe_finish(job, "failed", ExitCode.INTERNAL, message)
            return JobOutcome(job.job_id, job.output_uri, ExitCode.INTERNAL, "failed", message)
        finally:
            if job.claim is not None:
                job.claim.release()
            if job.scratch_owner is not None:
                job.scratch_owner.close()
            job.leave_group()
            if job.world == 1:  # nothing in scratch is reused by a rerun (it resumes from the output store)
                shutil.rmtree(job.work, ignore_errors=True)
                with contextlib.suppress(OSError):
                    job.work.parent.rmdir()  # the job's directory, when no other run of it is using it


_FILESYSTEM_FAULTS = TEMPORARY_ERRNOS | {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.ENAMETOOLONG}
"""Local faults that are the environment's, not a bug: one line and exit 75 or 5 (see storage.local)."""


def _safe_finish(job: Job, state: str, code: ExitCode, message: str) -> None:
    if not job.owns_output or (job.claim is not None and job.claim.lost.is_set()):
        return  # e.g. a conflict, or a lost claim: that prefix's status.json belongs to another run
    try:
        job.status.finish(state, int(code), message)
    except Exception as e:  # storage may be the thing that failed
        log.warning("could not write status.json: %s", scrub(str(e)))


def _run(job: Job) -> JobOutcome:
    log.info("job %s → %s", job.job_id, job.output_uri, extra={"manifest_digest": job.digest})
    check_device_first(job)  # before the first network call: nothing is read or written on a wrong node
    if job.local_main:  # what killed or preempted runs left on this work volume (never a live run's)
        scratch.sweep(job.settings.resolved_work_dir, keep=job.run_root)
    # Nothing is written before this check: a finished run or another manifest's run stays untouched.
    # A finished run of this manifest is seen without claiming anything: a no-op rerun writes nothing.
    finished = already_finished(job)
    if not finished:
        with job.main_first():  # rank 0 claims, checks (and with --force clears) the prefix before the others look
            if job.main:
                claim_output(job)
            finished = prepare_output(job)
    if finished:
        msg = f"{job.output_uri}: already complete (_SUCCESS exists); use --force to recompute"
        log.info(msg)
        return JobOutcome(job.job_id, job.output_uri, ExitCode.OK, "skipped", msg)
    job.owns_output = True
    job.work.mkdir(parents=True, exist_ok=True)
    job.scratch_owner = scratch.ScratchOwner(job.run_root)

    outputs: dict[str, Any] = {}
    with job.local_main_first():  # one download per node; its other ranks then hit the cache
        for stage in (s for s in STAGES if s.node_first):
            _run_stage(job, stage, outputs)
    for stage in (s for s in STAGES if not s.node_first):
        if stage.ranks == "main" and not job.main:
            continue  # DDP workers are done once their frames are with rank 0; it scores and reports
        _run_stage(job, stage, outputs)
    if not job.main:
        return JobOutcome(job.job_id, job.output_uri, ExitCode.OK, "succeeded", "worker finished")

    report = outputs["report"].to_json_dict()
    if why := gate_failure(job, outputs["score"]):
        log.error(why)
        job.status.finish("failed", int(ExitCode.QUALITY_GATE), why)
        return JobOutcome(job.job_id, job.output_uri, ExitCode.QUALITY_GATE, "failed", why, report)

    job.status.finish("succeeded", int(ExitCode.OK))
    job.store.write_bytes("_SUCCESS", b"")
    scores = outputs["score"].result
    log.info("job %s succeeded: mean aesthetic %.3f (threshold %s)", job.job_id, scores.mean,
             job.manifest.spec.score.threshold)  # fmt: skip
    return JobOutcome(job.job_id, job.output_uri, ExitCode.OK, "succeeded", "", report)


def _run_stage(job: Job, stage: Stage[Any, Any], outputs: dict[str, Any]) -> None:
    """Run ``stage`` (or, resumable and recorded by a finished run, take its record) into ``outputs``."""
    for name in stage.needs():
        if name not in outputs and name in RESOURCES:
            outputs[name] = RESOURCES[name](job, outputs)
    with job.stage(stage.name, total=stage.total(job.manifest.spec) if stage.total else None):
        recorded = read_record(job, stage) if stage.resumable else None
        if recorded is not None:
            log.info("%s: already complete in the output (_state/%s.json); not run again", stage.name, stage.name)
            if stage.restore is not None:
                stage.restore(job, recorded)
            outputs[stage.name] = recorded
            return
        outputs[stage.name] = stage.call(job, outputs)
        if stage.resumable:
            write_record(job, stage, outputs[stage.name])
