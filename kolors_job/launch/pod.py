"""The pod every Kubernetes launch runs (a Job, a PyTorchJob's replicas, a TrainJob's nodes): the options that vary
between clusters or runs (``RenderOptions``), the memory a pod needs, its container (image, arguments, env), its
volumes and its security contexts. ``k8s`` and ``trainer`` wrap it in their objects."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

from kolors_job.launch.regions import internal_endpoint
from kolors_job.launch.torchrun import GRACE_ENV

__all__ = ["RenderOptions", "container", "memory_for", "pod_env", "pod_spec", "resources", "run_args", "volume_mounts",
           "volumes"]  # fmt: skip


CONTAINER = "kolors-job"  # the Job's container; a PyTorchJob's must be "pytorch"


PYTORCH_CONTAINER = "pytorch"


PYTORCH_PORT = 23456


CACHE_MOUNT = "/cache"


SHM_MOUNT = "/dev/shm"  # noqa: S108 - a mount point in the pod, not a temp file of ours


TMP_MOUNT = "/tmp"  # noqa: S108 - an emptyDir, because the root filesystem is read-only


HOME_MOUNT = "/home/kolors"


RUN_AS = 1000


DEFAULT_TOLERATIONS: tuple[dict[str, str], ...] = (
    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
)


HOST_MEMORY_PER_RANK_GIB = 10
"""Private host RAM one rank needs at its peak: its CUDA context, the Python heap, the caption and latent
caches, and in a bf16 story the UNet cast on the host before the LoRA is applied (5.2 GB; an fp32 story's
10.3 GB is over this figure). The weights themselves are not in it: ranks map the safetensors and each
module is cast on its way to the GPU (``models.load_kolors_components(cast=False)`` + ``models.place``;
tests/test_loading.py measures it). The memory limit is ``HOST_MEMORY_BASE_GIB + ranks x this + /dev/shm``
(an in-memory emptyDir counts)."""


HOST_MEMORY_BASE_GIB = 24
"""Once per pod: the launcher and DataLoader workers (6) and one page-cached copy of the fp16 weight files
(UNet 5.2 GB + ChatGLM 12.5 GB), which every rank maps and the pod's memory limit is charged for once."""


@dataclass(frozen=True)
class RenderOptions:
    """Everything that varies between clusters or runs; defaults suit one H100/A100-class node."""

    job_id: str
    image: str
    manifest_uri: str
    output: str | None = None
    """Overrides the manifest's ``spec.output.uri`` (``run --output``)."""
    gpus: int = 1
    """GPUs per node (pod)."""
    nodes: int = 1
    """More than one renders a PyTorchJob (Master + nodes-1 Workers)."""
    kind: str = "auto"
    """``auto`` (Job for one node, PyTorchJob for more), ``job`` or ``pytorchjob``."""
    namespace: str | None = None
    service_account: str | None = "kolors-job"
    irsa_role_arn: str | None = None
    """EKS IRSA: also render the ServiceAccount annotated with this IAM role."""
    rrsa_role_name: str | None = None
    """ACK RRSA: also render the ServiceAccount annotated with this RAM role."""
    secret: str | None = None
    """A Secret whose keys become env vars (static credentials); prefer IRSA/RRSA."""
    cache_pvc: str | None = "kolors-job-cache"
    """PVC mounted at /cache (models, datasets, compile caches); ``None`` uses an emptyDir. Multi-node needs RWX."""
    create_cache_pvc: str | None = "200Gi"
    """A size: also render the cache PVC the pods mount (``None``: it must exist already)."""
    storage_class: str | None = None
    shm_size: str = "16Gi"
    cpu: str = "8"
    memory: str | None = None
    """Pod memory request = limit; ``None`` computes it from the ranks per pod (:func:`memory_for`)."""
    oss_endpoint: str | None = None
    """``KOLORS_JOB_OSS_ENDPOINT`` in the pod; an ``oss://`` manifest or output needs it or ``oss_region``."""
    oss_region: str | None = None
    """The cluster's Alibaba Cloud region (ACK): the pod gets ``https://oss-<region>-internal.aliyuncs.com``
    unless ``oss_endpoint`` is given."""
    scratch_size: str = "20Gi"
    """The pod's ``/tmp`` scratch (frames, checkpoints before upload, the LoRA): the emptyDir's ``sizeLimit``
    and the container's ``ephemeral-storage`` request, so the scheduler picks a node with that much disk."""
    attempt: str | None = None
    """Suffix of the workload's name: each submit of a job id is a new Job (a failed Job is immutable, so
    re-applying the same name would change nothing); the job id, and so the resume, stays the same."""
    create_namespace: bool = True
    """Also render ``namespace`` as a Namespace object (when one is given)."""
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict[str, str], ...] = DEFAULT_TOLERATIONS
    priority_class: str | None = None
    queue: str | None = None
    """Kueue LocalQueue name (adds ``kueue.x-k8s.io/queue-name``)."""
    image_pull_secret: str | None = None
    active_deadline_seconds: int = 6 * 3600
    ttl_seconds_after_finished: int = 7 * 24 * 3600
    backoff_limit: int = 3
    termination_grace_seconds: int = 120
    """SIGTERM → checkpoint → exit 75 must fit in here before SIGKILL."""
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def resolved_kind(self) -> str:
        if self.kind == "auto":
            return "pytorchjob" if self.nodes > 1 else "job"
        return self.kind

    @property
    def resolved_memory(self) -> str:
        return self.memory or memory_for(self.gpus, self.shm_size)

    @property
    def resolved_oss_endpoint(self) -> str | None:
        """``oss_endpoint``, else the internal endpoint of ``oss_region``."""
        return self.oss_endpoint or (internal_endpoint(self.oss_region) if self.oss_region else None)


def gib(quantity: str, *, flag: str = "--shm-size") -> float:
    """A Kubernetes memory quantity (``16Gi``, ``512Mi``, ``1Ti``, ``64G``) in GiB."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGTP]i?|)", quantity.strip())
    if not m:
        raise ValueError(f"{flag} {quantity!r}: not a quantity like 16Gi")
    number, unit = float(m.group(1)), m.group(2)
    powers = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5}
    base = 1024 if unit.endswith("i") else 1000
    return number * base ** powers[unit.rstrip("i")] / 1024**3


def memory_for(ranks: int, shm_size: str = "16Gi") -> str:
    """The pod's memory limit for ``ranks`` processes: base + per-rank peak + the in-memory /dev/shm."""
    return f"{HOST_MEMORY_BASE_GIB + ranks * HOST_MEMORY_PER_RANK_GIB + int(-(-gib(shm_size) // 1))}Gi"


def run_args(opts: RenderOptions) -> list[str]:
    args = ["run", "--job-id", opts.job_id]
    if opts.output:
        args += ["--output", opts.output]
    return args


def pod_env(opts: RenderOptions, *, retryable_code: int | None) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "KOLORS_JOB_MANIFEST_URI", "value": opts.manifest_uri},
        {"name": "KOLORS_JOB_CACHE_DIR", "value": CACHE_MOUNT},
        # Scratch (frames, checkpoints before upload) on the pod's own emptyDir, not the shared cache
        # volume: resume reads the output store, never this directory.
        {"name": "KOLORS_JOB_WORK_DIR", "value": f"{TMP_MOUNT}/kolors-job-work"},
        {"name": "KOLORS_JOB_LOG_FORMAT", "value": "json"},
        # What torchrun derives the ranks' SIGTERM→SIGKILL window from (its default is 30 s).
        {"name": GRACE_ENV, "value": str(opts.termination_grace_seconds)},
    ]
    if endpoint := opts.resolved_oss_endpoint:
        env.append({"name": "KOLORS_JOB_OSS_ENDPOINT", "value": endpoint})
    if retryable_code is not None:
        env.append({"name": "KOLORS_JOB_RETRYABLE_EXIT_CODE", "value": str(retryable_code)})
    env += [{"name": k, "value": v} for k, v in sorted(opts.extra_env.items())]
    return env


def container(
    opts: RenderOptions, *, name: str, command: list[str] | None, args: list[str], retryable_code: int | None
) -> dict[str, Any]:
    c: dict[str, Any] = {"name": name, "image": opts.image, "imagePullPolicy": "IfNotPresent"}
    if command:
        c["command"] = command
    c["args"] = args
    c["env"] = pod_env(opts, retryable_code=retryable_code)
    if opts.secret:
        c["envFrom"] = [{"secretRef": {"name": opts.secret}}]
    if name == PYTORCH_CONTAINER:
        c["ports"] = [{"name": "pytorchjob-port", "containerPort": PYTORCH_PORT, "protocol": "TCP"}]
    c["resources"] = resources(opts)
    c["volumeMounts"] = volume_mounts()
    c["securityContext"] = copy.deepcopy(CONTAINER_SECURITY_CONTEXT)
    return c


def resources(opts: RenderOptions) -> dict[str, Any]:
    """Requests and limits of one pod (node): CPU, memory (request = limit), GPUs, scratch disk."""
    memory = opts.resolved_memory
    return {
        "requests": {
            "cpu": opts.cpu,
            "memory": memory,
            "nvidia.com/gpu": str(opts.gpus),
            "ephemeral-storage": opts.scratch_size,
        },
        "limits": {"memory": memory, "nvidia.com/gpu": str(opts.gpus)},
    }


def volume_mounts() -> list[dict[str, Any]]:
    return [
        {"name": "cache", "mountPath": CACHE_MOUNT},
        {"name": "dshm", "mountPath": SHM_MOUNT},
        {"name": "tmp", "mountPath": TMP_MOUNT},
        {"name": "home", "mountPath": HOME_MOUNT},
    ]


def volumes(opts: RenderOptions) -> list[dict[str, Any]]:
    cache: dict[str, Any] = (
        {"name": "cache", "persistentVolumeClaim": {"claimName": opts.cache_pvc}}
        if opts.cache_pvc
        else {"name": "cache", "emptyDir": {}}
    )
    return [
        cache,
        # /dev/shm is 64 MB by default: too small for DataLoader workers and NCCL.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": opts.shm_size}},
        {"name": "tmp", "emptyDir": {"sizeLimit": opts.scratch_size}},
        {"name": "home", "emptyDir": {}},
    ]


CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


POD_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": RUN_AS,
    "runAsGroup": RUN_AS,
    "fsGroup": RUN_AS,
    "fsGroupChangePolicy": "OnRootMismatch",
    "seccompProfile": {"type": "RuntimeDefault"},
}


def pod_spec(opts: RenderOptions, container: dict[str, Any], *, restart_policy: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if restart_policy:
        spec["restartPolicy"] = restart_policy
    if opts.service_account:
        spec["serviceAccountName"] = opts.service_account
    # The job never talks to the Kubernetes API; IRSA/RRSA mount their own projected tokens.
    spec["automountServiceAccountToken"] = False
    spec["terminationGracePeriodSeconds"] = opts.termination_grace_seconds
    if opts.priority_class:
        spec["priorityClassName"] = opts.priority_class
    spec["nodeSelector"] = dict(opts.node_selector)
    spec["tolerations"] = [dict(t) for t in opts.tolerations]
    if opts.image_pull_secret:
        spec["imagePullSecrets"] = [{"name": opts.image_pull_secret}]
    spec["securityContext"] = copy.deepcopy(POD_SECURITY_CONTEXT)
    spec["containers"] = [container]
    spec["volumes"] = volumes(opts)
    return spec
