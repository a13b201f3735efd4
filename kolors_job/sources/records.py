"""A hub copy in the cache: complete only with its completion record, built by one job at a time.

Jobs on a shared cache volume (several pods on one node, a rerun beside a straggler) may want the same
copy at once. A copy directory has a lock file beside it: the job that holds it downloads, the others
wait for it (``flock``: the kernel drops the lock of a killed process, so a crash never blocks anyone),
then find the copy complete. The hub clients themselves write each file to a temporary name and rename it
into place once whole, so a file at its final name is never partial; what a killed download leaves (a
``*.incomplete`` file) is what the next attempt resumes.

The completion record (``.kolors_job_source.json``, written last) lists every file with the size and
digest the hub's listing gave and the file's size and mtime on disk when it was verified. A later job
reuses the copy without the hub's client only when the record matches the current listing file for file
and every file still has that size and mtime; anything else (no record, a record of another listing, a
file replaced since) goes through the client again and is verified again. Verification hashes the files
against the listing (sha256, or git's blob id for Hugging Face's small files): ``huggingface_hub`` only
checks sizes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kolors_job.core.errors import ExitCode, JobError
from kolors_job.core.stop import STOP
from kolors_job.storage.atomic import atomic_target

if TYPE_CHECKING:
    from .listing import RemoteFile

__all__ = [
    "RECORD_NAME", "discard", "exclusive", "identities", "partial_bytes", "read", "reusable", "verify", "write",
]

log = logging.getLogger(__name__)

RECORD_NAME = ".kolors_job_source.json"
"""Written last into a downloaded copy: the files it holds, as listed and as verified on disk."""

PARTIAL_SUFFIX = ".incomplete"
"""What both clients name a file while it downloads (``modelscope_hub``: ``<path>.incomplete``;
``huggingface_hub``: ``.cache/huggingface/download/<hash>.<etag>.incomplete``)."""

_HASH_CHUNK = 8 << 20


def listed(files: Iterable[RemoteFile]) -> dict[str, dict[str, Any]]:
    """What the listing says of each file: size and digest."""
    return {f.path: {"size": f.size, "sha256": f.sha256, "oid": f.oid} for f in files}


def write(dest: Path, files: Iterable[RemoteFile], meta: dict[str, Any]) -> None:
    """Record ``dest`` as complete: ``meta`` plus each file as listed and as it is on disk now."""
    entries = listed(files)
    for path, entry in entries.items():
        st = (dest / path).stat()
        entry["mtime_ns"] = st.st_mtime_ns
    with atomic_target(dest / RECORD_NAME) as tmp:
        tmp.write_text(json.dumps({**meta, "files": entries}, indent=1, sort_keys=True))


def read(dest: Path) -> dict[str, Any] | None:
    """The completion record, when every file it lists is still on disk at the size and mtime it recorded."""
    try:
        data = json.loads((dest / RECORD_NAME).read_text())
        entries = data["files"]
        for path, entry in entries.items():
            st = (dest / path).stat()
            if st.st_size != int(entry["size"]) or st.st_mtime_ns != int(entry["mtime_ns"]):
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return data if isinstance(data, dict) else None


def reusable(dest: Path, files: Iterable[RemoteFile]) -> dict[str, Any] | None:
    """The record, when it is complete (:func:`read`) and made for exactly this listing (paths, sizes, digests)."""
    data = read(dest)
    if data is None:
        return None
    recorded = {p: {k: e.get(k) for k in ("size", "sha256", "oid")} for p, e in data["files"].items()}
    return data if recorded == listed(files) else None


def discard(dest: Path) -> None:
    """From here on the copy is incomplete (the record is written again once it is whole)."""
    (dest / RECORD_NAME).unlink(missing_ok=True)


def identities(dest: Path, files: Iterable[RemoteFile]) -> dict[str, tuple[int, int, int]]:
    """(inode, size, mtime) of each file present: a file the client writes gets a new one (it renames a
    finished temporary file into place), one it keeps does not."""
    out = {}
    for f in files:
        with contextlib.suppress(OSError):
            st = (dest / f.path).stat()
            out[f.path] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def partial_bytes(dest: Path) -> int:
    """Bytes of partly downloaded files under ``dest``: what a resumed download does not fetch again."""
    total = 0
    if dest.is_dir():
        for p in dest.rglob(f"*{PARTIAL_SUFFIX}"):
            with contextlib.suppress(OSError):
                total += p.stat().st_size
    return total


def _digest(path: Path, *, git_blob: bool) -> str:
    """sha256 of the bytes, or git's blob id (what Hugging Face lists for files outside LFS)."""
    h = hashlib.sha1(usedforsecurity=False) if git_blob else hashlib.sha256()
    if git_blob:
        h.update(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as f:
        while block := f.read(_HASH_CHUNK):
            h.update(block)
    return h.hexdigest()


def verify(dest: Path, files: Iterable[RemoteFile]) -> list[str]:
    """The files that are missing, or whose size or digest differs from the listing."""
    bad = []
    for f in files:
        local = dest / f.path
        want, git_blob = (f.sha256, False) if f.sha256 else (f.oid, True)
        try:
            if local.stat().st_size != f.size or (want and _digest(local, git_blob=git_blob) != want.lower()):
                bad.append(f.path)
        except OSError:
            bad.append(f.path)
    return bad


def _lock_path(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.lock"


@contextlib.contextmanager
def exclusive(dest: Path, what: str, *, poll_s: float = 0.5) -> Iterator[None]:
    """Hold ``dest``'s lock for the block, waiting (and saying so once) while another job holds it.

    A job told to stop (SIGTERM) while waiting exits 75: the other job's download goes on, and the rerun
    finds it complete. A file system without ``flock`` (some FUSE mounts) cannot coordinate jobs: the block
    then runs unlocked, with a warning (each client still writes its files under temporary names).
    """
    path = _lock_path(dest)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        waited_since: float | None = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    log.warning("cannot lock %s (%s): downloading %s without coordinating with other jobs",
                                path, exc.strerror, what)  # fmt: skip
                    break
            if waited_since is None:
                waited_since = time.monotonic()
                holder = _holder(fd)
                log.info("waiting for another job (%s) downloading %s into this cache", holder or "?", what)
            if STOP.stopping.wait(poll_s):
                raise JobError(
                    f"stopped while another job downloads {what} into the cache: rerun to use its copy",
                    exit_code=ExitCode.TEMPORARY,
                )
        if waited_since is not None:
            log.info("the other job's download of %s ended after %.0f s", what, time.monotonic() - waited_since)
        with contextlib.suppress(OSError):  # who holds it, for the log of a job that waits
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError):
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    return ""
