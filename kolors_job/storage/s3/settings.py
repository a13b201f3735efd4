"""The S3 backend's own settings (``KOLORS_JOB_S3_*``) and the bucket names S3 accepts.

Light on purpose: registering ``s3://`` imports this module, never boto3 (the store is imported when a
first ``s3://`` URI is opened). Credentials are not settings: boto3's default chain reads them (env,
profile, IRSA web identity, instance role), so they never pass through our config or our logs.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["S3Settings", "check_bucket"]


class S3Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KOLORS_JOB_S3_", extra="ignore")

    endpoint_url: str | None = None
    """Custom S3 endpoint (MinIO, R2, OSS's S3 endpoint, a local test server); else ``AWS_ENDPOINT_URL_S3``,
    ``AWS_ENDPOINT_URL``, then AWS itself."""
    region: str | None = None
    """The region to sign for; None: boto3's own (``AWS_REGION``, the profile)."""
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    """``path`` for servers without virtual-host buckets (MinIO, radosgw, test servers)."""


_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IPV4 = re.compile(r"\d{1,3}(\.\d{1,3}){3}")


def check_bucket(bucket: str) -> None:
    if not _BUCKET.fullmatch(bucket) or ".." in bucket or _IPV4.fullmatch(bucket):
        raise ValueError(
            "S3 bucket names are 3-63 characters: lower-case letters, digits, '.' and '-', starting and "
            "ending with a letter or digit, no '..', not an IP address"
        )
