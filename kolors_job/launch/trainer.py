"""Kubeflow Trainer v2: a ``TrainJob`` on a torch-distributed ``TrainingRuntime`` (``render trainjob``).

Trainer v2 replaces the Training Operator's ``PyTorchJob`` (v1): a ``TrainJob`` names a runtime, a
JobSet template with an ML policy, and carries only what varies per run (image, command, env, nodes,
processes and resources per node). The stock ``torch-distributed`` ClusterTrainingRuntime has no
failure policy (its Jobs retry every exit code, a bug as often as a preemption), and a TrainJob may
patch only pod-level fields of its runtime, not a Job's ``podFailurePolicy``. So this renders a
namespaced ``TrainingRuntime`` built like ``torch-distributed`` (one ``node`` replicated job, a ``node``
container, ``mlPolicy.torch``) plus what every kolors-job pod has: the exit-code policy of the batch Job
(:mod:`kolors_job.launch.k8s`), the volumes (cache PVC, in-memory ``/dev/shm``, sized ``/tmp``), the
security context, the service account, tolerations and the grace period. Its name is a digest of its
spec, so runs with the same cluster options share one and a run with other options never changes theirs.

Failures across nodes: every ``node`` Job has ``backoffLimit: 0`` and the Job's ``podFailurePolicy``:
a permanent exit code (1-6) fails the Job by ``PodFailurePolicy``, which fails the whole JobSet at once;
75 (or a kill) fails it by ``BackoffLimitExceeded``, and JobSet recreates every node (``maxRestarts`` =
``--backoff-limit``), which resume from the last checkpoint; a preemption (``DisruptionTarget``) is not
counted. Trainer injects ``PET_NNODES``/``PET_NPROC_PER_NODE``/``PET_NODE_RANK``/``PET_MASTER_*``, which
``kolors_job.launch.torchrun`` (torchrun keeping the ranks' exit codes) reads.
Checked against the Trainer v2.3.0 CRDs (``tests/fixtures/kubeflow_trainer/``); needs Trainer >= v2.0.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shlex
from pathlib import Path
from typing import Any

from kolors_job.core.errors import ExitCode
from kolors_job.launch import k8s, pod
from kolors_job.launch.torchrun import shutdown_timeout

API_VERSION = "trainer.kubeflow.org/v1alpha1"
NODE = "node"
"""The torch-distributed runtime's replicated job and container name (Trainer's ``constants.Node``)."""
ANCESTOR_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"
"""Marks the replicated job a TrainJob's ``spec.trainer`` applies to (value ``trainer``)."""
RESERVED_ENV = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
"""Set by Trainer's torch plugin; its webhook refuses a TrainJob that sets them itself."""


def _pod_failure_policy() -> dict[str, Any]:
    """The batch Job's rules (k8s.render_job), for the ``node`` container."""
    return {
        "rules": [
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {"action": "FailJob",
             "onExitCodes": {"containerName": NODE, "operator": "In", "values": k8s.PERMANENT_EXIT_CODES}},
            {"action": "Count",
             "onExitCodes": {"containerName": NODE, "operator": "In", "values": [int(ExitCode.TEMPORARY)]}},
        ]
    }  # fmt: skip


def _runtime_spec(opts: pod.RenderOptions) -> dict[str, Any]:
    container: dict[str, Any] = {"name": NODE, "image": opts.image, "imagePullPolicy": "IfNotPresent"}
    if opts.secret:
        container["envFrom"] = [{"secretRef": {"name": opts.secret}}]
    container["volumeMounts"] = pod.volume_mounts()
    container["securityContext"] = copy.deepcopy(pod.CONTAINER_SECURITY_CONTEXT)
    template = pod.pod_spec(opts, container, restart_policy="Never")  # the Job's pod, as k8s renders it
    node_job = {
        "name": NODE,
        "replicas": 1,  # Trainer's webhook: the trainer job has one replica; numNodes sets its pods
        "template": {
            "metadata": {"labels": {ANCESTOR_LABEL: "trainer"}},
            "spec": {
                "backoffLimit": 0,  # retries are JobSet's, all nodes together (see the module doc)
                "activeDeadlineSeconds": opts.active_deadline_seconds,
                "podReplacementPolicy": "Failed",
                "podFailurePolicy": _pod_failure_policy(),
                "template": {"metadata": {"labels": {"app.kubernetes.io/name": k8s.APP}}, "spec": template},
            },
        },
    }
    return {
        "mlPolicy": {"numNodes": 1, "torch": {}},
        "template": {
            "spec": {
                "failurePolicy": {
                    "maxRestarts": opts.backoff_limit,
                    "rules": [
                        # A permanent exit code (the Job failed by its podFailurePolicy): no restart.
                        {"name": "permanentExitCode", "action": "FailJobSet",
                         "onJobFailureReasons": ["PodFailurePolicy"]},
                    ],
                },
                "replicatedJobs": [node_job],
            }
        },
    }  # fmt: skip


def runtime_name(spec: dict[str, Any]) -> str:
    """``kolors-torch-<digest of the spec>``: one runtime per set of cluster options."""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    return f"kolors-torch-{digest}"


def render_runtime(opts: pod.RenderOptions) -> dict[str, Any]:
    """The ``TrainingRuntime`` the TrainJob runs on (torch-distributed's shape + kolors-job's pod and policy)."""
    spec = _runtime_spec(opts)
    meta: dict[str, Any] = {"name": runtime_name(spec)}
    if opts.namespace:
        meta["namespace"] = opts.namespace
    meta["labels"] = {"app.kubernetes.io/name": k8s.APP, "trainer.kubeflow.org/framework": "torch"}
    return {"apiVersion": API_VERSION, "kind": "TrainingRuntime", "metadata": meta, "spec": spec}


def render_trainjob(opts: pod.RenderOptions, runtime: dict[str, Any]) -> dict[str, Any]:
    """The ``TrainJob``: this run's image, command, env, nodes, processes and resources per node."""
    env = pod.pod_env(opts, retryable_code=None)  # the same env as the batch Job's container
    clash = sorted({e["name"] for e in env} & set(RESERVED_ENV))
    if clash:
        raise ValueError(f"--env: {', '.join(clash)} are set by Kubeflow Trainer itself")
    command = ["tini", "--", "python", "-m", "kolors_job.launch.torchrun",
               f"--shutdown-timeout={shutdown_timeout(opts.termination_grace_seconds)}"]  # fmt: skip
    return {
        "apiVersion": API_VERSION,
        "kind": "TrainJob",
        "metadata": k8s._metadata(opts, k8s.workload_name(opts)),
        "spec": {
            "runtimeRef": {
                "apiGroup": "trainer.kubeflow.org",
                "kind": "TrainingRuntime",
                "name": runtime["metadata"]["name"],
            },
            "trainer": {
                "image": opts.image,
                "command": command,
                "args": ["/app/entrypoint.py", *pod.run_args(opts)],
                "env": env,
                "numNodes": opts.nodes,
                "numProcPerNode": opts.gpus,
                "resourcesPerNode": pod.resources(opts),
            },
        },
    }


def render(opts: pod.RenderOptions) -> list[dict[str, Any]]:
    """Namespace, ServiceAccount and cache PVC (as ``render k8s``), the TrainingRuntime, the TrainJob."""
    k8s.check_options(opts)
    # Several nodes mount the cache at once: its PVC must be ReadWriteMany, as for a PyTorchJob.
    shared = dataclasses.replace(opts, kind="pytorchjob" if opts.nodes > 1 else "job")
    docs = [k8s.render_namespace(opts), k8s.render_service_account(opts), k8s.render_cache_pvc(shared)]
    runtime = render_runtime(opts)
    return [*(d for d in docs if d), runtime, render_trainjob(opts, runtime)]


# ------------------------------------------------------------------------------------------ examples

# file name -> ``render trainjob`` arguments; ``render trainjob --write-examples k8s/`` regenerates it.
EXAMPLES: dict[str, list[str]] = {
    "trainjob.yaml": shlex.split(
        f"--job-id example-2x8 --image {k8s.EXAMPLE_IMAGE}"
        " --manifest-uri s3://BUCKET/kolors-jobs/example-2x8/manifest.yaml --namespace kolors"
        " --nodes 2 --gpus 8 --cpu 64 --irsa-role-arn arn:aws:iam::123456789012:role/kolors-job"
        " --create-cache-pvc 500Gi --storage-class efs-sc"
    ),
}


def write_examples(directory: Path, options_from_args: Any) -> list[Path]:
    """Regenerate ``k8s/trainjob.yaml``; ``options_from_args(argv) -> RenderOptions`` is the CLI's parser."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, args in EXAMPLES.items():
        path = directory / fname
        header = (
            "# Generated by `kolors-job render trainjob " + " ".join(args) + "`.\n"
            "# Do not edit: change kolors_job/launch/trainer.py (or k8s.py) and run "
            "`kolors-job render trainjob --write-examples k8s/`.\n"
        )
        path.write_text(k8s.to_yaml(render(options_from_args(args)), header=header), encoding="utf-8")
        written.append(path)
    return written
