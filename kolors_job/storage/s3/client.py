"""The boto3 client of ``s3://`` stores: the backend's settings, botocore's retries bounded by the job's
deadline and SIGTERM, and create-only uploads (``If-None-Match: *``) for the claim's fence."""

from __future__ import annotations

import os
import threading
import time

import boto3
import botocore.session
from botocore import UNSIGNED
from botocore.client import BaseClient
from botocore.config import Config
from botocore.loaders import Loader
from botocore.retries import standard as standard_retries

from kolors_job.core.settings import Settings

from .. import base
from ..base import check_new_request, check_retry
from .settings import S3Settings

__all__ = ["create_only_hook", "make_client"]


def make_client(settings: Settings) -> BaseClient:
    """One client per store tree: clients are thread-safe and hold the connection pool."""
    base.quiet_sdk_loggers("botocore", "boto3", "s3transfer")
    own = settings.backend("s3", S3Settings)
    custom_endpoint = (
        own.endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    session = _session()
    config = Config(
        retries={"total_max_attempts": settings.storage_max_attempts, "mode": "standard"},
        s3={"addressing_style": own.addressing_style},
        connect_timeout=settings.storage_connect_timeout_s,
        read_timeout=settings.storage_read_timeout_s,
        # Third-party S3 servers (OSS's S3 API, older MinIO/Ceph) reject botocore's default
        # aws-chunked CRC trailers; we send Content-MD5 ourselves and verify ETags instead.
        request_checksum_calculation="when_required" if custom_endpoint else "when_supported",
        response_checksum_validation="when_required" if custom_endpoint else "when_supported",
        signature_version=UNSIGNED if session.get_credentials() is None else None,
    )
    client = session.client(
        "s3", endpoint_url=own.endpoint_url or None, region_name=own.region, config=config
    )
    _bound_retries(client, settings.storage_max_attempts, settings.storage_deadline_s)
    client._kolors_create_only = create_only_hook(client)  # type: ignore[attr-defined]
    return client


_LOADERS: dict[str | None, Loader] = {}
_LOADERS_LOCK = threading.Lock()


def _session() -> boto3.session.Session:
    """A new session — credentials and configuration read now, from the environment as it is — that shares the
    process's botocore data loader. Each session's own loader parses the S3 service model, its endpoint rules and
    the partitions (~1 MB of JSON) again: ~60 ms of CPU a client, where a job opens a store for its manifest, its
    dataset, its output and each bucket it reads. The loader only reads botocore's and boto3's own data files
    (and ``AWS_DATA_PATH``'s, which keys it), so sharing it changes nothing a request carries."""
    core = botocore.session.get_session()
    key = core.get_config_variable("data_path")
    with _LOADERS_LOCK:
        loader = _LOADERS.setdefault(key, core.get_component("data_loader"))
        core.register_component("data_loader", loader)
        session = boto3.session.Session(botocore_session=core)
        # boto3 appends its own data folder to the loader's search path on every session: once is enough
        loader.search_paths[:] = list(dict.fromkeys(loader.search_paths))
    return session


def create_only_hook(client: BaseClient) -> set[str]:
    """Full keys being created create-only: s3transfer's PutObject / CompleteMultipartUpload for them get
    ``If-None-Match: *`` (its upload arguments have no such option). Returns the shared set."""
    keys: set[str] = set()

    def add(params: dict, **_: object) -> None:
        if params.get("Key") in keys:
            params["IfNoneMatch"] = "*"

    for op in ("PutObject", "CompleteMultipartUpload"):
        client.meta.events.register(f"before-parameter-build.s3.{op}", add)
    return keys


def _bound_retries(client: BaseClient, max_attempts: int, deadline_s: float, max_backoff_s: float = 2.0) -> None:
    """Wrap botocore's standard retry handler: no retry after SIGTERM or past the API call's deadline,
    and backoff sleeps of at most ``max_backoff_s`` (botocore's go up to 20 s, slept without looking
    at any stop flag). Also applies in s3transfer's worker threads, where our own loop cannot look.
    """
    events, name = client.meta.events, "s3"
    events.unregister(f"needs-retry.{name}", unique_id=f"retry-config-{name}")
    inner = standard_retries.register_retry_handler(client, max_attempts=max_attempts)
    events.unregister(f"needs-retry.{name}", unique_id=f"retry-config-{name}")

    def on_call(context: dict, **_: object) -> None:
        context.setdefault("kolors_started", time.monotonic())
        check_new_request("storage request")

    def needs_retry(request_dict: dict, operation: object = None, **kwargs: object) -> float | None:
        delay = inner.needs_retry(request_dict=request_dict, operation=operation, **kwargs)
        if delay is None:
            return None  # a success, a permanent error, or the attempts are used up
        started = request_dict.get("context", {}).get("kolors_started", time.monotonic())
        check_retry(f"S3 {getattr(operation, 'name', 'request')}", started, deadline_s)
        base.RETRIES.add()
        return min(delay, max_backoff_s)

    events.register(f"before-call.{name}", on_call)
    events.register(f"needs-retry.{name}", needs_retry, unique_id=f"retry-config-{name}")
