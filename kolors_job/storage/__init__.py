"""One small interface over local dirs, S3 (boto3), Alibaba OSS (oss2) and any registered backend.

    store = open_store("oss://bucket/jobs/", settings)
    store.child("job-1").write_text("status.json", "{}")

Each scheme is one ``register`` line below (``registry``): its store class, its own settings class and
bucket-name check (``<backend>/settings.py``), and the optional extra that installs its SDK. Stores are
imported lazily, so a job writing only to local paths never imports boto3/oss2.
"""

from __future__ import annotations

from .base import Store, redact
from .oss import settings as oss_settings
from .registry import (
    backend,
    check_bucket_uri,
    check_uri,
    is_bucket_uri,
    listed_schemes,
    open_store,
    register,
    schemes,
    setup_problem,
    split_uri,
    unregister,
)
from .s3 import settings as s3_settings

__all__ = [
    "Store",
    "backend",
    "check_bucket_uri",
    "check_uri",
    "is_bucket_uri",
    "listed_schemes",
    "open_store",
    "redact",
    "register",
    "schemes",
    "setup_problem",
    "split_uri",
    "unregister",
]

# One line per backend; the order is the one error messages list them in. A backend's settings module is
# light (pydantic-settings only): its SDK is imported when a first URI of its scheme is opened.
register("oss", "kolors_job.storage.oss.store:OSSStore", check_bucket=oss_settings.check_bucket,
         settings=oss_settings.OSSSettings, extra="oss")  # fmt: skip
register("s3", "kolors_job.storage.s3.store:S3Store", check_bucket=s3_settings.check_bucket,
         settings=s3_settings.S3Settings, extra="s3")  # fmt: skip
register("file", "kolors_job.storage.local:LocalStore", local=True)
