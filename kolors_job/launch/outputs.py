"""What CI reads of a started job: its outputs (``status.json``, ``report.json``, ``_SUCCESS`` under
``<output>/<job id>/``), polled until the job is over, and its scores on the CI log and the run's summary page.

The outputs are the source of truth for how a job went, whatever ran it: the same wait serves Kubernetes,
PAI-DLC, a local subprocess and each sweep trial; the platform is only asked whether the job is *over*.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass
from typing import IO, Any

from kolors_job.core.errors import ExitCode, JobError, StorageNotFoundError, StorageTemporaryError
from kolors_job.core.redact import redact_uri
from kolors_job.launch import k8s as k8s_mod
from kolors_job.launch.watch import PlatformState, Probe

__all__ = ["Outcome", "exists", "format_scores", "fresh_job_id", "join_uri", "open_output", "read_json", "say",
           "step_summary", "upload_manifest", "wait_for_outputs"]  # fmt: skip

RETRYABLE = (int(ExitCode.TEMPORARY), k8s_mod.RETRYABLE_EXIT_CODE)


@dataclass
class Outcome:
    exit_code: int
    result: str  # succeeded | failed | quality-gate | timeout
    status: dict[str, Any] | None
    report: dict[str, Any] | None


def fresh_job_id(name: str) -> str:
    """``<name>-<UTC time>-<random>``: unique per CI run, sortable, valid as a job id and k8s label."""
    base = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:30].rstrip("-") or "job"
    return f"{base}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def join_uri(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


def open_output(uri: str) -> Any:
    from kolors_job.storage import open_store

    return open_store(uri)


def read_json(store: Any, key: str) -> dict[str, Any] | None:
    try:
        if not store.exists(key):
            return None
        data = json.loads(store.read_bytes(key))
    except StorageNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return None  # caught mid-write (local files): read again next poll
    return data if isinstance(data, dict) else None


def exists(store: Any, key: str) -> bool:
    try:
        return bool(store.exists(key))
    except StorageNotFoundError:
        return False


def say(msg: str, out: IO[str] | None = None) -> None:
    """A note for the person reading the CI log: stderr, so stdout holds only objects (a dry-run's YAML)."""
    print(msg, file=out or sys.stderr, flush=True)


def _frames(per_image: list[Any]) -> list[tuple[str, float | None]]:
    rows = []
    for i, item in enumerate(per_image, 1):
        if isinstance(item, dict):
            label = str(item.get("frame") or item.get("file") or item.get("name") or i)
            raw = item.get("score", item.get("aesthetic"))
        else:
            label, raw = str(i), item
        rows.append((label, float(raw) if isinstance(raw, int | float) else None))
    return rows


def format_scores(report: dict[str, Any]) -> list[str]:
    """Per-frame scores, then the mean against the threshold (what a reviewer looks at first)."""
    score = report.get("score") or {}
    lines = ["frame  score"]
    for label, value in _frames(list(score.get("per_image") or [])):
        lines.append(f"{label:>5}  {'n/a' if value is None else f'{value:.3f}'}")
    mean, threshold, passed = score.get("mean"), score.get("threshold"), score.get("passed")
    verdict = "PASSED" if passed else "FAILED" if passed is False else "unknown"
    mean_s = f"{mean:.3f}" if isinstance(mean, int | float) else "n/a"
    thr_s = f"{threshold:.3f}" if isinstance(threshold, int | float) else "n/a"
    lines.append(f"mean {mean_s} vs threshold {thr_s}: {verdict}")
    return lines


def step_summary(job_id: str, outcome: Outcome) -> None:
    """GitHub Actions: put the scores on the run's summary page."""
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path:
        return
    lines = [f"### kolors-job `{job_id}`: {outcome.result} (exit {outcome.exit_code})", ""]
    if outcome.report:
        score = outcome.report.get("score") or {}
        lines += ["| frame | score |", "|---|---|"]
        lines += [
            f"| {lbl} | {'n/a' if v is None else f'{v:.3f}'} |" for lbl, v in _frames(score.get("per_image") or [])
        ]
        lines += ["", format_scores(outcome.report)[-1]]
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    except OSError:
        pass


def _status_line(status: dict[str, Any]) -> str:
    parts = [f"state {status.get('state', '?')}"]
    if status.get("stage"):
        parts.append(f"stage {status['stage']}")
    if status.get("step") is not None and status.get("total") is not None:
        parts.append(f"step {status['step']}/{status['total']}")
    return ", ".join(parts)


def _error_text(status: dict[str, Any] | None) -> str:
    err = (status or {}).get("error")
    if isinstance(err, dict):
        return ": ".join(str(err[k]) for k in ("type", "message") if err.get(k)) or json.dumps(err)
    return str(err) if err else ""


def _job_code(status: dict[str, Any] | None) -> int:
    code = (status or {}).get("exit_code")
    return code if isinstance(code, int) and 0 < code < 256 else int(ExitCode.INTERNAL)


def wait_for_outputs(
    store: Any,
    *,
    timeout: float,
    poll: float,
    probe: Probe | None = None,
    stale_status: bytes | None = None,
    out: IO[str] | None = None,
) -> Outcome:
    """Poll ``_SUCCESS``/``status.json`` until the job is over, the platform says it is, or ``timeout``.

    ``stale_status``: the status.json bytes seen before this run started; a terminal state in it
    belongs to an earlier attempt and is not this run's answer.
    """
    deadline = time.monotonic() + timeout
    last_line = None
    platform_done: PlatformState | None = None
    fresh = False  # whether this attempt has written a status.json yet
    while True:
        try:
            if exists(store, "_SUCCESS"):
                return _finish(store, success=True, status=read_json(store, "status.json"), out=out)
            status = read_json(store, "status.json")
            fresh = fresh or (status is not None and (
                stale_status is None or json.dumps(status, sort_keys=True).encode() != stale_status
            ))
            if status and fresh:
                line = _status_line(status)
                if line != last_line:
                    say(line, out)
                    last_line = line
                # A retryable 75 while the scheduler still runs is not final: k8s counts it against
                # backoffLimit and starts a new pod, AIMaster restarts the DLC job; the platform decides.
                scheduler_retries = _job_code(status) in RETRYABLE and probe is not None and platform_done is None
                if status.get("state") == "failed" and not scheduler_retries:
                    return _finish(store, success=False, status=status, out=out)
        except StorageTemporaryError as e:
            say(f"storage unavailable, will retry: {e}", out)
            status = None
        if platform_done is not None:
            # The platform finished and one more look at the outputs found nothing terminal.
            detail = f" ({platform_done.detail})" if platform_done.detail else ""
            code = platform_done.exit_code if platform_done.exit_code not in (None, 0) else _job_code(status)
            if platform_done.silent_exit_code is not None and not fresh:
                code = platform_done.silent_exit_code
            if code == ExitCode.NOT_STARTED:
                silent = " — it wrote no status.json" if platform_done.silent_exit_code is not None else ""
                say(f"the job could not start: {platform_done.detail}{silent}", out)
            else:
                say(f"the job ended without a final status.json/_SUCCESS{detail}", out)
            return Outcome(code, "failed", status, read_json(store, "report.json"))
        if probe is not None:
            state = probe()
            if state is not None and state.done:
                platform_done = state
                continue  # re-read the outputs once: the job writes them before it exits
        if time.monotonic() >= deadline:
            say(f"timed out after {timeout:.0f} s waiting for the job (it may still be running)", out)
            return Outcome(int(ExitCode.TEMPORARY), "timeout", status, None)
        time.sleep(max(0.0, min(poll, deadline - time.monotonic())))


def _finish(store: Any, *, success: bool, status: dict[str, Any] | None, out: IO[str] | None) -> Outcome:
    report = read_json(store, "report.json")
    if report:
        for line in format_scores(report):
            say(line, out)
    else:
        say("no report.json", out)
    passed = ((report or {}).get("score") or {}).get("passed")
    if success:
        if passed is False:
            return Outcome(int(ExitCode.QUALITY_GATE), "quality-gate", status, report)
        return Outcome(int(ExitCode.OK), "succeeded", status, report)
    code = _job_code(status)
    err = _error_text(status)
    say(f"job failed (exit {code}){': ' + err if err else ''}", out)
    if code == ExitCode.QUALITY_GATE or (passed is False and code == ExitCode.INTERNAL):
        return Outcome(int(ExitCode.QUALITY_GATE), "quality-gate", status, report)
    return Outcome(code, "failed", status, report)


def upload_manifest(bucket: str, job_id: str, raw: bytes) -> str:
    """Create ``<bucket>/<job-id>/manifest.yaml``; reusing a job id is fine only with the same manifest."""
    store = open_output(join_uri(bucket, job_id))
    if not store.write_bytes("manifest.yaml", raw, if_absent=True) and store.read_bytes("manifest.yaml") != raw:
        raise JobError(
            f"{redact_uri(join_uri(bucket, job_id, 'manifest.yaml'))} holds a different manifest: "
            "pick another --job-id",
            exit_code=ExitCode.OUTPUT_CONFLICT,
        )
    return join_uri(bucket, job_id, "manifest.yaml")
