"""A hub client's failure as the job's one line and exit code, and the retries a hub call gets.

Both clients raise many types (``modelscope_hub.errors``: ``AuthenticationError`` 401,
``PermissionDeniedError`` 403, ``NotExistError`` 404, ``RateLimitError`` 429, ``ServerError`` 5xx, and a
``FileDownloadError`` holding each failed file's error; ``huggingface_hub.errors``: ``GatedRepoError``,
``RepositoryNotFoundError``, ``HfHubHTTPError`` with the response; ``requests`` errors underneath, sometimes
wrapped in ``LocalEntryNotFoundError``). What decides the exit code is the HTTP status found anywhere in
the cause chain, else whether the hub stopped answering:

| status | exit | the line says |
|---|---|---|
| 401 | 5 | not signed in (or the repo is private): set the hub's token |
| 403 | 5 | gated or private: request access, or use a token that has it |
| 404 | 4 | no such repo, revision or file: check the id and revision |
| 429, 5xx | 75 | retried with backoff for the storage deadline, then: retry later |
| no answer, stall | 75 | rerun: the partial download is resumed |
| bytes that contradict the listing | 75 | retry later (the client already retried) |
| the cache's disk (full, read-only) | 75 / 5 | as for any local fault (``storage.local.os_error``) |

429 and 5xx are retried here, around the whole call (the clients retry some of them themselves, not all:
``huggingface_hub`` never retries a 429, nor any error of a listing), with jittered backoff until
``KOLORS_JOB_STORAGE_DEADLINE_S`` has passed or the job is told to stop. A stall is not retried again:
the client already spent its tries on it (see ``transport``); nor is a refused connection (a hub that is
down or a wrong endpoint fails at once, so a copy already in the cache can serve instead).
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

from kolors_job.core.errors import ExitCode, InputError, JobError, StorageDeniedError
from kolors_job.core.redact import one_line
from kolors_job.core.settings import Settings
from kolors_job.core.stop import STOP
from kolors_job.core.uris import HUBS
from kolors_job.storage.base import backoff_delay, backoff_sleep, retry_refused
from kolors_job.storage.local import os_error

if TYPE_CHECKING:
    from kolors_job.core.uris import HubRef

__all__ = ["IncompleteDownload", "call_hub", "http_status", "hub_error"]

log = logging.getLogger(__name__)

T = TypeVar("T")

BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 8.0



class IncompleteDownload(Exception):  # noqa: N818 - a condition, not a programming error
    """The client returned, but files are still missing: it swallowed an error (``huggingface_hub``'s
    ``snapshot_download`` returns the existing ``local_dir`` when the hub does not answer). Retried."""


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, its causes and contexts, and the per-file errors a ModelScope ``FileDownloadError`` holds."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
        todo += [c for c in (getattr(e, "failed_files", None) or {}).values() if isinstance(c, BaseException)]


def http_status(exc: BaseException) -> int | None:
    """The first HTTP error status in ``exc``'s causes (the clients keep it on the error or its response)."""
    for e in _causes(exc):
        for status in (getattr(e, "status_code", None), getattr(getattr(e, "response", None), "status_code", None)):
            if isinstance(status, int) and status >= 400:
                return status
    return None


def _named(exc: BaseException, *names: str) -> bool:
    return any(any(n in type(e).__name__ for n in names) for e in _causes(exc))


def _timed_out(exc: BaseException) -> bool:
    return any(isinstance(e, TimeoutError | socket.timeout) for e in _causes(exc)) or _named(
        exc, "Timeout", "TooSlow", "Deadline"
    )


def _refused(exc: BaseException) -> bool:
    """The hub's host did not take the connection (down, restarting): worth trying again."""
    return any(
        isinstance(e, ConnectionRefusedError) or (isinstance(e, OSError) and e.errno == errno.ECONNREFUSED)
        for e in _causes(exc)
    ) or _named(exc, "NewConnectionError")


LOCAL_ERRNOS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
    errno.ENAMETOOLONG, errno.EIO, errno.ESTALE,
})  # fmt: skip
"""Errors of the cache's file system (not of the network) while a client writes a download."""


def local_error(exc: BaseException, where: str) -> JobError | None:
    """A cache file-system fault among ``exc``'s causes as the storage layer words it (75 when it may pass:
    a full disk; else 5), or None."""
    for e in _causes(exc):
        if isinstance(e, OSError) and not isinstance(e, ConnectionError | TimeoutError) and e.errno in LOCAL_ERRNOS:
            return os_error(e, where)
    return None


def retryable(exc: BaseException) -> bool:
    """A 429 or 5xx, or a client that returned without every file. Not a refused connection (an endpoint
    that is down or wrong fails at once: a cached copy may serve offline), nor a stall (see the docstring)."""
    if any(isinstance(e, IncompleteDownload) for e in _causes(exc)):
        return True
    status = http_status(exc)
    return status is not None and (status == 429 or status >= 500)


def hub_error(ref: HubRef, exc: BaseException) -> JobError:
    """A hub client failure as one line naming the uri and what to do, with its exit code."""
    if isinstance(exc, JobError):
        return exc
    if (local := local_error(exc, f"the cache copy of {ref.uri!r}")) is not None:
        return local
    status = http_status(exc)
    hub, uri = ref.hub_name, ref.uri
    token = HUBS[ref.hub].token_env
    if status == 401 or (status is None and _named(exc, "Authentication")):
        if ref.hub == "hf" and _named(exc, "RepositoryNotFound"):
            return StorageDeniedError(
                f"{hub} refused {uri!r} (HTTP 401: no such repo, or it is private or gated and no valid token "
                f"was sent): check the id, or set {token} to a token that can read it"
            )
        return StorageDeniedError(
            f"{hub} refused {uri!r} (HTTP 401: not signed in): set {token} to a token that can read it"
        )
    if status == 403 or (status is None and _named(exc, "Gated", "PermissionDenied")):
        return StorageDeniedError(
            f"{hub} denied {uri!r} (HTTP 403: gated or private): request access on the hub, "
            f"or set {token} to a token that has it"
        )
    if status == 404 or (status is None and _named(exc, "NotExist", "NotFound")):
        return InputError(f"{hub} has no {uri!r} (HTTP 404): check the repo id, its revision and the file names")
    if status == 429:
        return JobError(f"{hub} kept rate-limiting {uri!r} (HTTP 429): retry later", exit_code=ExitCode.TEMPORARY)
    if status is not None and status >= 500:
        return JobError(f"{hub} kept failing for {uri!r} (HTTP {status}): retry later", exit_code=ExitCode.TEMPORARY)
    if any(isinstance(e, IncompleteDownload) for e in _causes(exc)):
        return JobError(f"{hub}: {exc}: retry later", exit_code=ExitCode.TEMPORARY)
    if _named(exc, "Integrity", "SizeMismatch") or any("Consistency check failed" in str(e) for e in _causes(exc)):
        return JobError(
            f"{hub} served bytes for {uri!r} that do not match its own listing (size or digest): retry later",
            exit_code=ExitCode.TEMPORARY,
        )
    if _timed_out(exc):
        return JobError(
            f"{hub} stopped sending {uri!r} ({one_line(exc)}): rerun to resume the download",
            exit_code=ExitCode.TEMPORARY,
        )
    if _refused(exc) or _named(exc, "ConnectionError", "ChunkedEncoding", "OfflineMode", "NetworkError") or getattr(
        exc, "retryable", False
    ):
        return JobError(
            f"{hub} unreachable for {uri!r} ({one_line(exc)}): retry later", exit_code=ExitCode.TEMPORARY
        )
    return JobError(f"{hub} request for {uri!r} failed ({type(exc).__name__}): {one_line(exc)}")


def call_hub(ref: HubRef, what: str, fn: Callable[[], T], settings: Settings) -> T:
    """``fn()``, retried on 429/5xx/refused connections with backoff until the storage deadline;
    any failure becomes :func:`hub_error`'s one line."""
    started = time.monotonic()
    attempt = 0
    while True:
        try:
            return fn()
        except JobError:
            raise
        except Exception as exc:  # the clients raise many types: classify by what a retry can fix
            err = hub_error(ref, exc)
            if not retryable(exc):
                raise err from exc
            if retry_refused(f"{ref.uri}: {what}", started, settings.storage_deadline_s) is not None:
                why = ("not retried: the job is stopping" if STOP.stopping.is_set()
                       else f"still failing after {time.monotonic() - started:.0f} s of retries")  # fmt: skip
                raise JobError(f"{err} ({why})", exit_code=err.exit_code) from exc
            delay = backoff_delay(attempt, BACKOFF_BASE_S, BACKOFF_CAP_S)
            log.warning("%s: %s failed (%s); retrying in %.1f s", ref.uri, what, err, delay)
            backoff_sleep(delay)
            attempt += 1
