"""``s3://bucket/prefix`` stores via boto3 (AWS, or MinIO/R2/OSS-S3/radosgw through a custom endpoint).

Credentials come only from boto3's default chain (env, profile, IRSA web identity, instance role);
with none at all requests go unsigned (public buckets). Retries are botocore's "standard" mode.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import logging
import re
import time
from collections.abc import Callable
from contextlib import closing, suppress
from pathlib import Path
from typing import TypeVar

import urllib3
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.exceptions import BotoCoreError, ClientError, IncompleteReadError, ResponseStreamingError
from s3transfer.exceptions import RetriesExceededError
from s3transfer.utils import ChunksizeAdjuster

from kolors_job.core.errors import StorageDeniedError, StorageError, StorageNotFoundError, StorageTemporaryError
from kolors_job.core.settings import Settings

from .. import base
from ..atomic import atomic_target
from ..base import Store, backoff_sleep, check_key, check_new_request, child_prefix, redact
from .client import create_only_hook, make_client

log = logging.getLogger(__name__)
T = TypeVar("T")
MiB = 1024 * 1024

DENIED_CODES = base.DENIED_CODES | {
    "AllAccessDisabled", "AccountProblem", "InvalidToken", "ExpiredToken", "InvalidSecurity",
}  # fmt: skip
TEMPORARY_CODES = base.TEMPORARY_CODES | {
    "ThrottlingException", "BadDigest", "XAmzContentSHA256Mismatch", "ConditionalRequestConflict", "OperationAborted",
}  # fmt: skip


def _md5(data: bytes = b""):
    """MD5 as S3 uses it: an integrity checksum (ETag, Content-MD5), not security."""
    return hashlib.md5(data, usedforsecurity=False)


_RETRY_HERE = (
    ResponseStreamingError,
    IncompleteReadError,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    ConnectionError,
)
"""Failures while a response body is read: botocore's retries end when the headers arrive."""


class _ChecksumMismatchError(StorageTemporaryError):
    """Data that does not match its ETag/MD5: corrupted in transit, worth another try."""

_MD5_ETAG = re.compile(r'^"?([0-9a-f]{32})(?:-(\d+))?"?$')






def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


COPY_LIMIT = 5 * 1024 * MiB
"""The largest object one CopyObject copies; larger ones are copied in parts."""


class _Exists(Exception):  # noqa: N818 - a signal, not an error: a create-only request found the key
    """A create-only request found the key taken (HTTP 412)."""




def file_etag(path: Path, size: int, threshold: int, chunk: int) -> str:
    """The ETag S3 computes for this file as s3transfer uploads it: MD5, or MD5 of part MD5s + '-N'."""
    with open(path, "rb") as f:
        if size < threshold:
            md5 = _md5()
            while block := f.read(8 * MiB):
                md5.update(block)
            return md5.hexdigest()
        chunk = ChunksizeAdjuster().adjust_chunksize(chunk, size)
        digests = []
        while part := f.read(chunk):
            digests.append(_md5(part).digest())
    return f"{_md5(b''.join(digests)).hexdigest()}-{len(digests)}"


def _plain_md5_etag(response: dict) -> str | None:
    """The MD5 an ETag stands for, if it is one (not multipart, not SSE-KMS/SSE-C)."""
    if response.get("ServerSideEncryption", "").startswith("aws:kms") or response.get("SSECustomerAlgorithm"):
        return None
    m = _MD5_ETAG.match(response.get("ETag", ""))
    return m.group(1) if m and not m.group(2) else None


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str, settings: Settings, client=None) -> None:
        self.bucket, self.prefix, self.settings = bucket, prefix, settings
        self.uri = f"s3://{bucket}/{prefix}"
        self._client = client if client is not None else make_client(settings)
        if not hasattr(self._client, "_kolors_create_only"):  # a client made elsewhere: the fence needs the hook
            self._client._kolors_create_only = create_only_hook(self._client)
        self._bucket_ok = False

    def child(self, *parts: str) -> S3Store:
        sub = child_prefix(*parts)
        return S3Store(
            self.bucket, self.prefix + sub + "/" if sub else self.prefix, self.settings, self._client
        )

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    # -- errors ---------------------------------------------------------------------------------
    def _check_bucket(self) -> None:
        """A HEAD 404 has no body: tell a missing bucket (denied) from a missing key (not found)."""
        if self._bucket_ok:
            return
        try:
            self._client.head_bucket(Bucket=self.bucket)
            self._bucket_ok = True
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                raise StorageDeniedError(
                    f"{self.uri}: bucket {self.bucket!r} does not exist (NoSuchBucket)"
                ) from None
        except BotoCoreError:
            pass

    def _error(self, exc: Exception, what: str, key: str) -> StorageError:
        where = f"{what} {self.uri}{key}"
        if isinstance(exc, RetriesExceededError):
            exc = exc.last_exception
        if isinstance(exc, ClientError):
            err, meta = exc.response.get("Error", {}), exc.response.get("ResponseMetadata", {})
            status = meta.get("HTTPStatusCode", 0)
            code = str(err.get("Code") or status)
            rid = meta.get("RequestId", "")
            msg = f"{where}: {code} (HTTP {status}{', request id ' + rid if rid else ''})"
            not_found = code == "NoSuchKey" or (status == 404 and code in ("404", "NotFound"))
            if not_found:
                self._check_bucket()  # a missing bucket is denied, not not-found
            return base.classify(
                msg, code, status, not_found=not_found, denied_codes=DENIED_CODES, temporary_codes=TEMPORARY_CODES
            )
        # Connection refused/reset, timeouts, truncated bodies: botocore already retried them.
        # Their text can hold the endpoint URL, so it is redacted.
        return StorageTemporaryError(f"{where}: {type(exc).__name__}: {redact(str(exc))}")

    def _call(self, what: str, key: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` (SDK calls) and map its errors; retry what botocore's own retries miss.

        botocore retries a request that fails to send or gets a 5xx, but not a response body cut
        off while it is read (a reset or truncated GET body, or an *error* body cut short: that
        one even escapes as a raw urllib3 error), nor data that fails its checksum. Those are
        retried here with jittered backoff, within the same ``storage_max_attempts`` budget and the
        ``storage_deadline_s`` of the whole operation, and never once the job is stopping.
        """
        where = f"{what} {self.uri}{key}"
        started = time.monotonic()
        attempts = max(1, self.settings.storage_max_attempts)
        for attempt in range(1, attempts + 1):
            check_new_request(where)
            try:
                return fn()
            except StorageTemporaryError:  # our botocore hook refused a retry, or a checksum mismatch
                if attempt == attempts or self._gives_up(where, started):
                    base.note_failure()
                    raise
            except (*_RETRY_HERE, RetriesExceededError) as exc:
                if attempt == attempts or self._gives_up(where, started):
                    base.note_failure()
                    raise self._error(exc, what, key) from None
            except (ClientError, BotoCoreError) as exc:
                err = self._error(exc, what, key)  # no chained SDK text in tracebacks
                if isinstance(err, StorageTemporaryError):
                    base.note_failure()
                raise err from None
            log.debug("%s: retry %d/%d", where, attempt, attempts - 1)
            base.RETRIES.add()
            backoff_sleep(base.backoff_delay(attempt, 0.05, 2.0))
        raise AssertionError("unreachable")

    def _gives_up(self, where: str, started: float) -> bool:
        refused = base.retry_refused(where, started, self.settings.storage_deadline_s)
        if refused is not None:
            log.debug("%s", refused)
        return refused is not None

    def _verify(self, what: str, key: str, expected: str, actual: str) -> None:
        if expected.strip('"') != actual.strip('"'):
            raise _ChecksumMismatchError(
                f"{what} {self.uri}{key}: checksum mismatch (expected ETag {expected}, server has {actual})"
            )

    # -- objects --------------------------------------------------------------------------------
    def read_bytes(self, key: str) -> bytes:
        def get() -> bytes:
            resp = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            with closing(resp["Body"]) as body:
                data = body.read()
            if (md5 := _plain_md5_etag(resp)) is not None:
                self._verify("read", key, md5, _md5(data).hexdigest())
            return data

        return self._call("read", key, get)

    def write_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Content-MD5 lets the server reject a corrupted body; ``if_absent`` is If-None-Match: *."""
        return self._put(key, data, if_absent=if_absent) is not None

    def _put(self, key: str, data: bytes, *, if_absent: bool) -> str | None:
        """The new object's ETag; None when ``if_absent`` found the key taken."""
        md5 = _md5(data)
        extra = {"IfNoneMatch": "*"} if if_absent else {}

        def put() -> str | None:
            try:
                resp = self._client.put_object(
                    Bucket=self.bucket,
                    Key=self._key(key),
                    Body=data,
                    ContentMD5=base64.b64encode(md5.digest()).decode(),
                    **extra,
                )
            except ClientError as exc:
                if if_absent and _status(exc) == 412:
                    return None
                raise
            if (etag := _plain_md5_etag(resp)) is not None:
                self._verify("write", key, md5.hexdigest(), etag)
            return resp.get("ETag") or f'"{md5.hexdigest()}"'

        return self._call("write", key, put)

    def _transfer_config(self) -> TransferConfig:
        return TransferConfig(
            multipart_threshold=self.settings.multipart_threshold_mb * MiB,
            multipart_chunksize=self.settings.multipart_chunk_mb * MiB,
            num_download_attempts=1,  # body-read failures are retried by _call, within its deadline
        )

    def upload_file(self, key: str, path: Path) -> None:
        """Multipart above the threshold; s3transfer aborts the multipart upload if any part fails.

        Afterwards the object's ETag is checked against the one computed locally (MD5, or MD5 of
        part MD5s) when the server reports that form, which catches corruption moto/S3 let through.
        """
        self._upload(key, Path(path))

    def _upload(self, key: str, path: Path) -> str:
        """Upload and verify; the object's ETag. Raises _Exists when a create-only upload found the key."""
        full = self._key(key)
        cfg = self._transfer_config()

        def upload() -> str:
            try:
                with create_transfer_manager(self._client, cfg) as manager:
                    manager.upload(str(path), self.bucket, full).result()
            except ClientError as exc:
                if _status(exc) == 412:
                    raise _Exists from None
                raise
            head = self._client.head_object(Bucket=self.bucket, Key=full)
            m = _MD5_ETAG.match(head.get("ETag", ""))
            sse = head.get("ServerSideEncryption", "").startswith("aws:kms") or head.get("SSECustomerAlgorithm")
            if m and not sse:
                expected = file_etag(path, path.stat().st_size, cfg.multipart_threshold, cfg.multipart_chunksize)
                if m.group(2) is None or expected.endswith(f"-{m.group(2)}"):
                    self._verify("upload", key, expected, head["ETag"])
            return str(head.get("ETag", ""))

        return self._call("upload", key, upload)

    # -- fencing primitives (storage/fence.py) --------------------------------------------------
    def put_new(self, key: str, source: bytes | Path) -> str | None:
        if isinstance(source, bytes):
            if (etag := self._put(key, source, if_absent=True)) is not None:
                return etag
            expected = _md5(source).hexdigest()
        else:
            path, full = Path(source), self._key(key)
            create_only: set[str] = self._client._kolors_create_only  # type: ignore[attr-defined]
            create_only.add(full)
            try:
                return self._upload(key, path)
            except _Exists:
                pass
            finally:
                create_only.discard(full)
            cfg = self._transfer_config()
            expected = file_etag(path, path.stat().st_size, cfg.multipart_threshold, cfg.multipart_chunksize)
        try:  # taken: by an earlier try of ours whose answer was lost, or by the next owner's seal
            head = self._call("head", key, lambda: self._client.head_object(Bucket=self.bucket, Key=self._key(key)))
        except StorageNotFoundError:
            return None
        etag = str(head.get("ETag", ""))
        return etag if etag.strip('"') == expected else None

    def copy_if(self, src: str, dst: str, token: str, size: int) -> bool:
        """``x-amz-copy-source-if-match``: the store refuses the copy once ``src`` was overwritten."""
        source = {"Bucket": self.bucket, "Key": self._key(src)}
        full = self._key(dst)

        def copy() -> bool:
            try:
                if size <= COPY_LIMIT:
                    self._client.copy_object(Bucket=self.bucket, Key=full, CopySource=source, CopySourceIfMatch=token)
                else:  # parts: each part copy is conditioned, the completion cannot be
                    with create_transfer_manager(self._client, self._transfer_config()) as manager:
                        manager.copy(source, self.bucket, full, extra_args={"CopySourceIfMatch": token}).result()
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if _status(exc) == 412 or code in ("PreconditionFailed", "NoSuchKey"):
                    return False
                raise
            return True

        return self._call("copy", dst, copy)

    def delete_if(self, key: str, token: str) -> None:
        """``If-Match`` on DELETE (S3 since 2025): a stage object someone else has overwritten stays."""
        full = self._key(key)

        def delete() -> None:
            try:
                self._client.delete_object(Bucket=self.bucket, Key=full, IfMatch=token)
            except ClientError as exc:
                if _status(exc) in (404, 412):
                    return
                if _status(exc) == 501:  # a server without conditional deletes
                    self._client.delete_object(Bucket=self.bucket, Key=full)
                    return
                raise

        self._call("delete", key, delete)

    def download_file(self, key: str, path: Path) -> None:
        full = self._key(key)

        def download() -> None:
            with atomic_target(Path(path)) as tmp:
                with create_transfer_manager(self._client, self._transfer_config()) as m:
                    head = self._client.head_object(Bucket=self.bucket, Key=full)
                    m.download(self.bucket, full, str(tmp)).result()
                if (md5 := _plain_md5_etag(head)) is not None:
                    digest = _md5()
                    with open(tmp, "rb") as f:
                        while block := f.read(8 * MiB):
                            digest.update(block)
                    self._verify("download", key, md5, digest.hexdigest())

        self._call("download", key, download)

    def size(self, key: str) -> int:
        full = self._key(key)
        head = self._call("size", key, lambda: self._client.head_object(Bucket=self.bucket, Key=full))
        return int(head["ContentLength"])

    def exists(self, key: str) -> bool:
        full = self._key(key)
        try:
            self._call("exists", key, lambda: self._client.head_object(Bucket=self.bucket, Key=full))
            return True
        except StorageNotFoundError:
            return False

    def list(self, prefix: str = "") -> list[str]:
        def run() -> list[str]:
            keys = []
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix, PaginationConfig={"PageSize": self.page_size}
            )
            for page in pages:
                keys.extend(obj["Key"][len(self.prefix) :] for obj in page.get("Contents", ()))
            return keys

        return sorted(self._call("list", prefix, run))

    def delete(self, key: str) -> None:
        full = self._key(key)
        with suppress(StorageNotFoundError):
            self._call("delete", key, lambda: self._client.delete_object(Bucket=self.bucket, Key=full))
