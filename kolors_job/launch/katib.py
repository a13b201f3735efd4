"""Katib: a sweep as a ``kubeflow.org/v1beta1`` Experiment whose trials are our own Job (or PyTorchJob).

The trial template *is* what ``render k8s`` renders for one run (:mod:`kolors_job.launch.k8s`: volumes,
secrets, security context, exit-code ``podFailurePolicy``, grace period), with three changes Katib needs:

- no ``metadata.name``/``namespace`` (Katib names each trial's Job after the trial; its webhook refuses them);
- the container's command names the run after the trial (``--trial ${trialParameters.trialName}``, a trial
  parameter referencing ``${trialSpec.Name}``), sends every swept field as ``--set path=${trialParameters.x}``
  and writes the metric lines Katib's collector reads (:mod:`kolors_job.sweep.metrics`);
- the command is one ``sh -c`` script. Katib's pod webhook rewrites the primary container anyway into
  ``sh -c "<command and args joined by spaces> && echo completed > <metrics dir>/$$$$.pid"``, which makes
  ``sh`` PID 1, and PID 1 ignores a SIGTERM it has no handler for: the job would never get the preemption
  signal it checkpoints on. Our script traps it and passes it on (``tini -s`` keeps reaping compile workers),
  then ends with the job's own exit status, so ``&& echo completed`` and the Job's exit-code policy see it.

Trials write to ``<output>/<experiment>/<trial>/``. The objective is ``objective`` (the sweep's weighted sum)
with the ``latest`` strategy: Katib's default for ``maximize`` is ``max``, which would pick a validation point
over the final story's score. The base manifest travels inline (``KOLORS_JOB_MANIFEST``) unless a
``--manifest-uri`` is given. The Experiment CRD carries no schema (``x-kubernetes-preserve-unknown-fields``),
so :func:`check_experiment` round-trips it through Katib's own API models (``kubeflow-katib-api``) and
refuses any field they would drop; ``tests/katib.py`` ports the admission webhook's checks.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from kolors_job.core.errors import ExitCode, ManifestError
from kolors_job.launch import k8s, pod
from kolors_job.sweep.metrics import METRIC_NAMES, OBJECTIVE
from kolors_job.sweep.spec import LoadedSweep, Range, param_key

API_VERSION = "kubeflow.org/v1beta1"
METRICS_DIR = "/var/log/katib"
METRICS_FILE = f"{METRICS_DIR}/kolors-metrics.json"
"""Katib mounts an emptyDir at the file's directory in the primary container and its collector sidecar."""
TRIAL_NAME = "trialName"
SENTINEL = "kolors-sweep-trial"
"""The job id the k8s renderer is given; every place it lands becomes the trial's name."""
ENTRYPOINT = ["tini", "--", "python", "/app/entrypoint.py"]
"""The image's ENTRYPOINT (Dockerfile). Katib's webhook reads a container's command to wrap it; without
one it would have to pull the image's config from the registry."""
INJECTION_LABEL = "katib.kubeflow.org/metrics-collector-injection"
"""Katib injects its metrics collector only into pods of namespaces labelled ``enabled``."""
EXPERIMENT_LABEL = "katib.kubeflow.org/experiment"
"""What Katib labels each Trial with (``consts.LabelExperimentName``)."""
# Katib's own defaults (pkg/apis/controller/experiments/v1beta1/constants.go), written out so the object
# says what it means
JOB_SUCCESS = 'status.conditions.#(type=="Complete")#|#(status=="True")#'
JOB_FAILURE = 'status.conditions.#(type=="Failed")#|#(status=="True")#'
KUBEFLOW_SUCCESS = 'status.conditions.#(type=="Succeeded")#|#(status=="True")#'
KUBEFLOW_MASTER = {"training.kubeflow.org/job-role": "master"}
Collector = Literal["file", "stdout"]
TERMINAL_TRIAL = ("Succeeded", "Failed", "Killed", "EarlyStopped", "MetricsUnavailable")


def _text(value: Any) -> str:
    """A value as Katib carries it (a string) and ``--set`` reads it back. Floats are written positionally
    (``0.00003``, not ``3e-05``): YAML 1.2 readers such as kubectl take ``3e-05`` for a number, and Katib's
    ``feasibleSpace`` fields are strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return format(Decimal(repr(value)), "f")
    return str(value)


def parameters(loaded: LoadedSweep) -> list[dict[str, Any]]:
    """The search space as Katib parameters (``spec.parameters``), one per swept path."""
    out = []
    for path, space in loaded.body.parameters.items():
        item: dict[str, Any] = {"name": param_key(path)}
        if isinstance(space, Range):
            low, high = space.bounds
            if space.kind == "int":
                item["parameterType"] = "int"
                feasible = {"min": str(int(low)), "max": str(int(high))}
                if space.step is not None:
                    feasible["step"] = str(int(space.step))
            else:
                item["parameterType"] = "double"
                feasible = {"min": _text(float(low)), "max": _text(float(high))}
                feasible["distribution"] = "logUniform" if space.kind == "log_uniform" else "uniform"
                if space.step is not None:
                    feasible["step"] = _text(float(space.step))
            item["feasibleSpace"] = feasible
        else:
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in space)
            item["parameterType"] = "discrete" if numeric else "categorical"
            item["feasibleSpace"] = {"list": [_text(v) for v in space]}
        out.append(item)
    return out


def run_words(loaded: LoadedSweep, *, output: str, collector: Collector, trial: str) -> list[str]:
    """``run``'s arguments in a trial: the trial's name, the experiment prefix, the objective, metrics, --set."""
    words = ["run", "--trial", trial, "--output", output, "--objective", loaded.body.objective.text()]
    words += ["--metrics-file", METRICS_FILE] if collector == "file" else ["--metrics-stdout"]
    for path in loaded.body.parameters:
        words += ["--set", f"{path}=${{trialParameters.{param_key(path)}}}"]
    return words


def signal_script(words: list[str]) -> str:
    """``sh -c`` script running ``words`` with SIGTERM passed on, ending with their exit status (not ``exit``:
    Katib appends ``&& echo completed > …`` to the script, which must still run). ``wait`` returns early when
    the trap fires, so it waits again while the job is still there."""
    if words[:2] == ["tini", "--"]:
        words = ["tini", "-s", "--", *words[2:]]  # not PID 1 here: register as the subreaper instead
    return (  # one brace group: what Katib appends (its StdOut redirect, ``&& echo completed``) applies to all
        "{ trap 'kill -TERM \"$pid\" 2>/dev/null' TERM INT; "
        f"{shlex.join(words)} & pid=$!; "
        'wait "$pid"; rc=$?; '
        'while kill -0 "$pid" 2>/dev/null; do wait "$pid"; rc=$?; done; '
        '(exit "$rc"); }'
    )


def _containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    if workload["kind"] == "Job":
        return list(workload["spec"]["template"]["spec"]["containers"])
    return [c for r in workload["spec"]["pytorchReplicaSpecs"].values() for c in r["template"]["spec"]["containers"]]


def trial_spec(loaded: LoadedSweep, opts: pod.RenderOptions, *, collector: Collector,
               inline_manifest: str | None) -> dict[str, Any]:  # fmt: skip
    """The rendered Job/PyTorchJob as Katib's ``trialTemplate.trialSpec``."""
    docs = k8s.render(replace(opts, job_id=SENTINEL, attempt=None))
    spec = copy.deepcopy(k8s.workload(docs))
    spec["metadata"].pop("name", None)
    spec["metadata"].pop("namespace", None)
    trial = f"${{trialParameters.{TRIAL_NAME}}}"
    for c in _containers(spec):
        words = (c.pop("command", None) or list(ENTRYPOINT)) + c.pop("args", [])
        i = words.index("run")
        assert words[i + 1 : i + 3] == ["--job-id", SENTINEL], words
        rest = words[i + 3 :]
        output = rest[rest.index("--output") + 1]
        words = words[:i] + run_words(loaded, output=output, collector=collector, trial=trial)
        c["command"] = ["sh", "-c", signal_script(words)]
        order = ["name", "image", "imagePullPolicy", "command"]
        c.update({k: c.pop(k) for k in [*order, *(k for k in list(c) if k not in order)]})
        if inline_manifest is not None:
            c["env"] = [{"name": "KOLORS_JOB_MANIFEST", "value": inline_manifest}
                        if e["name"] == "KOLORS_JOB_MANIFEST_URI" else e for e in c["env"]]  # fmt: skip
    text = json.dumps(spec).replace(SENTINEL, trial)  # the job-id labels: Katib trial names are label-safe
    return json.loads(text)


def experiment(loaded: LoadedSweep, opts: pod.RenderOptions, *, collector: Collector = "file",
               inline_manifest: str | None = None) -> dict[str, Any]:  # fmt: skip
    body = loaded.body
    spec = trial_spec(loaded, opts, collector=collector, inline_manifest=inline_manifest)
    template: dict[str, Any] = {
        "primaryContainerName": pod.CONTAINER if spec["kind"] == "Job" else pod.PYTORCH_CONTAINER,
        "successCondition": JOB_SUCCESS if spec["kind"] == "Job" else KUBEFLOW_SUCCESS,
        "failureCondition": JOB_FAILURE,
    }
    if spec["kind"] != "Job":
        template["primaryPodLabels"] = dict(KUBEFLOW_MASTER)  # rank 0 (the master) validates and scores
    template["trialParameters"] = [
        {"name": TRIAL_NAME, "reference": "${trialSpec.Name}", "description": "the trial's name: its job id"},
        *({"name": param_key(p), "reference": param_key(p), "description": f"spec.{p}"} for p in body.parameters),
    ]
    template["trialSpec"] = spec
    objective: dict[str, Any] = {
        "type": "maximize",
        "objectiveMetricName": OBJECTIVE,
        "additionalMetricNames": [m for m in METRIC_NAMES if m != OBJECTIVE],
        # the final line (the whole story) is the trial's value, not the best validation point
        "metricStrategies": [{"name": m, "value": "latest"} for m in METRIC_NAMES],
    }
    if body.objective.goal is not None:
        objective["goal"] = body.objective.goal
    if collector == "file":
        collector_spec: dict[str, Any] = {
            "collector": {"kind": "File"},
            "source": {"fileSystemPath": {"path": METRICS_FILE, "kind": "File", "format": "JSON"}},
        }
    else:
        collector_spec = {"collector": {"kind": "StdOut"}}
    meta: dict[str, Any] = {"name": loaded.name}
    if opts.namespace:
        meta["namespace"] = opts.namespace
    meta["labels"] = {"app.kubernetes.io/name": k8s.APP, "kolors-job/sweep": loaded.name}
    exp_spec: dict[str, Any] = {
        "objective": objective,
        "algorithm": {"algorithmName": body.algorithm},
        "parallelTrialCount": body.parallel_trials,
        "maxTrialCount": body.max_trials,
        "maxFailedTrialCount": body.failed_trials_allowed,
        "metricsCollectorSpec": collector_spec,
        "parameters": parameters(loaded),
        "trialTemplate": template,
    }
    if body.early_stopping is not None:
        exp_spec["earlyStopping"] = {
            "algorithmName": "medianstop",
            "algorithmSettings": [
                {"name": "min_trials_required", "value": str(body.early_stopping.min_trials)},
                {"name": "start_step", "value": str(body.early_stopping.start_step)},
            ],
        }
    exp = {"apiVersion": API_VERSION, "kind": "Experiment", "metadata": meta, "spec": exp_spec}
    check_experiment(exp)
    return exp


def check_experiment(exp: dict[str, Any]) -> None:
    """Katib's API models (``kubeflow-katib-api``) must read the Experiment back unchanged: a field they do
    not know would be dropped by the API server's own decoding just the same (ValueError otherwise)."""
    from kubeflow_katib_api.models import V1beta1Experiment
    from pydantic import ValidationError

    from kolors_job.launch.dlc import model_diff

    try:
        model = V1beta1Experiment.from_dict(copy.deepcopy(exp))
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        raise ValueError(f"Experiment: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    assert model is not None
    problems = model_diff(exp, model.to_dict(), what="Katib's V1beta1Experiment")
    if problems:
        raise ValueError("Experiment: " + "; ".join(problems))


def output_prefix(loaded: LoadedSweep, output: str | None) -> str:
    """``<output>/<experiment>/``: where the trials' directories go."""
    root = output or loaded.base.spec.output.uri
    return f"{root.rstrip('/')}/{loaded.name}/"


def render(loaded: LoadedSweep, opts: pod.RenderOptions, *, collector: Collector = "file",
           inline_manifest: str | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Namespace (labelled for Katib's injection), ServiceAccount, cache PVC as ``render k8s`` has them, then
    the Experiment."""
    opts = replace(opts, output=output_prefix(loaded, opts.output))
    docs = [d for d in k8s.render(replace(opts, job_id=SENTINEL)) if d["kind"] not in ("Job", "PyTorchJob")]
    for d in docs:
        if d["kind"] == "Namespace":
            d["metadata"].setdefault("labels", {})[INJECTION_LABEL] = "enabled"
    return [*docs, experiment(loaded, opts, collector=collector, inline_manifest=inline_manifest)]


# ------------------------------------------------------------------------------------------ examples

EXAMPLE_SWEEP = "examples/sweep.yaml"
EXAMPLES: dict[str, list[str]] = {
    "katib-experiment.yaml": shlex.split(
        f"--sweep {EXAMPLE_SWEEP} --image registry-vpc.cn-beijing.aliyuncs.com/NAMESPACE/kolors-job:TAG"
        " --namespace kolors --rrsa-role-name kolors-job --oss-region cn-beijing"
        " --node-selector aliyun.accelerator/nvidia_name=NVIDIA-A10 --toleration gpu-pool=a10:NoSchedule"
        " --create-cache-pvc 200Gi --storage-class alicloud-disk-topology-alltype"
    ),
}


def write_examples(directory: Path, from_argv: Callable[[list[str]], tuple[LoadedSweep, pod.RenderOptions,
                   argparse.Namespace]]) -> list[Path]:  # fmt: skip
    written = []
    for fname, argv in EXAMPLES.items():
        loaded, opts, ns = from_argv(argv)
        docs = render(loaded, opts, collector=ns.collector, inline_manifest=inline_manifest(loaded, ns))
        header = (
            f"# Generated by `kolors-job render katib {' '.join(argv)}`.\n"
            "# Do not edit: change kolors_job/launch/katib.py and run "
            "`kolors-job render katib --write-examples k8s/`.\n"
        )
        path = directory / fname
        path.write_text(k8s.to_yaml(docs, header=header), encoding="utf-8")
        written.append(path)
    return written


# ------------------------------------------------------------------------------------------ CLI


def inline_manifest(loaded: LoadedSweep, ns: argparse.Namespace) -> str | None:
    return None if ns.manifest_uri else loaded.manifest_raw.decode("utf-8")


def sweep_options(ns: argparse.Namespace, loaded: LoadedSweep) -> pod.RenderOptions:
    from kolors_job.launch.options import options_from_namespace

    if not ns.image:
        raise ManifestError("--image is required (the kolors-job image every trial runs)")
    return options_from_namespace(ns, job_id=SENTINEL, manifest_uri=ns.manifest_uri or "inline")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from kolors_job.launch.options import add_k8s_arguments

    p.add_argument("--sweep", help="the sweep file (examples/sweep.yaml)")
    p.add_argument("--manifest-uri", help="where trials read the manifest; default: the sweep's manifest, inline")
    p.add_argument("--output", help="overrides the manifest's spec.output.uri (trials go to <output>/<sweep>/)")
    p.add_argument("--collector", choices=("file", "stdout"), default="file",
                   help="Katib's metrics collector: File (JSON lines, default) or StdOut (name=value lines)")
    add_k8s_arguments(p, require_image=False)


def _cmd_render(ns: argparse.Namespace) -> int:
    from kolors_job.sweep.spec import load_sweep

    if ns.write_examples:
        parser = argparse.ArgumentParser(prog="kolors-job render katib")
        add_arguments(parser)

        def from_argv(argv: list[str]) -> tuple[LoadedSweep, pod.RenderOptions, argparse.Namespace]:
            sub = parser.parse_args(argv)
            loaded = load_sweep(sub.sweep)
            return loaded, sweep_options(sub, loaded), sub

        for path in write_examples(Path(ns.write_examples), from_argv):
            print(path)
        return int(ExitCode.OK)
    if not ns.sweep:
        raise ManifestError("render katib: --sweep FILE is required")
    loaded = load_sweep(ns.sweep)
    try:
        opts, inline = sweep_options(ns, loaded), inline_manifest(loaded, ns)
        docs = render(loaded, opts, collector=ns.collector, inline_manifest=inline)
    except ValueError as e:
        raise ManifestError(f"render katib: {e}") from None
    sys.stdout.write(k8s.to_yaml(docs))
    return int(ExitCode.OK)


def add_render_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    p = sub.add_parser("katib", help="print the Katib Experiment (+ Namespace, ServiceAccount, cache PVC) of a sweep")
    add_arguments(p)
    p.add_argument("--write-examples", metavar="DIR", help="regenerate k8s/katib-experiment.yaml and exit")
    p.set_defaults(func=_cmd_render)
    return p
