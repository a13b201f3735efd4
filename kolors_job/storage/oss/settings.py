"""The OSS backend's own settings (``KOLORS_JOB_OSS_*``, ``OSS_ENDPOINT``, ``OSS_REGION``) and the bucket
names OSS accepts.

Light on purpose: registering ``oss://`` imports this module, never oss2. Credentials are not settings
(see ``credentials``): they come from the environment's Alibaba Cloud chain and never pass through here.
"""

from __future__ import annotations

import re

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["OSSSettings", "check_bucket"]


class OSSSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KOLORS_JOB_OSS_", extra="ignore", populate_by_name=True)

    endpoint: str | None = Field(None, validation_alias=AliasChoices("KOLORS_JOB_OSS_ENDPOINT", "OSS_ENDPOINT"))
    """e.g. ``https://oss-cn-hangzhou-internal.aliyuncs.com`` (the ``-internal`` one from ECS/PAI in that region);
    ``OSS_ENDPOINT`` too."""
    region: str | None = None
    """The bucket's region (``cn-hangzhou``): names the public endpoint when none is set, and signs (V4)."""
    signing_region: str | None = Field(None, validation_alias=AliasChoices("OSS_REGION"))
    """``OSS_REGION``: the region to sign for when ``region`` is unset (it names no endpoint)."""

    def resolved_endpoint(self) -> str | None:
        """The endpoint requests go to: the one set, else the public endpoint of ``region``."""
        if self.endpoint:
            return self.endpoint
        return f"https://oss-{self.region}.aliyuncs.com" if self.region else None

    def v4_region(self, endpoint: str) -> str | None:
        """Region for V4 signatures: configured, or read from a standard ``oss-<region>[-internal]`` host."""
        if region := self.region or self.signing_region:
            return region
        m = re.search(r"(?:^|[/.])oss-([a-z0-9-]+?)(?:-internal)?\.aliyuncs\.com", endpoint)
        return m.group(1) if m else None

    def missing(self) -> str | None:
        """What this environment lacks before an ``oss://`` URI can be opened (``kolors-job validate`` says so)."""
        if self.resolved_endpoint():
            return None
        return ("needs an OSS endpoint where the job runs (KOLORS_JOB_OSS_ENDPOINT, OSS_ENDPOINT or "
                "KOLORS_JOB_OSS_REGION; `render k8s --oss-region` or `submit dlc --region` set it); none is set here")


_BUCKET = re.compile(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")


def check_bucket(bucket: str) -> None:
    if not _BUCKET.fullmatch(bucket):
        raise ValueError(
            "OSS bucket names are 3-63 characters: lower-case letters, digits and '-', starting and "
            "ending with a letter or digit"
        )
