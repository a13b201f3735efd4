"""What the platform says about a started job: ``PlatformState`` probes, and the Kubernetes watch.

``submit`` waits on the job's own outputs; a probe only answers whether the job is *over* (its
process or pods gone for good) or cannot start (an image that cannot be pulled, a missing Secret or
volume, a pod unschedulable past the start timeout), so CI does not wait until its timeout for a job
that never ran. The Kubernetes side reads pods and events through ``kubectl``; PAI-DLC's through GetJob.

PAI-DLC's ends, as exit codes (the job's own status.json wins whenever it holds a final state):
Succeeded → the outputs decide (0, 3, or 1 when they hold nothing final); Failed before any status.json
→ 7 (the job never started: image, quota, node, its first second); Failed later without a final
status → 75 (killed mid-run: out of memory, node lost; a rerun resumes); Stopped (by a person, the
running-time limit) → 75; the job deleted (GetJob: does not exist) → 75 within two polls; GetJob
denied → 5.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kolors_job.core.errors import ExitCode, JobError
from kolors_job.launch import dlc as dlc_mod
from kolors_job.launch import k8s as k8s_mod

# Container states that do not heal by waiting: the pod would sit there (holding its GPU) until the
# Job's activeDeadlineSeconds. ErrImagePull is left out: one failed pull may be a registry hiccup, and
# kubelet turns a lasting one into ImagePullBackOff within seconds.
FATAL_WAITING = ("ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError")


@dataclass
class PlatformState:
    """What the scheduler says: ``done`` once the job's process/pods are gone for good.

    ``exit_code`` is what submit exits with when the job's outputs hold no final state (None or 0: the
    outputs' own code, else 1); ``silent_exit_code``, when set, replaces it if this attempt wrote no
    status.json at all (the job never got as far as its first write).
    """

    done: bool
    exit_code: int | None = None
    detail: str = ""
    silent_exit_code: int | None = None


Probe = Callable[[], "PlatformState | None"]


class Kubectl:
    """The few ``kubectl`` calls submit makes; every read returns ``None`` on any failure (a flaky API
    server must not end the wait)."""

    def __init__(self, binary: str, namespace: str | None) -> None:
        self.binary, self.namespace = binary, namespace

    def _cmd(self, *args: str) -> list[str]:
        return [self.binary, *args] + (["-n", self.namespace] if self.namespace else [])

    def get(self, *args: str) -> dict[str, Any] | None:
        try:
            r = subprocess.run(self._cmd("get", *args, "-o", "json"), capture_output=True, text=True,
                               timeout=60, check=False)  # fmt: skip
            data = json.loads(r.stdout) if r.returncode == 0 else None
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return None
        return data if isinstance(data, dict) else None

    def items(self, *args: str) -> list[dict[str, Any]]:
        return list((self.get(*args) or {}).get("items") or [])

    def exists(self, kind: str, name: str) -> bool:
        cmd = [self.binary, "get", f"{kind}/{name}", "-o", "name"]
        if kind.lower() != "namespace" and self.namespace:
            cmd += ["-n", self.namespace]
        try:
            return subprocess.run(cmd, capture_output=True, timeout=60, check=False).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def apply(self, text: str) -> None:
        r = subprocess.run(self._cmd("apply", "-f", "-"), input=text, capture_output=True, text=True, check=False)
        sys.stderr.write(r.stdout)  # "job.batch/… created": a note, like every other line submit prints
        if r.returncode != 0:
            sys.stderr.write(r.stderr)
            raise JobError(f"kubectl apply failed with exit {r.returncode}")

    def delete(self, kind: str, name: str) -> None:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(self._cmd("delete", f"{kind}/{name}", "--ignore-not-found", "--wait=false"),
                           capture_output=True, timeout=60, check=False)  # fmt: skip


def _finished(obj: dict[str, Any]) -> PlatformState | None:
    """A Job's / PyTorchJob's terminal condition, if it has one."""
    kind = str(obj.get("kind", "")).lower()
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("status") != "True":
            continue
        if c.get("type") == "Failed":
            return PlatformState(True, None, f"{kind} Failed: {c.get('reason', '')} {c.get('message', '')}".strip())
        if c.get("type") in ("Complete", "Succeeded"):
            return PlatformState(True, 0, f"{kind} {c['type']}")
    return None


def _event_messages(kube: Kubectl, name: str, reasons: tuple[str, ...]) -> list[str]:
    events = kube.items("events", "--field-selector", f"involvedObject.name={name}")
    return [f"{e.get('reason')}: {e.get('message', '')}".strip() for e in events if e.get("reason") in reasons]


def pod_trouble(kube: Kubectl, selector: str, workload: str, *, unschedulable_since: dict[str, float],
                start_timeout: float) -> str | None:  # fmt: skip
    """Why the job's pods cannot start, once waiting will not help; ``None`` while they may still start.

    Permanent at once: an image that cannot be pulled, a missing Secret/ConfigMap (env or volume), a
    missing PVC. Bounded by ``start_timeout``: other unschedulable pods and pods the controller cannot
    create (quota, admission), since capacity may appear.
    """
    now = time.monotonic()
    pods = kube.items("pods", "-l", selector)
    if not pods:
        created = _event_messages(kube, workload, ("FailedCreate",))
        if created:
            first = unschedulable_since.setdefault(workload, now)
            if now - first >= start_timeout:
                return f"{workload}: {created[-1]}"
        return None
    for pod in pods:
        name = (pod.get("metadata") or {}).get("name", "?")
        status = pod.get("status") or {}
        for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in FATAL_WAITING:
                return f"pod {name}: {waiting['reason']}: {waiting.get('message', '')}".strip()
        if status.get("phase") != "Pending":
            unschedulable_since.pop(name, None)
            continue
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and \
                    cond.get("reason") == "Unschedulable":  # fmt: skip
                message = str(cond.get("message", ""))
                if re.search(r"persistentvolumeclaim \S+ not found", message, re.I):
                    return f"pod {name}: Unschedulable: {message}"
                first = unschedulable_since.setdefault(name, now)
                if now - first >= start_timeout:
                    return f"pod {name}: Unschedulable for {now - first:.0f} s: {message}"
        mounts = [m for m in _event_messages(kube, name, ("FailedMount",)) if "not found" in m]
        if mounts:
            return f"pod {name}: {mounts[-1]}"
    return None


def k8s_probe(kube: Kubectl, kind: str, name: str, selector: str, start_timeout: float) -> Probe:
    unschedulable_since: dict[str, float] = {}

    def probe() -> PlatformState | None:
        obj = kube.get(f"{kind}/{name}")
        if obj is not None and (done := _finished(obj)) is not None:
            return done
        reason = pod_trouble(kube, selector, name, unschedulable_since=unschedulable_since,
                             start_timeout=start_timeout)  # fmt: skip
        if reason is None:
            return None
        # The pod would hold its node (and GPUs) until activeDeadlineSeconds; the reason is what CI shows.
        kube.delete(kind, name)
        return PlatformState(True, int(ExitCode.NOT_STARTED), f"{reason} (deleted {kind}/{name})")

    return probe


def active_attempt(kube: Kubectl, kind: str, job_id_label: str) -> str | None:
    """The name of a workload of this job id that is still running (a CI rerun attaches to it)."""
    for obj in kube.items(kind, "-l", f"{k8s_mod.JOB_ID_LABEL}={job_id_label}"):
        if _finished(obj) is None:
            return str((obj.get("metadata") or {}).get("name"))
    return None


DLC_GONE_AFTER = 2
"""Consecutive "does not exist" answers that mean the DLC job was deleted (one may be a lagging read)."""


def dlc_probe(client: Any, dlc_job_id: str, *, say: Callable[[str], None]) -> Probe:
    """A probe that polls GetJob and maps every terminal DLC state (and a deleted job) to an exit code."""
    seen: dict[str, Any] = {"status": None, "error": None, "gone": 0, "denied": 0}
    job = f"PAI-DLC job {dlc_job_id}"

    def probe() -> PlatformState | None:
        try:
            status, reason = dlc_mod.job_state(client, dlc_job_id)
        except Exception as e:  # the SDK raises TeaException/ClientException/requests errors
            kind = dlc_mod.error_kind(e)
            code, message = dlc_mod.api_error(e)
            for k in ("gone", "denied"):
                seen[k] = seen[k] + 1 if kind == k else 0
            if seen["gone"] >= DLC_GONE_AFTER:
                return PlatformState(True, int(ExitCode.TEMPORARY), f"{job} no longer exists (deleted?): "
                                     f"{code}: {message}; submit again with the same --job-id to resume")  # fmt: skip
            if seen["denied"] >= DLC_GONE_AFTER:
                return PlatformState(True, int(ExitCode.STORAGE_DENIED), f"{job}: GetJob denied: {code}: {message}")
            line = f"{job}: GetJob failed, will retry: {code}: {message}"
            if line != seen["error"]:
                say(line)
            seen["error"] = line
            return None
        seen.update(gone=0, denied=0, error=None)
        detail = f"{job} {status}" + (f": {reason}" if reason else "")
        if status != seen["status"]:
            say(detail)
        seen["status"] = status
        if status in dlc_mod.SUCCEEDED_STATES:
            return PlatformState(True, 0, detail)
        if status in dlc_mod.FAILED_STATES:
            return PlatformState(True, int(ExitCode.TEMPORARY), detail, silent_exit_code=int(ExitCode.NOT_STARTED))
        if status in dlc_mod.STOPPED_STATES:
            resume = "; submit again with the same --job-id to resume"
            return PlatformState(True, int(ExitCode.TEMPORARY), detail + resume)
        return None

    return probe
