"""One small interface over local dirs, S3 (boto3), Alibaba OSS (oss2) and any registered backend.

    store = open_store("oss://bucket/jobs/", settings)
    store.child("job-1").write_text("status.json", "{}")

Each scheme is one ``register`` line below (``registry``); backends are imported lazily, so a job
writing only to local paths never imports boto3/oss2.
"""

from __future__ import annotations

import re

from .base import Store, redact
from .registry import (
    backend,
    check_bucket_uri,
    check_uri,
    is_bucket_uri,
    open_store,
    register,
    scheme_of,
    schemes,
    split_uri,
    unregister,
)

__all__ = [
    "Store",
    "backend",
    "check_bucket_uri",
    "check_uri",
    "is_bucket_uri",
    "open_store",
    "redact",
    "register",
    "scheme_of",
    "schemes",
    "split_uri",
    "unregister",
]

_S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_OSS_BUCKET = re.compile(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")
_IPV4 = re.compile(r"\d{1,3}(\.\d{1,3}){3}")


def _oss_bucket(bucket: str) -> None:
    if not _OSS_BUCKET.fullmatch(bucket):
        raise ValueError(
            "OSS bucket names are 3-63 characters: lower-case letters, digits and '-', starting and "
            "ending with a letter or digit"
        )


def _s3_bucket(bucket: str) -> None:
    if not _S3_BUCKET.fullmatch(bucket) or ".." in bucket or _IPV4.fullmatch(bucket):
        raise ValueError(
            "S3 bucket names are 3-63 characters: lower-case letters, digits, '.' and '-', starting and "
            "ending with a letter or digit, no '..', not an IP address"
        )


# The order is the one error messages list them in.
register("oss", "kolors_job.storage.oss.store:OSSStore", check_bucket=_oss_bucket)
register("s3", "kolors_job.storage.s3.store:S3Store", check_bucket=_s3_bucket)
register("file", "kolors_job.storage.local:LocalStore", local=True)
