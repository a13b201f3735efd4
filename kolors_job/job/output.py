"""The job's output prefix ``<output>/<job id>/``: whose it is, and whether this job already finished there.

Nothing is written before these checks: a finished run, or another manifest's run, stays untouched. Rank 0
then takes the prefix's exclusive claim (:mod:`kolors_job.job.claim`) and writes through its fence.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kolors_job.core.errors import OutputConflictError, StorageNotFoundError
from kolors_job.job.claim import CLAIM_DIR, OutputClaim
from kolors_job.manifest.spec import Manifest

if TYPE_CHECKING:
    from kolors_job.job.context import Job

__all__ = ["already_finished", "claim_output", "prepare_output"]


def already_finished(job: Job) -> bool:
    """Read-only, before any claim: True for ``_SUCCESS`` (written last) beside this very manifest, a
    conflict for another manifest's run. A no-op rerun or a refused one writes nothing at all;
    prepare_output checks again under the claim, where it counts."""
    if job.force:
        return False
    try:
        existing = job.store.read_bytes("manifest.resolved.yaml")
    except StorageNotFoundError:
        return False
    _refuse_other_manifest(job, existing)
    return job.store.exists("_SUCCESS")


def _refuse_other_manifest(job: Job, resolved: bytes) -> None:
    if _resolved_digest(resolved) != job.digest and not job.force:
        raise OutputConflictError(
            f"{job.output_uri}: holds a run of a different manifest; use a new job id "
            "(--job-id or metadata.name) or --force to replace it"
        )


def _resolved_digest(raw: bytes) -> str | None:
    import yaml

    try:
        return Manifest.model_validate(yaml.safe_load(raw)).digest()
    except Exception:  # a foreign or hand-edited file: treated as another manifest's
        return None


def claim_output(job: Job) -> None:
    """Take the exclusive claim on the prefix and keep it alive while the job runs."""

    def lost(reason: str) -> None:
        job.stop.signal_name = f"loss of the output claim ({reason})"
        job.stop.event.set()

    claim = OutputClaim(
        job.store,
        job.digest,
        lease_s=job.settings.claim_lease_s,
        wait_s=job.settings.claim_wait_s,
        should_stop=job.stop,
        on_lost=lost,
    )
    claim.acquire()
    job.claim = claim
    # From here on every write and delete under the prefix goes through the claim's fence: the store
    # refuses them once another run has taken the prefix over (a pause past the lease, a frozen node).
    assert claim.fenced is not None
    job.store = job.status.store = claim.fenced
    claim.start_heartbeat()


def prepare_output(job: Job) -> bool:
    """Refuse another manifest's prefix; return True when this exact job already finished."""
    existing = job.store.read_bytes("manifest.resolved.yaml") if job.store.exists("manifest.resolved.yaml") else None
    if existing is not None:
        _refuse_other_manifest(job, existing)
    if job.store.exists("_SUCCESS") and not job.force:
        return True
    if job.force and job.main:
        for key in job.store.list():
            if not key.startswith(f"{CLAIM_DIR}/"):  # our own claim stays
                job.store.delete(key)
    if job.main:
        job.store.write_bytes("manifest.resolved.yaml", job.manifest.to_yaml().encode())
    return False
