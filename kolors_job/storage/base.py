"""The storage interface every backend implements, plus the helpers they share.

Keys are '/'-separated and relative to the store root. Backends implement the object primitives;
text helpers, directory transfers and key safety live here once, so every backend behaves the same.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import random
import re
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

from kolors_job.core.errors import (
    ExitCode,
    StorageDeniedError,
    StorageError,
    StorageNotFoundError,
    StorageTemporaryError,
)
from kolors_job.core.redact import scrub
from kolors_job.core.stop import STOP

if TYPE_CHECKING:

    from kolors_job.core.settings import Settings


COMPLETION_MARKERS = frozenset({"COMPLETE", "_SUCCESS"})
"""File names whose presence says "every other file here is complete": uploaded last."""

_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")


def redact(text: str) -> str:
    """Hide ``user:password@`` in any URL inside ``text`` (endpoints may embed keys), and the values of
    secret environment variables: SDK error texts go through here before any log, error or file."""
    return scrub(_USERINFO.sub(r"\g<scheme>***@", text))


def check_new_request(where: str) -> None:
    """Refuse to start a request when the job is stopping and storage has already failed it."""
    if STOP.failed_while_stopping.is_set():
        raise StorageTemporaryError(f"{where}: not tried: the job is stopping and storage is failing")


def check_retry(where: str, started: float, deadline_s: float) -> None:
    """Raise StorageTemporaryError instead of retrying when the job stops or the deadline has passed."""
    if STOP.stopping.is_set():
        STOP.failed_while_stopping.set()
        raise StorageTemporaryError(f"{where}: failed and not retried: the job is stopping")
    if time.monotonic() - started >= deadline_s:
        raise StorageTemporaryError(f"{where}: no success within the {deadline_s:.0f}s storage deadline")


def retry_refused(where: str, started: float, deadline_s: float) -> StorageTemporaryError | None:
    """:func:`check_retry` as a value: why the failed request must not be retried, or None."""
    try:
        check_retry(where, started, deadline_s)
    except StorageTemporaryError as refused:
        return refused
    return None


def backoff_delay(attempt: int, base_s: float, cap_s: float) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0, min(cap_s, base_s * 2**attempt))


class RetryCount:
    """Storage requests retried by this process (throttling, 5xx, resets, cut bodies): report.json says how many."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def add(self, n: int = 1) -> None:
        with self._lock:
            self.value += n


RETRIES = RetryCount()


DENIED_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket", "InvalidBucketName"}
)
"""Error codes S3 and OSS share that no retry can fix (credentials or bucket wrong); backends add their own."""
TEMPORARY_CODES = frozenset(
    {"SlowDown", "Throttling", "RequestTimeout", "InternalError", "ServiceUnavailable", "RequestTimeTooSkewed"}
)
"""Error codes S3 and OSS share that a retry may fix (each backend adds its own)."""


def is_temporary(code: str, status: int, temporary_codes: frozenset[str]) -> bool:
    """A server answer worth retrying: a 5xx, 429 or one of the service's transient codes."""
    return code in temporary_codes or status >= 500 or status == 429


def classify(
    msg: str, code: str, status: int, *, not_found: bool, denied_codes: frozenset[str],
    temporary_codes: frozenset[str],
) -> StorageError:
    """The error a failed object-store request maps to (its exit code says whether a rerun can help):
    not found (4), denied (5: code or HTTP 401/403), temporary (75), else a plain StorageError."""
    if not_found:
        return StorageNotFoundError(msg)
    if code in denied_codes or status in (401, 403):
        return StorageDeniedError(msg)
    if is_temporary(code, status, temporary_codes):
        return StorageTemporaryError(msg)
    return StorageError(msg)


def note_failure() -> None:
    """A request failed for good: when the job is stopping, do not start new ones."""
    if STOP.stopping.is_set():
        STOP.failed_while_stopping.set()


def backoff_sleep(seconds: float) -> None:
    """Sleep before a retry, waking at once on SIGTERM (the retry is then refused)."""
    STOP.stopping.wait(seconds)


def join_key(*parts: str) -> str:
    """Join key parts with single '/' separators (no leading or trailing '/')."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def check_key(key: str) -> str:
    """Refuse keys that are empty or could be read as a different path; returns the key."""
    if not key or key.endswith("/"):
        raise StorageError(f"invalid storage key {key!r}: empty or ends with '/'")
    unsafe_relative_path(key)
    return key


def unsafe_relative_path(rel: str) -> None:
    """Raise StorageError unless ``rel`` is a plain relative path that stays inside its directory.

    Remote keys are attacker-controllable strings: ``../x``, ``/etc/x``, ``a\\..\\x`` (Windows
    separators), NUL bytes or a drive letter would let a download write outside its target.
    """
    parts = rel.split("/")
    bad = (
        not rel
        or "\x00" in rel
        or "\\" in rel
        or rel.startswith("/")
        or re.match(r"^[a-zA-Z]:", rel) is not None
        or any(p in ("", ".", "..") for p in parts)
    )
    if bad:
        # exit 4 (invalid input): a hostile listing or a bad job id, not a bug of ours
        raise StorageError(
            f"refusing unsafe storage key {rel!r}: it would escape the target directory",
            exit_code=ExitCode.INVALID_INPUT,
        )


def child_prefix(*parts: str) -> str:
    """``join_key(*parts)``, refused unless it is a plain relative path (``""`` for no parts).

    A job id like ``../other`` or ``.`` must not turn ``<output>/<job id>/`` into a sibling or
    the output root itself (where ``--force`` would delete every other job's files).
    """
    sub = join_key(*parts)
    if sub:
        unsafe_relative_path(sub)
    return sub


def quiet_sdk_loggers(*names: str) -> None:
    """Raise SDK loggers to WARNING: at DEBUG they print signed headers and security tokens,
    and oss2 logs full error details (AccessKeyId, StringToSign) at INFO."""
    for name in names:
        logger = logging.getLogger(name)
        if logger.level < logging.WARNING:
            logger.setLevel(logging.WARNING)


class Store(ABC):
    """A directory-like view of a local dir or a bucket prefix."""

    uri: str
    page_size: int = 1000
    """Objects per listing request (tests lower it to exercise paging)."""

    @classmethod
    def open(cls, bucket: str, prefix: str, settings: Settings) -> Store:
        """The store for ``<scheme>://<bucket>/<prefix>`` (what ``open_store`` calls once per URI)."""
        return cls(bucket, prefix, settings)  # type: ignore[call-arg]

    def __repr__(self) -> str:  # only the uri: never endpoints with userinfo or credentials
        return f"{type(self).__name__}({self.uri!r})"

    @abstractmethod
    def child(self, *parts: str) -> Store:
        """A store rooted at a sub-prefix, sharing this store's client/connection pool."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def write_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Write an object; with ``if_absent`` only create it, returning False if it already existed."""

    @abstractmethod
    def upload_file(self, key: str, path: Path) -> None: ...

    @abstractmethod
    def download_file(self, key: str, path: Path) -> None: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int:
        """The object's size in bytes (a HEAD): check a size limit before reading anything."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """All keys starting with ``prefix`` (recursive), relative to the store root, sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete an object; a missing one is not an error."""

    def local_path(self) -> Path | None:
        return None

    # -- fencing (storage/fence.py builds a claim's fence from these three) -----------------------------
    # The defaults below are built from the methods above: right for a single process, but checked by
    # us, not by the store. A backend whose service has conditional copies overrides all three.

    def put_new(self, key: str, source: bytes | Path) -> str | None:
        """Create ``key`` only if it does not exist; return a token naming this version of it (an ETag), or
        None when the key exists with other content (the same content: an earlier try of ours, whose answer
        was lost, so its token is returned)."""
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        token = hashlib.sha256(data).hexdigest()
        if self.write_bytes(key, data, if_absent=True):
            return token
        try:
            return token if hashlib.sha256(self.read_bytes(key)).hexdigest() == token else None
        except StorageNotFoundError:
            return None

    def copy_if(self, src: str, dst: str, token: str, size: int) -> bool:
        """Copy ``src`` to ``dst`` only if ``src`` is still the version ``token`` names; False if not (or gone)."""
        try:
            data = self.read_bytes(src)
        except StorageNotFoundError:
            return False
        if hashlib.sha256(data).hexdigest() != token:
            return False
        self.write_bytes(dst, data)
        return True

    def delete_if(self, key: str, token: str) -> None:
        """Delete ``key`` if it is still the version ``token`` names (where the store can check that)."""
        self.delete(key)

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def write_text(self, key: str, text: str, *, if_absent: bool = False) -> bool:
        return self.write_bytes(key, text.encode("utf-8"), if_absent=if_absent)

    def upload_dir(self, local_dir: Path, prefix: str = "") -> list[str]:
        """Upload every file under ``local_dir`` to ``prefix``; returns the keys written, sorted.

        Completion markers (``COMPLETE``, ``_SUCCESS``) go last, whatever their sort order (an
        uppercase ``COMPLETE`` sorts first): a reader that sees the marker — e.g. a resume looking
        for ``checkpoints/step-N/COMPLETE`` after the job was killed mid-upload — sees every file.
        """
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise StorageError(f"upload_dir: {local_dir} is not a directory")
        keys = []
        files = sorted(p for p in local_dir.rglob("*") if p.is_file())
        for path in sorted(files, key=lambda p: p.name in COMPLETION_MARKERS):  # stable: markers last
            key = join_key(prefix, path.relative_to(local_dir).as_posix())
            self.upload_file(key, path)
            keys.append(key)
        return sorted(keys)

    def download_dir(
        self, prefix: str, local_dir: Path, *, skipped: dict[str, list[str]] | None = None
    ) -> list[Path]:
        """Download every object under the directory ``prefix`` into ``local_dir``.

        All keys are checked before anything is written, so a hostile listing writes nothing. With
        ``skipped`` (a dataset: one odd key must not fail the rest), keys no local filesystem can hold
        are left out and recorded there by reason instead: ``unsafe_key`` (``..``, empty or ``.``
        segments), ``key_conflict`` (``x.png`` beside ``x.png/y.png``: one name cannot be a file and a
        directory) and ``name_too_long`` (a segment over 255 bytes).
        """
        local_dir = Path(local_dir)
        dir_prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        pairs = []
        rels = []
        for key in self.list(dir_prefix):
            rel = key[len(dir_prefix) :]
            if rel == "" or (rel.endswith("/") and not rel.startswith("/")):
                # a "folder" marker (consoles create ``a/b/`` objects): nothing to write, but its
                # path must be as safe as any file's
                if rel:
                    self._check_rel(rel.rstrip("/"), skipped)
                continue
            if self._check_rel(rel, skipped):
                rels.append((key, rel))
        dirs = {posixpath.dirname(rel) for _, rel in rels}
        parents = {"/".join(d.split("/")[: i + 1]) for d in dirs if d for i in range(d.count("/") + 1)}
        for key, rel in rels:
            if rel in parents:  # a file named like a directory of other files
                if skipped is None:
                    raise StorageError(
                        f"{self.uri}{key}: both a file and a directory of other files", exit_code=ExitCode.INVALID_INPUT
                    )
                skipped.setdefault("key_conflict", []).append(rel)
                continue
            pairs.append((key, local_dir.joinpath(*rel.split("/"))))
        for key, path in pairs:
            self.download_file(key, path)
        return [path for _, path in pairs]

    @staticmethod
    def _check_rel(rel: str, skipped: dict[str, list[str]] | None) -> bool:
        """Whether ``rel`` can be written below a local directory; else raise, or record it and say no."""
        try:
            unsafe_relative_path(rel)
        except StorageError:
            if skipped is None:
                raise
            skipped.setdefault("unsafe_key", []).append(rel)
            return False
        if any(len(part.encode()) > 255 for part in rel.split("/")):
            if skipped is None:
                raise StorageError(f"storage key {rel[:80]!r}…: a path segment is over 255 bytes",
                                   exit_code=ExitCode.INVALID_INPUT)
            skipped.setdefault("name_too_long", []).append(rel)
            return False
        return True
