"""Runtime environment (not the job): where caches live, which endpoints to use, how to log.

Layered like pydantic-settings intends: defaults < ``KOLORS_JOB_*`` environment variables. Each storage
backend owns its own settings class (``storage/s3/settings.py``: ``KOLORS_JOB_S3_*``; ``storage/oss/settings.py``:
``KOLORS_JOB_OSS_*``), read where the backend opens its client; the knobs every backend shares (attempts,
deadline, timeouts, multipart sizes) are here. Credentials are deliberately *not* fields anywhere: boto3 and the
Alibaba Cloud credential chain read them from their standard places (env, profile, IRSA/RRSA web identity, ECS
RAM role, ``/mnt/.alibabacloud/credentials``), so they never pass through our config or our logs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

B = TypeVar("B", bound=BaseSettings)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KOLORS_JOB_", extra="ignore")

    cache_dir: Path = Path.home() / ".cache" / "kolors-job"
    """Model/dataset downloads and compiled artifacts; mount a persistent volume here (``/cache``)."""
    work_dir: Path | None = None
    """Local scratch for a run; defaults to ``<cache_dir>/work``."""
    log_format: Literal["auto", "json", "text"] = "auto"
    log_level: str = "INFO"

    storage_max_attempts: int = 8
    """Bound on retries of transient storage errors (5xx, throttling, resets), with backoff + jitter."""
    allow_cpu: bool = False
    """Run a full-size (non-``tiny://``) model without a CUDA GPU: hours per step, so refused unless set."""
    multipart_threshold_mb: int = 16
    multipart_chunk_mb: int = 8
    storage_deadline_s: float = 240.0
    """Overall time one storage operation may take, retries included: a dead endpoint gives exit 75
    within this plus one read timeout (under 300 s by default), never an endless wait."""
    storage_connect_timeout_s: float = 10.0
    storage_read_timeout_s: float = 20.0
    """No byte for this long fails the attempt. Short, so that SIGTERM (which stops retries) ends a
    transfer stuck on a dead endpoint well within a Kubernetes grace period."""
    scan_memory_mb: int = 1024
    """What the dataset scan's image decodes may hold at once, all threads together."""
    claim_lease_s: float = 120.0
    """The output prefix's claim expires this long after its owner's last heartbeat (every quarter
    of it): a preempted or killed run's prefix is taken over by its rerun after at most this long."""
    claim_wait_s: float = 900.0
    """A run of the *same* manifest waits this long for a live run holding the prefix to end
    (then skips if it succeeded, resumes if it failed); still held after that: exit 75."""

    hf_endpoint: str | None = Field(None, validation_alias=AliasChoices("KOLORS_JOB_HF_ENDPOINT", "HF_ENDPOINT"))
    """Hugging Face Hub endpoint for ``hf://`` sources (a mirror); None: the hub's own default."""
    modelscope_endpoint: str | None = Field(
        None, validation_alias=AliasChoices("KOLORS_JOB_MODELSCOPE_ENDPOINT", "MODELSCOPE_ENDPOINT")
    )
    """ModelScope endpoint for ``modelscope://`` sources (``https://www.modelscope.ai`` outside China);
    None: the client's default. Passed to every client call, so it holds for the whole job."""
    cache_reserve_mb: int = 512
    """Free space a hub download must leave in the cache (the dataset and compile caches live there too)."""
    download_workers: int = 4
    """Files a hub client downloads in parallel."""
    backends: dict[str, Any] = Field(default_factory=dict, exclude=True)
    """A storage backend's own settings given in code, by scheme (tests, an embedding program); a backend
    absent here reads its own from the environment (:meth:`backend`)."""

    def backend(self, scheme: str, cls: type[B]) -> B:
        """The settings of the backend registered as ``scheme``: given in ``backends``, else ``cls()`` (its env)."""
        given = self.backends.get(scheme)
        return given if isinstance(given, cls) else cls()

    @property
    def resolved_work_dir(self) -> Path:
        return self.work_dir or (self.cache_dir / "work")


ALIBABA_CLOUD_KEY_ENV: tuple[tuple[str, str, str], ...] = (
    ("ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_SECRET", "ALIBABA_CLOUD_SECURITY_TOKEN"),
    ("ALIBABACLOUD_ACCESS_KEY_ID", "ALIBABACLOUD_ACCESS_KEY_SECRET", "ALIBABACLOUD_SECURITY_TOKEN"),
)
"""Alibaba Cloud AK/STS env names, in order of preference: the SDKs' ``ALIBABA_CLOUD_*``, then the
``ALIBABACLOUD_*`` family that the aliyun CLI and ``configure-aliyun-credentials-action`` < 1.0.4 export."""
ALIBABA_CLOUD_REGION_ENV = ("ALIBABA_CLOUD_REGION_ID", "ALIBABACLOUD_REGION_ID")


def alibaba_cloud_keys(environ: Mapping[str, str] | None = None) -> tuple[str, str, str | None] | None:
    """``(access key id, secret, security token or None)`` from the first env family that has both keys."""
    env = os.environ if environ is None else environ
    for ak, sk, token in ALIBABA_CLOUD_KEY_ENV:
        if env.get(ak) and env.get(sk):
            return env[ak], env[sk], env.get(token) or None
    return None


def alibaba_cloud_region(environ: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if environ is None else environ
    return next((env[n] for n in ALIBABA_CLOUD_REGION_ENV if env.get(n)), None)
