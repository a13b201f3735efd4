"""``oss://bucket/prefix`` stores via oss2 (Alibaba Cloud OSS), with CRC64 checks on every transfer.

Endpoint and region: the backend's own settings (``settings.OSSSettings``); credentials: ``credentials``.

Retries: oss2 itself does not retry requests, so every call goes through a bounded retry with
exponential backoff and full jitter on transient errors (5xx, throttling, connection errors, CRC64
mismatches).

Interrupted multipart uploads: ``oss2.resumable_upload`` keeps its checkpoint under
``<cache_dir>/oss-checkpoints``, so a retry (also after a restart of the job on the same cache
volume) resumes the same upload instead of starting a new one; the checkpoint is removed when
the upload completes. Parts of uploads that are never resumed stay billable until a bucket
lifecycle rule ("delete incomplete multipart uploads after N days") removes them: set one.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import oss2
import requests
import urllib3
from oss2 import exceptions as oss_exc
from oss2.credentials import CredentialsProvider

from kolors_job.core.errors import StorageDeniedError, StorageError, StorageNotFoundError, StorageTemporaryError
from kolors_job.core.settings import Settings

from .. import base
from ..atomic import atomic_target
from ..base import Store, backoff_sleep, check_key, check_new_request, child_prefix, redact
from . import credentials
from .settings import OSSSettings

log = logging.getLogger(__name__)
T = TypeVar("T")
MiB = 1024 * 1024

FORBID_OVERWRITE = "x-oss-forbid-overwrite"
COPY_LIMIT = 1024 * MiB
"""The largest object one CopyObject copies on OSS; larger ones are copied in parts."""
COPY_PART = 256 * MiB

DENIED_CODES = base.DENIED_CODES | {"SecurityTokenExpired", "InvalidSecurityToken", "UserDisable"}
TEMPORARY_CODES = base.TEMPORARY_CODES | {"TooManyRequests", "InvalidDigest"}


_STREAM_ERRORS = (
    requests.exceptions.RequestException,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
)
"""Transport errors raised while a response body is read (outside oss2's own RequestError)."""


def make_bucket(name: str, settings: Settings, provider: CredentialsProvider | None = None) -> oss2.Bucket:
    own = settings.backend("oss", OSSSettings)
    endpoint = own.resolved_endpoint()
    if not endpoint:
        raise StorageDeniedError(
            f"oss://{name}/: no OSS endpoint; set KOLORS_JOB_OSS_ENDPOINT, OSS_ENDPOINT "
            "or KOLORS_JOB_OSS_REGION"
        )
    region = own.v4_region(endpoint)
    provider = provider or credentials.credentials_provider()
    if provider is None:
        auth = oss2.AnonymousAuth()
    elif region:
        auth = oss2.ProviderAuthV4(provider)
    else:  # V4 needs the region; custom endpoints (proxies, test servers) may not reveal it
        auth = oss2.ProviderAuth(provider)
    base.quiet_sdk_loggers("oss2")
    # oss2 hands ``connect_timeout`` to requests as its timeout: a (connect, read) pair works there
    timeout = (settings.storage_connect_timeout_s, settings.storage_read_timeout_s)
    return oss2.Bucket(auth, endpoint, name, connect_timeout=timeout, enable_crc=True, region=region)


def _exists(exc: oss_exc.ServerError) -> bool:
    """``x-oss-forbid-overwrite`` found the key taken."""
    return exc.status == 409 and exc.code == "FileAlreadyExists"


def _file_crc(path: Path) -> int:
    crc = oss2.utils.Crc64()
    with open(path, "rb") as f:
        while block := f.read(8 * MiB):
            crc.update(block)
    return crc.crc


# -- errors and retries ------------------------------------------------------------------------
def is_transient(exc: oss_exc.OssError) -> bool:
    if isinstance(exc, (oss_exc.RequestError, oss_exc.InconsistentError)):
        return True
    return base.is_temporary(exc.code, exc.status, TEMPORARY_CODES)


_RETRIED = "_kolors_retried"


class _RetryingBucket:
    """The bucket ``oss2.resumable_upload`` talks to: each request it makes (initiate, every part,
    list parts, complete, small put) gets its own retry budget, as botocore gives each S3 request.

    oss2 has no retries of its own, so without this one failed part of a large upload cost a whole
    attempt of the upload, and a handful of sporadic failures spread over different parts used up
    the budget although no single request failed more than once. File bodies are rewound first.
    """

    _RETRIED_METHODS = frozenset(
        {"init_multipart_upload", "upload_part", "complete_multipart_upload", "list_parts", "put_object"}
    )

    def __init__(self, store: OSSStore, key: str, *, create_only: bool = False) -> None:
        self._store, self._key, self._bucket = store, key, store._bucket
        self._create_only = create_only

    def __getattr__(self, name: str):
        attr = getattr(self._bucket, name)
        if name not in self._RETRIED_METHODS:
            return attr

        def call(*args, **kwargs):
            if self._create_only and name in ("put_object", "complete_multipart_upload"):
                # resumable_upload passes no such header to the completion: create-only must hold there too
                kwargs["headers"] = {**(kwargs.get("headers") or {}), FORBID_OVERWRITE: "true"}
            data = kwargs.get("data", args[3] if name == "upload_part" and len(args) > 3 else None)
            if name == "put_object":
                data = kwargs.get("data", args[1] if len(args) > 1 else None)
            rewind = None
            if isinstance(data, oss2.utils.SizedFileAdapter):
                start = data.file_object.tell()

                def rewind() -> None:
                    data.file_object.seek(start)
                    data.offset = 0
            elif hasattr(data, "seek") and hasattr(data, "tell"):
                start = data.tell()

                def rewind() -> None:
                    data.seek(start)

            return self._store._retry(f"upload ({name})", self._key, lambda: attr(*args, **kwargs), rewind)

        return call


class OSSStore(Store):
    retry_base_delay: float = 0.25
    retry_max_delay: float = 10.0

    def __init__(
        self, bucket: str, prefix: str, settings: Settings, oss_bucket: oss2.Bucket | None = None
    ) -> None:
        self.bucket_name, self.prefix, self.settings = bucket, prefix, settings
        self.uri = f"oss://{bucket}/{prefix}"
        self._bucket = oss_bucket if oss_bucket is not None else make_bucket(bucket, settings)
        self._sleep: Callable[[float], None] = backoff_sleep  # wakes on SIGTERM

    def child(self, *parts: str) -> OSSStore:
        sub = child_prefix(*parts)
        store = OSSStore(
            self.bucket_name, self.prefix + sub + "/" if sub else self.prefix, self.settings, self._bucket
        )
        store.retry_base_delay, store.retry_max_delay, store._sleep = (
            self.retry_base_delay,
            self.retry_max_delay,
            self._sleep,
        )
        return store

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _error(self, exc: oss_exc.OssError, what: str, key: str) -> StorageError:
        # str(exc) of a server error holds the request's details (AccessKeyId, StringToSign):
        # build the message from code/status/request id only.
        where = f"{what} {self.uri}{key}"
        if isinstance(exc, oss_exc.RequestError):
            inner = getattr(exc, "exception", exc)
            return StorageTemporaryError(
                f"{where}: connection error: {type(inner).__name__}: {redact(str(inner))}"
            )
        if isinstance(exc, oss_exc.InconsistentError):
            return StorageTemporaryError(
                f"{where}: CRC64 mismatch, data corrupted in transit (request id {exc.request_id or '-'})"
            )
        if isinstance(exc, oss_exc.ClientError):
            return StorageError(f"{where}: {redact(exc.body)}")
        code = exc.code or str(exc.status)
        msg = f"{where}: {code} (HTTP {exc.status}, request id {exc.request_id or '-'})"
        not_found = code == "NoSuchKey" or (exc.status == 404 and code != "NoSuchBucket")
        return base.classify(
            msg, code, exc.status, not_found=not_found, denied_codes=DENIED_CODES, temporary_codes=TEMPORARY_CODES
        )

    def _retry(self, what: str, key: str, fn: Callable[[], T], rewind: Callable[[], None] | None = None) -> T:
        """Run ``fn`` with up to ``storage_max_attempts`` tries on transient errors; raise the last
        oss2 error, marked as retried so that an enclosing retry loop does not multiply the budget."""
        attempts = max(1, self.settings.storage_max_attempts)
        where, started = f"{what} {self.uri}{key}", time.monotonic()
        for attempt in range(1, attempts + 1):
            check_new_request(where)
            try:
                try:
                    return fn()
                except _STREAM_ERRORS as inner:
                    # oss2 wraps errors of *sending* a request, not of reading its response body
                    # (a reset or truncated GET body, a listing cut short): same thing, retry it.
                    raise oss_exc.RequestError(inner) from None
            except oss_exc.OssError as exc:
                if attempt == attempts or not is_transient(exc) or getattr(exc, _RETRIED, False):
                    setattr(exc, _RETRIED, True)
                    if is_transient(exc):
                        base.note_failure()
                    raise
                # no retry once the job is stopping or the operation's deadline has passed
                if (stop := base.retry_refused(where, started, self.settings.storage_deadline_s)) is not None:
                    raise StorageTemporaryError(f"{stop} (last error: {self._error(exc, what, key)})") from None
                delay = base.backoff_delay(attempt - 1, self.retry_base_delay, self.retry_max_delay)
                log.debug(
                    "%s %s%s: transient %s, retry %d/%d in %.2fs",
                    what,
                    self.uri,
                    key,
                    exc.code or type(exc).__name__,
                    attempt,
                    attempts - 1,
                    delay,
                )
                base.RETRIES.add()
                self._sleep(delay)
                if rewind is not None:
                    rewind()
        raise AssertionError("unreachable")

    def _call(self, what: str, key: str, fn: Callable[[], T]) -> T:
        """:meth:`_retry`, with the final error mapped to a StorageError."""
        try:
            return self._retry(what, key, fn)
        except oss_exc.OssError as exc:
            raise self._error(exc, what, key) from None

    # -- objects --------------------------------------------------------------------------------
    def read_bytes(self, key: str) -> bytes:
        full = self._key(key)

        def get() -> bytes:
            result = self._bucket.get_object(full)
            data = result.read()
            # get_object().read() does not check the CRC itself (only get_object_to_file does).
            if result.server_crc is not None:
                oss2.utils.check_crc("get", result.client_crc, result.server_crc, result.request_id)
            return data

        return self._call("read", key, get)

    def write_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """oss2 checks the CRC64 the server returns; ``if_absent`` is ``x-oss-forbid-overwrite``."""
        return self._put(key, data, if_absent=if_absent) is not None

    def _put(self, key: str, data: bytes, *, if_absent: bool) -> str | None:
        """The new object's ETag; None when ``if_absent`` found the key taken."""
        full = self._key(key)
        headers = {FORBID_OVERWRITE: "true"} if if_absent else None

        def put() -> str | None:
            try:
                return str(self._bucket.put_object(full, data, headers=headers).etag)
            except oss_exc.ServerError as exc:
                if if_absent and _exists(exc):
                    return None
                raise

        return self._call("write", key, put)

    def upload_file(self, key: str, path: Path) -> None:
        """Resumable multipart upload, then an end-to-end CRC64 check of the stored object.

        oss2 checks each part's CRC, but when it *resumes* it takes the finished parts from the
        server's part list, which carries no CRCs, so its final check is skipped and a part that
        failed its CRC (corrupted in transit, yet stored) would be reused. Hence: drop the
        checkpoint (and abort the upload) after a CRC failure, and compare the whole object's
        CRC64 with the local file's after every upload.
        """
        self._upload(key, Path(path))

    def _upload(self, key: str, path: Path, *, create_only: bool = False) -> str | None:
        """Upload and check; the object's ETag, or None when ``create_only`` found the key taken."""
        full = self._key(key)
        store = oss2.ResumableStore(root=str(self.settings.cache_dir), dir="oss-checkpoints")

        def attempt() -> str | None:
            try:
                oss2.resumable_upload(
                    _RetryingBucket(self, key, create_only=create_only),
                    full,
                    str(path),
                    store=store,
                    headers={FORBID_OVERWRITE: "true"} if create_only else None,
                    multipart_threshold=self.settings.multipart_threshold_mb * MiB,
                    part_size=self.settings.multipart_chunk_mb * MiB,
                    num_threads=4,
                )
            except oss_exc.InconsistentError:
                self._drop_checkpoint(store, full, path)
                raise
            except oss_exc.ServerError as exc:
                if create_only and _exists(exc):
                    self._drop_checkpoint(store, full, path)
                    return None
                raise
            head = self._bucket.head_object(full)
            if head.server_crc is not None:
                oss2.utils.check_crc("upload", _file_crc(path), head.server_crc, None)
            return str(head.etag)

        return self._call("upload", key, attempt)

    # -- fencing primitives (storage/fence.py) --------------------------------------------------
    def put_new(self, key: str, source: bytes | Path) -> str | None:
        if isinstance(source, bytes):
            etag = self._put(key, source, if_absent=True)
        else:
            etag = self._upload(key, Path(source), create_only=True)
        if etag is not None:
            return etag
        # taken: by an earlier try of ours whose answer was lost, or by the next owner's seal
        full = self._key(key)
        try:
            head = self._call("head", key, lambda: self._bucket.head_object(full))
        except StorageNotFoundError:
            return None
        crc = oss2.utils.Crc64()
        if isinstance(source, bytes):
            crc.update(source)
        ours = crc.crc if isinstance(source, bytes) else _file_crc(Path(source))
        return str(head.etag) if head.server_crc is not None and int(head.server_crc) == ours else None

    def copy_if(self, src: str, dst: str, token: str, size: int) -> bool:
        """``x-oss-copy-source-if-match``: the store refuses the copy once ``src`` was overwritten."""
        full_src, full_dst = self._key(src), self._key(dst)
        cond = {"x-oss-copy-source-if-match": token}

        def copy() -> bool:
            try:
                if size <= COPY_LIMIT:
                    self._bucket.copy_object(self.bucket_name, full_src, full_dst, headers=cond)
                else:  # parts: each part copy is conditioned, the completion cannot be
                    upload_id = self._bucket.init_multipart_upload(full_dst).upload_id
                    parts = []
                    for n, start in enumerate(range(0, size, COPY_PART), start=1):
                        end = min(start + COPY_PART, size) - 1
                        result = self._bucket.upload_part_copy(
                            self.bucket_name, full_src, (start, end), full_dst, upload_id, n, headers=cond
                        )
                        parts.append(oss2.models.PartInfo(n, result.etag))
                    self._bucket.complete_multipart_upload(full_dst, upload_id, parts)
            except oss_exc.ServerError as exc:
                if exc.status in (404, 412) and exc.code != "NoSuchBucket":
                    return False
                raise
            return True

        return self._call("copy", dst, copy)

    def _drop_checkpoint(self, store: oss2.ResumableStore, full: str, path: Path) -> None:
        store_key = store.make_store_key(self._bucket.bucket_name, full, os.path.abspath(path))
        record = store.get(store_key)
        with contextlib.suppress(FileNotFoundError):  # a small file goes up in one request: no checkpoint
            store.delete(store_key)
        if record and record.get("upload_id"):
            with contextlib.suppress(oss_exc.OssError):  # best effort: a lifecycle rule cleans up the rest
                self._bucket.abort_multipart_upload(full, record["upload_id"])

    def download_file(self, key: str, path: Path) -> None:
        full = self._key(key)
        with atomic_target(Path(path)) as tmp:  # get_object_to_file checks the CRC64 of the whole object
            self._call("download", key, lambda: self._bucket.get_object_to_file(full, str(tmp)))

    def size(self, key: str) -> int:
        full = self._key(key)
        return int(self._call("size", key, lambda: self._bucket.head_object(full)).content_length)

    def exists(self, key: str) -> bool:
        full = self._key(key)
        return self._call("exists", key, lambda: self._bucket.object_exists(full))

    def list(self, prefix: str = "") -> list[str]:
        def run() -> list[str]:
            # max_retries=1: the iterator's own retry (no backoff) would multiply with ours.
            it = oss2.ObjectIteratorV2(
                self._bucket, prefix=self.prefix + prefix, max_keys=self.page_size, max_retries=1
            )
            return [obj.key[len(self.prefix) :] for obj in it]

        return sorted(self._call("list", prefix, run))

    def delete(self, key: str) -> None:
        full = self._key(key)
        self._call("delete", key, lambda: self._bucket.delete_object(full))
