"""Where ``oss://`` stores get their credentials, first match wins (never from our config, never logged):

  1. ``OSS_ACCESS_KEY_ID``/``OSS_ACCESS_KEY_SECRET``[/``OSS_SESSION_TOKEN``] env;
  2. ``ALIBABA_CLOUD_ACCESS_KEY_ID``/``ALIBABA_CLOUD_ACCESS_KEY_SECRET``
     [/``ALIBABA_CLOUD_SECURITY_TOKEN``] env, or the same as ``ALIBABACLOUD_*`` (the aliyun CLI's names);
  3. PAI-DLC's RAM-role file ``/mnt/.alibabacloud/credentials`` (re-read when it changes);
  4. the ``alibabacloud_credentials`` default chain (RRSA OIDC, profile files, ECS RAM role), wrapped
     as an oss2 provider so STS tokens refresh;
  5. anonymous (public buckets only).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path

from oss2.credentials import Credentials, CredentialsProvider, StaticCredentialsProvider

from kolors_job.core.settings import ALIBABA_CLOUD_KEY_ENV

__all__ = ["DLC_CREDENTIALS_FILE", "credentials_provider", "default_chain_provider"]

log = logging.getLogger(__name__)


DLC_CREDENTIALS_FILE = Path("/mnt/.alibabacloud/credentials")


class _DlcFileProvider(CredentialsProvider):
    """PAI-DLC writes STS credentials for the job's RAM role to a JSON file and rotates it."""

    def __init__(self, path: Path) -> None:
        self._path, self._mtime, self._creds = path, -1.0, Credentials()

    def get_credentials(self) -> Credentials:
        try:
            mtime = self._path.stat().st_mtime
        except OSError:  # being rotated: keep the last good credentials
            return self._creds
        if mtime != self._mtime:
            doc = json.loads(self._path.read_text())
            self._creds = Credentials(
                doc["AccessKeyId"], doc["AccessKeySecret"], doc.get("SecurityToken") or ""
            )
            self._mtime = mtime
        return self._creds


class _AlibabaChainProvider(CredentialsProvider):
    """Adapts an ``alibabacloud_credentials`` client (which caches and refreshes STS) to oss2."""

    def __init__(self, client) -> None:
        self._client = client

    def get_credentials(self) -> Credentials:
        c = self._client.get_credential()
        return Credentials(c.access_key_id, c.access_key_secret, c.security_token or "")


@functools.cache
def default_chain_provider() -> CredentialsProvider | None:
    """The alibabacloud default chain, or None if it finds nothing (probed once per process)."""
    try:
        from alibabacloud_credentials.client import Client

        client = Client()
        client.get_credential()
    except Exception as exc:
        log.info("no Alibaba Cloud credentials found (%s); OSS access is anonymous", type(exc).__name__)
        return None
    return _AlibabaChainProvider(client)


def credentials_provider() -> CredentialsProvider | None:
    for ak, sk, token in (("OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET", "OSS_SESSION_TOKEN"), *ALIBABA_CLOUD_KEY_ENV):
        if os.environ.get(ak) and os.environ.get(sk):
            return StaticCredentialsProvider(os.environ[ak], os.environ[sk], os.environ.get(token, ""))
    if DLC_CREDENTIALS_FILE.is_file():
        return _DlcFileProvider(DLC_CREDENTIALS_FILE)
    return default_chain_provider()
