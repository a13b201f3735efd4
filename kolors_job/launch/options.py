"""The command-line options a launch shares (``render`` and ``submit``, single runs and sweeps alike): the
Kubernetes pod and the PAI-DLC job, read into ``pod.RenderOptions``; help text from docstrings."""

from __future__ import annotations

import argparse
import os
import re

from kolors_job.core.settings import alibaba_cloud_region
from kolors_job.launch import pod

_RST_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")


def _kv(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _toleration(text: str) -> dict[str, str]:
    """``key[=value]:Effect`` → a toleration (``Exists`` when no value)."""
    spec, _, effect = text.rpartition(":")
    if not spec:
        spec, effect = effect, ""
    key, sep, value = spec.partition("=")
    tol = {"key": key, "operator": "Equal" if sep else "Exists"}
    if sep:
        tol["value"] = value
    if effect:
        tol["effect"] = effect
    return tol


def add_k8s_arguments(p: argparse.ArgumentParser, *, require_image: bool) -> None:
    d = pod.RenderOptions
    g = p.add_argument_group("kubernetes")
    g.add_argument("--image", required=require_image, help="container image (pin a digest in production)")
    g.add_argument("--gpus", type=int, default=d.gpus, help="GPUs per node (default %(default)s)")
    g.add_argument("--nodes", type=int, default=d.nodes, help=">1 renders a Kubeflow PyTorchJob")
    g.add_argument("--kind", choices=("auto", "job", "pytorchjob"), default=d.kind)
    g.add_argument("--namespace", help="also rendered as a Namespace unless --no-create-namespace")
    g.add_argument("--create-namespace", action=argparse.BooleanOptionalAction, default=d.create_namespace)
    g.add_argument("--service-account", default=d.service_account, help="'' for none")
    g.add_argument("--irsa-role-arn", help="EKS IRSA: render the ServiceAccount bound to this IAM role")
    g.add_argument("--rrsa-role-name", help="ACK RRSA: render the ServiceAccount bound to this RAM role")
    g.add_argument("--secret", help="Secret with credentials as env vars (envFrom); prefer IRSA/RRSA")
    g.add_argument("--cache-pvc", default=d.cache_pvc, help="PVC for /cache; '' for an emptyDir")
    g.add_argument("--create-cache-pvc", metavar="SIZE", default=d.create_cache_pvc,
                   help="size of the cache PVC rendered with the job (default %(default)s)")  # fmt: skip
    g.add_argument("--storage-class")
    g.add_argument("--shm-size", default=d.shm_size)
    g.add_argument("--cpu", default=d.cpu)
    g.add_argument("--memory", default=d.memory, help=(
        f"pod memory (default {pod.HOST_MEMORY_BASE_GIB}Gi + {pod.HOST_MEMORY_PER_RANK_GIB}Gi per GPU"
        " + --shm-size)"))
    g.add_argument("--oss-region", help="the cluster's region (ACK, e.g. cn-beijing): its internal OSS endpoint "
                   "in the pod, for oss:// URIs")  # fmt: skip
    g.add_argument("--oss-endpoint", help="KOLORS_JOB_OSS_ENDPOINT in the pod (wins over --oss-region)")
    g.add_argument("--scratch-size", default=d.scratch_size,
                   help="pod scratch disk: emptyDir sizeLimit, ephemeral-storage request (%(default)s)")  # fmt: skip
    g.add_argument("--node-selector", type=_kv, action="append", default=[], metavar="KEY=VALUE")
    g.add_argument("--toleration", type=_toleration, action="append", default=None, metavar="KEY[=VALUE]:EFFECT",
                   help="replaces the default nvidia.com/gpu:NoSchedule toleration")  # fmt: skip
    g.add_argument("--priority-class")
    g.add_argument("--queue", help="Kueue LocalQueue")
    g.add_argument("--image-pull-secret")
    g.add_argument("--deadline", type=int, default=d.active_deadline_seconds, help="activeDeadlineSeconds")
    g.add_argument("--ttl", type=int, default=d.ttl_seconds_after_finished, help="ttlSecondsAfterFinished")
    g.add_argument("--backoff-limit", type=int, default=d.backoff_limit)
    g.add_argument("--grace", type=int, default=d.termination_grace_seconds, help="terminationGracePeriodSeconds")
    g.add_argument("--env", type=_kv, action="append", default=[], metavar="KEY=VALUE", help="extra env var")


def options_from_namespace(
    ns: argparse.Namespace, *, job_id: str, manifest_uri: str, attempt: str | None = None
) -> pod.RenderOptions:
    return pod.RenderOptions(
        job_id=job_id,
        image=ns.image,
        manifest_uri=manifest_uri,
        output=ns.output,
        gpus=ns.gpus,
        nodes=ns.nodes,
        kind=ns.kind,
        namespace=ns.namespace,
        service_account=ns.service_account or None,
        irsa_role_arn=ns.irsa_role_arn,
        rrsa_role_name=ns.rrsa_role_name,
        secret=ns.secret,
        cache_pvc=ns.cache_pvc or None,
        create_cache_pvc=ns.create_cache_pvc or None,
        create_namespace=ns.create_namespace,
        oss_endpoint=ns.oss_endpoint,
        oss_region=ns.oss_region,
        scratch_size=ns.scratch_size,
        attempt=attempt,
        storage_class=ns.storage_class,
        shm_size=ns.shm_size,
        cpu=ns.cpu,
        memory=ns.memory or None,
        node_selector=dict(ns.node_selector),
        tolerations=tuple(ns.toleration) if ns.toleration is not None else pod.DEFAULT_TOLERATIONS,
        priority_class=ns.priority_class,
        queue=ns.queue,
        image_pull_secret=ns.image_pull_secret,
        active_deadline_seconds=ns.deadline,
        ttl_seconds_after_finished=ns.ttl,
        backoff_limit=ns.backoff_limit,
        termination_grace_seconds=ns.grace,
        extra_env=dict(ns.env),
    )


def add_dlc_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("PAI-DLC")
    g.add_argument("--spec", default="pai/job.yaml", help="CreateJob spec (default %(default)s)")
    g.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                   help="override a spec field, e.g. WorkspaceId=123 or JobSpecs.0.PodCount=2")  # fmt: skip
    g.add_argument("--nproc-per-node", type=int, default=1, help="processes (GPUs) per DLC node")
    g.add_argument("--region", default=alibaba_cloud_region(),
                   help="the job's region: DLC's API endpoint, <REGION> in the spec and the job's internal OSS "
                   "endpoint (default $ALIBABA_CLOUD_REGION_ID)")  # fmt: skip
    g.add_argument("--endpoint", default=os.environ.get("KOLORS_JOB_DLC_ENDPOINT"),
                   help="default pai-dlc.<region>.aliyuncs.com")  # fmt: skip


def prose(doc: str) -> str:
    """A docstring as ``--help`` text: reST roles and literals (``:mod:`x```, double backticks) as plain words."""
    return _RST_ROLE.sub(r"\1", doc).replace("``", "")
