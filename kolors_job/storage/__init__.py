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

__all__ = ["Store", "check_bucket_uri", "is_remote", "open_store", "redact", "split_uri"]

SCHEMES = ("file", "s3", "oss")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


_S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_OSS_BUCKET = re.compile(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")
_IPV4 = re.compile(r"\d{1,3}(\.\d{1,3}){3}")


def check_bucket_uri(scheme: str, rest: str) -> None:
    """Raise ValueError unless ``rest`` (what follows ``s3://``/``oss://``) is ``bucket[/path]`` with a
    bucket name the service accepts, no credentials and no ``.``/``..`` segments.

    Caught here, at validation, because later they go wrong in worse ways: ``user:pass@bucket`` reaches
    the SDK's error text (and from there logs and status.json), an invalid bucket name fails as a
    retryable connection error (S3) or an SDK traceback (OSS), and ``..`` names another prefix.
    The problem is described, never echoed: the text may hold a password.
    """
    bucket, _, path = rest.partition("/")
    if "@" in bucket:
        raise ValueError(
            f"{scheme}:// URI must not carry credentials (user:password@): they come from the environment's "
            "credential chain"
        )
    if not bucket:
        raise ValueError(f"{scheme}:// URI needs a bucket name")
    if scheme == "oss":
        if not _OSS_BUCKET.fullmatch(bucket):
            raise ValueError(
                "OSS bucket names are 3-63 characters: lower-case letters, digits and '-', starting and "
                "ending with a letter or digit"
            )
    elif not _S3_BUCKET.fullmatch(bucket) or ".." in bucket or _IPV4.fullmatch(bucket):
        raise ValueError(
            "S3 bucket names are 3-63 characters: lower-case letters, digits, '.' and '-', starting and "
            "ending with a letter or digit, no '..', not an IP address"
        )
    if any(seg in (".", "..") for seg in path.split("/")):
        raise ValueError(f"{scheme}:// URI must not contain '.' or '..' path segments")
    if "\\" in path or any(ord(c) < 32 for c in path):
        raise ValueError(f"{scheme}:// URI path must not contain backslashes or control characters")


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
    check_bucket_uri(scheme, uri[m.end() :])
    bucket, _, prefix = uri[m.end() :].partition("/")
    prefix = prefix.lstrip("/")
    return scheme, bucket, prefix if not prefix or prefix.endswith("/") else prefix + "/"


def is_remote(uri: str) -> bool:
    m = _SCHEME.match(uri)
    return m is not None and m.group(1).lower() in ("s3", "oss")


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
