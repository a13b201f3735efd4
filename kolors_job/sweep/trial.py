"""What ``kolors-job run`` takes from a sweep engine: ``--set``, ``--trial``, ``--objective`` and the metric sinks.

A trial is an ordinary run of the job: the engine's command line changes some manifest fields (``--set``),
names the run after its trial (``--trial``: the job id, so the outputs land in ``<output>/<trial>/``) and
asks for metric lines (:mod:`kolors_job.sweep.metrics`). Nothing else differs: the same exit codes, the
same resume, the same outputs.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kolors_job.core.errors import ExitCode, ManifestError
from kolors_job.manifest.spec import Manifest
from kolors_job.sweep import overrides
from kolors_job.sweep.metrics import TrialMetrics, parse_weights

OBJECTIVE_LABEL = "kolors-job/objective"
"""Where the resolved manifest records ``--objective`` (``sweep report`` ranks by it)."""


@dataclass
class TrialRun:
    manifest: Manifest
    job_id: str | None
    metrics: TrialMetrics | None


def prepare(args: argparse.Namespace, manifest: Manifest) -> TrialRun:
    """Apply ``--set``, derive the job id from ``--trial``, build the metric sinks (ManifestError: exit 2)."""
    if args.trial and args.job_id:
        raise ManifestError("--trial names the job: give --trial or --job-id, not both")
    if args.set_fields:
        manifest = overrides.apply_text(manifest, args.set_fields)
    if args.objective:  # ``sweep report`` ranks by what the trials were told to optimise
        weights = parse_weights(args.objective)
        labels = {**manifest.metadata.labels, OBJECTIVE_LABEL: ",".join(f"{k}={v:g}" for k, v in weights.items())}
        manifest = manifest.model_copy(update={"metadata": manifest.metadata.model_copy(update={"labels": labels})})
    job_id = overrides.trial_job_id(args.trial) if args.trial else None
    wants = args.metrics_file or args.metrics_stdout or args.metrics_json
    metrics = None
    if wants or args.objective:
        metrics = TrialMetrics(
            weights=parse_weights(args.objective),
            katib_file=Path(args.metrics_file) if args.metrics_file else None,
            katib_stdout=bool(args.metrics_stdout),
            pai_json=args.metrics_json or None,
        )
    return TrialRun(manifest, job_id, metrics)


def finish(metrics: TrialMetrics | None, job: Any, outcome: Any) -> None:
    """The final metric line, from the run's report (or, for a rerun of a finished trial, the stored one)."""
    if metrics is None:
        return
    report = outcome.report
    if report is None and outcome.state == "skipped":  # already complete: report what it scored
        try:
            report = job.get_json("report.json")
        except Exception:  # unreadable: the trial's own outcome still stands
            report = None
    if not report:
        return
    if outcome.exit_code not in (ExitCode.OK, ExitCode.QUALITY_GATE):
        return
    metrics.final(report.get("score"), step=(report.get("train") or {}).get("steps"))
