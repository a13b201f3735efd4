"""Checks before any network call: a job on a machine that cannot run it learns so in its first second.

No GPU given to the container, or a driver older than the image's CUDA build, would otherwise show only after
minutes of hub retries on a node that has no network either; a full-size model on a GPU also gets its memory
plan here (exit 4 when it cannot fit), before any download.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kolors_job.core.errors import InputError
from kolors_job.core.redact import redact_uri
from kolors_job.core.uris import TINY_SCHEME, scheme_of
from kolors_job.models.weights import is_full_size

if TYPE_CHECKING:
    from kolors_job.job.context import Job

__all__ = ["check_device", "check_device_first"]


def check_device(job: Job, *, full_size: bool, uri: str) -> None:
    """Stop when the job would land on a device that cannot run it (see :func:`check_device_first`)."""
    from kolors_job.core.device import cuda_problem

    if job.device.startswith("cuda"):
        if problem := cuda_problem():
            raise InputError(f"spec.device is cuda but {problem}")
    elif full_size and job.manifest.spec.device == "auto" and not job.allow_cpu:
        what = "is a full-size Kolors" if _local_model_dir(uri) else "is a hub or bucket model (full-size unless tiny://)"
        raise InputError(
            f"model {redact_uri(uri)!r} {what} and {cuda_problem() or 'no GPU is in use'}; "
            "a CPU would take hours (spec.device: cpu, --allow-cpu or KOLORS_JOB_ALLOW_CPU=1 runs it there anyway)"
        )
    if full_size and job.device.startswith("cuda"):  # the memory plan on this card: exit 4 when it cannot fit
        from kolors_job.plan.runtime import plan_for_device

        job.memory_plan = plan_for_device(job.manifest, job.device, job.settings.cache_dir)


def _local_model_dir(uri: str) -> Path | None:
    """The path a plain-path or ``file://`` model names (looked at without any network); None otherwise."""
    scheme = scheme_of(uri)
    if scheme == "file":
        uri = uri.removeprefix("file://")
    elif scheme:
        return None
    return Path(uri).expanduser()


def check_device_first(job: Job) -> None:
    """The device check, before any network call (the output store, a hub listing): a job on a machine
    without a usable GPU learns it in its first second, not after minutes of hub retries on a node that
    has no network either. A ``tiny://`` model always runs; a local one is judged by its UNet's bytes; a hub
    or bucket model cannot be sized without the network, so it counts as full-size."""
    uri = job.manifest.spec.model.base
    local = _local_model_dir(uri)
    full_size = not uri.startswith(f"{TINY_SCHEME}://") and (local is None or is_full_size(local))
    check_device(job, full_size=full_size, uri=uri)
