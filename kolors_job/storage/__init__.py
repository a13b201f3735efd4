"""One small interface over local dirs, S3 (boto3) and Alibaba OSS (oss2).

    store = open_store("oss://bucket/jobs/", settings)
    store.child("job-1").write_text("status.json", "{}")

Backends are imported lazily, so a job writing only to local paths never imports boto3/oss2.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

from kolors_job.settings import Settings

from .base import Store, redact

__all__ = ["Store", "is_remote", "open_store", "redact", "split_uri"]

SCHEMES = ("file", "s3", "oss")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def split_uri(uri: str) -> tuple[str, str, str]:
    """``(scheme, bucket, prefix)``; prefix has a trailing '/' unless empty.

    Local paths (plain or ``file://``) give ``("file", "", "/absolute/dir/")``.
    """
    m = _SCHEME.match(uri)
    scheme = m.group(1).lower() if m else "file"
    if scheme not in SCHEMES:
        raise ValueError(
            f"unsupported storage URI scheme {scheme!r} in {redact(uri)!r}: "
            "use file://, s3://, oss:// or a local path"
        )
    if scheme == "file":
        if m:
            rest = uri[m.end() :]
            host, sep, path = rest.partition("/")
            if host not in ("", "localhost"):
                raise ValueError(f"file URI {uri!r} names host {host!r}: only local paths are supported")
            rest = "/" + unquote(path) if sep else "/"
        else:
            rest = uri
        local = Path(rest).expanduser().absolute().as_posix()
        return "file", "", local.rstrip("/") + "/"
    bucket, _, prefix = uri[m.end() :].partition("/")
    if not bucket:
        raise ValueError(f"storage URI {redact(uri)!r} has no bucket name")
    prefix = prefix.lstrip("/")
    return scheme, bucket, prefix if not prefix or prefix.endswith("/") else prefix + "/"


def is_remote(uri: str) -> bool:
    return split_uri(uri)[0] != "file"


def open_store(uri: str, settings: Settings | None = None) -> Store:
    """A store rooted at ``uri``. Unknown schemes raise ValueError; clients are built here, once."""
    scheme, bucket, prefix = split_uri(uri)
    settings = settings or Settings()
    if scheme == "s3":
        from .s3 import S3Store

        return S3Store(bucket, prefix, settings)
    if scheme == "oss":
        from .oss import OSSStore

        return OSSStore(bucket, prefix, settings)
    from .local import LocalStore

    return LocalStore(prefix)
