"""``submit katib``: apply the Experiment (``katib.render``), follow its trials until Katib says it is over, then
rank the trials from their outputs (``sweep report``) and exit with the best trial's outcome."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kolors_job.core.errors import ExitCode, JobError, ManifestError
from kolors_job.launch import k8s
from kolors_job.launch.katib import (
    EXPERIMENT_LABEL,
    TERMINAL_TRIAL,
    inline_manifest,
    output_prefix,
    render,
    sweep_options,
)
from kolors_job.sweep.metrics import OBJECTIVE

__all__ = ["TrialView", "cmd_submit", "follow", "trial_view"]


@dataclass
class TrialView:
    name: str
    state: str | None
    objective: str | None
    params: dict[str, str]


def trial_view(obj: dict[str, Any]) -> TrialView:
    """A Katib Trial as one line's worth: its terminal condition, objective (latest) and assignments."""
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    state = None
    for c in status.get("conditions") or []:
        if c.get("status") == "True" and c.get("type") in TERMINAL_TRIAL:
            state = c["type"]
    latest = None
    for m in (status.get("observation") or {}).get("metrics") or []:
        if m.get("name") == OBJECTIVE:
            latest = m.get("latest")
    assignments = (obj.get("spec") or {}).get("parameterAssignments") or []
    params = {a.get("name", "?"): str(a.get("value")) for a in assignments}
    return TrialView(str(meta.get("name", "?")), state, latest, params)


def experiment_done(obj: dict[str, Any] | None) -> str | None:
    """``Succeeded``/``Failed`` once the Experiment has ended, else None."""
    for c in (obj or {}).get("status", {}).get("conditions") or []:
        if c.get("status") == "True" and c.get("type") in ("Succeeded", "Failed"):
            return f"{c['type']}: {c.get('reason', '')} {c.get('message', '')}".strip()
    return None


def follow(kube: Any, name: str, *, timeout: float, poll: float, say: Callable[[str], None]) -> str | None:
    """Print each trial as it ends; the Experiment's final condition, or None at the timeout."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while True:
        for obj in kube.items("trials", "-l", f"{EXPERIMENT_LABEL}={name}"):
            view = trial_view(obj)
            if view.state and view.name not in seen:
                seen.add(view.name)
                params = " ".join(f"{k}={v}" for k, v in view.params.items())
                say(f"trial {view.name} {view.state}: objective {view.objective or 'n/a'}  {params}".rstrip())
        done = experiment_done(kube.get(f"experiment/{name}"))
        if done:
            say(f"experiment {name} {done}")
            return done
        if time.monotonic() >= deadline:
            say(f"timed out after {timeout:.0f} s following experiment {name} (it may still be running)")
            return None
        time.sleep(max(0.0, min(poll, deadline - time.monotonic())))


def cmd_submit(ns: argparse.Namespace) -> int:
    """``submit katib``: apply the Experiment, follow its trials, report, exit with the best trial's outcome."""
    import shutil

    from kolors_job.launch.outputs import say
    from kolors_job.launch.watch import Kubectl
    from kolors_job.sweep.report import followed_outcome
    from kolors_job.sweep.spec import load_sweep

    try:
        if not ns.sweep:
            raise ManifestError("submit katib: --sweep FILE is required")
        loaded = load_sweep(ns.sweep)
        opts = sweep_options(ns, loaded)
        docs = render(loaded, opts, collector=ns.collector, inline_manifest=inline_manifest(loaded, ns))
    except ManifestError as e:
        for p in e.problems:
            say(f"invalid sweep: {p}")
        return int(e.exit_code)
    except ValueError as e:
        say(f"kolors-job submit katib: {e}")
        return int(ExitCode.INVALID_MANIFEST)
    prefix = output_prefix(loaded, opts.output)
    kubectl = shutil.which(ns.kubectl) if ns.kubectl else None
    if not kubectl:
        sys.stdout.write(k8s.to_yaml(docs))
        say(f"kubectl ({ns.kubectl or 'disabled'}) not found: the YAML is on stdout, apply it yourself")
        return int(ExitCode.OK)
    kube = Kubectl(kubectl, opts.namespace)
    say(f"experiment {loaded.name}: {loaded.body.max_trials} trials, {loaded.body.parallel_trials} at a time")
    say(f"trials    {prefix}<trial>/")
    try:
        if kube.exists("experiment", loaded.name):
            say(f"attaching to experiment {loaded.name}, which exists already")
        else:
            docs = [d for d in docs if d["kind"] not in ("Namespace", "PersistentVolumeClaim")
                    or not kube.exists(d["kind"].lower(), d["metadata"]["name"])]  # fmt: skip
            kube.apply(k8s.to_yaml(docs))
    except JobError as e:
        say(f"kolors-job submit katib: {e}")
        return int(ExitCode.NOT_STARTED)
    if not ns.wait:
        return int(ExitCode.OK)
    done = follow(kube, loaded.name, timeout=ns.timeout, poll=ns.poll, say=say)
    return followed_outcome(prefix, done, weights=loaded.body.objective.weights, say=say)
