"""Runtime environment (not the job): where caches live, which endpoints to use, how to log.

Layered like pydantic-settings intends: defaults < ``KOLORS_JOB_*`` environment variables.
Credentials are deliberately *not* fields here: boto3 and the Alibaba Cloud credential chain
read them from their standard places (env, profile, IRSA/RRSA web identity, ECS RAM role,
``/mnt/.alibabacloud/credentials``), so they never pass through our config or our logs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KOLORS_JOB_", extra="ignore")

    cache_dir: Path = Path.home() / ".cache" / "kolors-job"
    """Model/dataset downloads and compiled artifacts; mount a persistent volume here (``/cache``)."""
    work_dir: Path | None = None
    """Local scratch for a run; defaults to ``<cache_dir>/work``."""
    log_format: Literal["auto", "json", "text"] = "auto"
    log_level: str = "INFO"

    s3_endpoint_url: str | None = None
    """Custom S3 endpoint (MinIO, R2, OSS's S3 endpoint, a local test server)."""
    s3_region: str | None = None
    s3_addressing_style: Literal["auto", "path", "virtual"] = "auto"
    oss_endpoint: str | None = None
    """e.g. ``https://oss-cn-hangzhou-internal.aliyuncs.com``; falls back to ``OSS_ENDPOINT``."""
    oss_region: str | None = None
    storage_max_attempts: int = 8
    """Bound on retries of transient storage errors (5xx, throttling, resets), with backoff + jitter."""
    multipart_threshold_mb: int = 16
    multipart_chunk_mb: int = 8

    hf_endpoint: str | None = Field(None, validation_alias=AliasChoices("KOLORS_JOB_HF_ENDPOINT", "HF_ENDPOINT"))
    """Hugging Face Hub endpoint for ``hf://`` sources (a mirror); None: the hub's own default.
    (ModelScope's client reads ``MODELSCOPE_ENDPOINT`` itself.)"""
    cache_reserve_mb: int = 512
    """Free space a hub download must leave in the cache (the dataset and compile caches live there too)."""
    download_workers: int = 4
    """Files a hub client downloads in parallel."""

    @property
    def resolved_work_dir(self) -> Path:
        return self.work_dir or (self.cache_dir / "work")


def get_settings() -> Settings:
    return Settings()
