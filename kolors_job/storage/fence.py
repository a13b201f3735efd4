"""Fenced writes: every write and delete under a job's prefix lands only while its claim generation is current.

A claim (``kolors_job.job.claim``) is a lease: a run paused past it (SIGSTOP, a frozen VM, a long GC) wakes up
believing it still owns the prefix, and any check it made before the pause is stale. So the check must be
made by the store, in the request that writes. Object stores cannot condition a write of one key on
another key, so each write goes through a per-generation *stage* the next owner can spoil:

* **S3, OSS** (:class:`ObjectFence`): the data is first created at the next key of the stage,
  ``_claim/<generation>.stage/<lane>/<seq>``, create-only (``If-None-Match: *`` / ``x-oss-forbid-overwrite``),
  then published with a server-side copy conditioned on that stage object's ETag
  (``x-amz-copy-source-if-match`` / ``x-oss-copy-source-if-match``). A run taking the claim over
  *seals* the previous generation first: it overwrites every stage object with a tombstone (their ETags
  change, so a copy still pending fails) and creates the next stage key of each lane itself (so the old
  owner's next create fails). Whatever the old owner does after that, the store refuses it.
* **Local directories** (:class:`DirFence`): the data is written into ``_claim/<generation>.stage/`` and
  renamed into place; a delete renames the file into the stage. Sealing renames the stage directory away
  and leaves a plain file at its name, so every later rename out of (or into) it fails in the kernel.

A delete on S3/OSS cannot be conditioned on another key: each is preceded by a store-checked no-op (the
creation of the next stage key), so only a pause of the one request between the two can slip through.
Stage objects are removed once copied (S3: ``If-Match``, so never a tombstone), keeping the newest as
the mark the next owner seals after. A backend without server-side conditional copies inherits
:class:`Store`'s check-then-copy defaults, which are correct for one process but not store-checked.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from kolors_job.core.errors import ClaimLostError, StorageError

from .atomic import TMP_MARKER, file_mode
from .base import Store, check_key, child_prefix, join_key
from .local import LocalStore, mapped, os_error

log = logging.getLogger(__name__)

Source = bytes | Path
"""What a fenced write publishes: bytes, or a local file (uploaded in parts when large)."""


class Fence(Protocol):
    """Writes and deletes that land only while the fence's generation is the prefix's current claim."""

    def put(self, key: str, source: Source, lane: str = "data") -> None:
        """Publish ``source`` at ``key``; ``lane`` ``claim`` is for the claim's own record."""

    def delete(self, key: str) -> None: ...

    def check(self) -> None:
        """A store-checked no-op: raises ClaimLostError once the generation is sealed."""

    def close(self) -> None:
        """The run released its claim: remove what the stage still holds (best effort)."""


def _tombstone(owner: str) -> bytes:
    """Unique bytes (so a unique ETag) saying who sealed the stage."""
    return json.dumps({"sealed_by": owner, "at": time.time(), "nonce": secrets.token_hex(8)}).encode()


class _Lost:
    """A fence's lost state: the first refusal is the one reported; later writes fail without a request."""

    def __init__(self, on_lost: Callable[[str], None]) -> None:
        self.on_lost, self.reason = on_lost, ""

    def check(self) -> None:
        if self.reason:
            raise ClaimLostError(self.reason)

    def lose(self, what: str) -> None:
        if not self.reason:
            self.reason = (
                f"lost the output claim: another run took the prefix over, so the store refused {what}; "
                "nothing more is written by this run"
            )
            self.on_lost(self.reason)
        raise ClaimLostError(self.reason)


# ---------------------------------------------------------------------------------------- object stores


LANES = ("claim", "data")
"""A generation's stage keys are ``<lane>/<seq>``: the claim's own record (heartbeats) and everything else
each keep their own strictly sequential numbers, so a large upload never holds up a heartbeat, and a seal
knows every key the old owner could create next (the next number of each lane)."""


def _is_tombstone(data: bytes) -> bool:
    return data.startswith(b'{"sealed_by"')


class _Lane:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.next = 1
        self.live: dict[int, str] = {}  # stage objects still there: seq -> ETag
        self.done: set[int] = set()  # ... of which the copy is over (removable, but for the newest)


class ObjectFence:
    """Stage-then-conditional-copy over a store's ``put_new`` / ``copy_if`` / ``delete_if`` primitives.

    Stage keys of a lane are created one at a time and without gaps (a failed create is tried again under
    the same number), so once a seal holds the number after the newest stage key of each lane, the old
    owner can create none."""

    def __init__(self, store: Store, stage: str, on_lost: Callable[[str], None]) -> None:
        self.store, self.stage = store, stage.rstrip("/") + "/"
        self._lost = _Lost(on_lost)
        self._lanes = {name: _Lane() for name in LANES}

    def _key(self, lane: str, seq: int) -> str:
        return f"{self.stage}{lane}/{seq:08d}"

    def _stage(self, lane: str, source: Source, what: str) -> tuple[int, str]:
        state = self._lanes[lane]
        with state.lock:
            while True:
                self._lost.check()
                seq = state.next
                token = self.store.put_new(self._key(lane, seq), source)
                if token is not None:
                    break
                if self._sealed_at(lane, seq):  # the next owner created this key first
                    self._lost.lose(what)
                state.next = seq + 1  # a leftover of ours (a try whose answer was lost): burn the number
            state.next = seq + 1
            state.live[seq] = token
        return seq, token

    def _sealed_at(self, lane: str, seq: int) -> bool:
        """Whether the stage key that exists is a seal's tombstone (else: a try of ours, with other data)."""
        key = self._key(lane, seq)
        try:
            return self.store.size(key) <= 4096 and _is_tombstone(self.store.read_bytes(key))
        except StorageError:
            return True  # cannot tell: stop rather than write

    def put(self, key: str, source: Source, lane: str = "data") -> None:
        seq, token = self._stage(lane, source, f"the write of {key}")
        try:
            size = len(source) if isinstance(source, bytes) else source.stat().st_size
            if not self.store.copy_if(self._key(lane, seq), key, token, size):
                self._lost.lose(f"the write of {key}")
        finally:
            self._finish(lane, seq)

    def check(self) -> None:
        seq, _ = self._stage("data", b"", "a claim check")
        self._finish("data", seq)

    def delete(self, key: str) -> None:
        self.check()
        self.store.delete(key)

    def _finish(self, lane: str, seq: int) -> None:
        """Remove stage objects whose copy is over, but for the newest one (the mark a seal continues after)."""
        state = self._lanes[lane]
        with state.lock:
            state.done.add(seq)
            newest = max(state.live, default=0)
            victims = [(s, state.live.pop(s)) for s in sorted(state.done) if s < newest and s in state.live]
            state.done -= {s for s, _ in victims}
        if self._lost.reason:
            return
        for s, token in victims:
            try:
                self.store.delete_if(self._key(lane, s), token)
            except StorageError as e:  # a leftover stage object costs bytes, not correctness
                log.debug("could not remove stage object %s: %s", self._key(lane, s), e)

    def close(self) -> None:
        if self._lost.reason:
            return
        for lane, state in self._lanes.items():
            with state.lock:
                victims, state.live = list(state.live.items()), {}
            for s, token in victims:
                with contextlib.suppress(StorageError):
                    self.store.delete_if(self._key(lane, s), token)

    @classmethod
    def seal(cls, store: Store, stage: str, owner: str) -> None:
        """Make every later write of ``stage``'s owner fail at the store (see the module docstring)."""
        stage = stage.rstrip("/") + "/"
        tomb = _tombstone(owner)
        newest: dict[str, int] = dict.fromkeys(LANES, 0)
        for key in store.list(stage):
            lane, _, num = key[len(stage) :].partition("/")
            if not num.isdigit():
                continue
            store.write_bytes(key, tomb)  # spoil its ETag: a copy still pending from it fails
            newest[lane] = max(newest.get(lane, 0), int(num))
        for lane, seq in newest.items():  # hold the next number of every lane
            seq += 1
            while store.put_new(f"{stage}{lane}/{seq:08d}", tomb) is None:  # the old owner made it meanwhile
                store.write_bytes(f"{stage}{lane}/{seq:08d}", tomb)
                seq += 1


# ---------------------------------------------------------------------------------------- local directories


def _gone(exc: OSError) -> bool:
    return exc.errno in (errno.ENOENT, errno.ENOTDIR)


class DirFence:
    """Write into the generation's stage directory, then rename into place (see the module docstring)."""

    def __init__(self, store: LocalStore, stage: str, on_lost: Callable[[str], None]) -> None:
        self.store = store
        self.dir = store.root.joinpath(*stage.strip("/").split("/"))
        self._lost = _Lost(on_lost)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _sealed(self) -> bool:
        """A seal leaves a plain file where the stage directory was (a vanished volume leaves nothing)."""
        return self.dir.is_file() or self.dir.is_symlink()

    def put(self, key: str, source: Source, lane: str = "data") -> None:
        self._lost.check()
        final = self.store.path_of(key)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{final.name[:60]}{TMP_MARKER}", dir=self.dir)
        except OSError as e:
            if _gone(e) and self._sealed():
                self._lost.lose(f"the write of {key}")
            raise os_error(e, f"write {self.store.uri}{key}") from None
        try:
            with mapped(f"write {self.store.uri}{key}"):
                with os.fdopen(fd, "wb") as f:
                    if isinstance(source, bytes):
                        f.write(source)
                    else:
                        with open(source, "rb") as src:
                            shutil.copyfileobj(src, f, 8 << 20)
                    # by descriptor: a seal may take the stage away from under a paused run at any
                    # moment, and only the rename below may be the place where that shows
                    os.fchmod(f.fileno(), file_mode())
                final.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.rename(tmp, final)  # the gate: fails once the stage directory is sealed
                except OSError as e:
                    if _gone(e) and not os.path.lexists(tmp):
                        if self._sealed():
                            self._lost.lose(f"the write of {key}")
                        raise os_error(e, f"write {self.store.uri}{key}") from None
                    raise
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def delete(self, key: str) -> None:
        self._lost.check()
        path = self.store.path_of(key)
        trash = self.dir / f".deleted{TMP_MARKER}{uuid.uuid4().hex}"
        with mapped(f"delete {self.store.uri}{key}"):
            try:
                os.rename(path, trash)  # the gate: into the stage, which a seal has taken away
            except IsADirectoryError:
                raise StorageError(f"cannot delete {self.store.uri}{key}: it is a directory") from None
            except OSError as e:
                if _gone(e) and self._sealed():
                    self._lost.lose(f"the delete of {key}")
                if _gone(e) and self.dir.is_dir():
                    return  # nothing there to delete
                raise os_error(e, f"delete {self.store.uri}{key}") from None
            os.unlink(trash)
        self.store.remove_empty_parents(path)

    def check(self) -> None:
        self._lost.check()
        if self._sealed():
            self._lost.lose("a claim check")
        if not self.dir.is_dir():
            raise StorageError(f"{self.store.uri}: the claim's stage directory {self.dir.name} is gone")

    def close(self) -> None:
        if not self._lost.reason and self.dir.is_dir() and not self.dir.is_symlink():
            shutil.rmtree(self.dir, ignore_errors=True)

    @classmethod
    def seal(cls, store: LocalStore, stage: str, owner: str) -> None:
        path = store.root.joinpath(*stage.strip("/").split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        aside = path.with_name(f"{path.name}.sealed-{uuid.uuid4().hex[:12]}")
        if path.is_dir() and not path.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                os.rename(path, aside)  # the old owner's pending renames now find no source
        with contextlib.suppress(FileExistsError), open(path, "xb") as f:  # and it can never make it again
            f.write(_tombstone(owner))
        shutil.rmtree(aside, ignore_errors=True)


# ---------------------------------------------------------------------------------------- the store view


def open_fence(store: Store, stage: str, on_lost: Callable[[str], None]) -> Fence:
    """The fence of the claim generation whose stage is ``stage`` (a key prefix under ``store``): a stage
    directory and renames on a local disk, the store's conditional requests (``Store.put_new``, ``copy_if``,
    ``delete_if``) on an object store."""
    if isinstance(store, LocalStore):
        return DirFence(store, stage, on_lost)
    return ObjectFence(store, stage, on_lost)


def seal_fence(store: Store, stage: str, owner: str) -> None:
    """Make every later fenced write of ``stage``'s generation fail (a takeover does this first)."""
    if isinstance(store, LocalStore):
        DirFence.seal(store, stage, owner)
    else:
        ObjectFence.seal(store, stage, owner)


class FencedStore(Store):
    """The output prefix as its claim holder sees it: reads go straight to the store, every write and
    delete goes through the fence (so a run that lost its claim publishes nothing)."""

    def __init__(self, inner: Store, fence: Fence, sub: str = "") -> None:
        self.inner, self.fence, self.sub = inner, fence, sub
        self.uri = inner.uri

    def _k(self, key: str) -> str:
        return join_key(self.sub, check_key(key))

    def child(self, *parts: str) -> FencedStore:
        sub = child_prefix(*parts)
        return FencedStore(self.inner.child(*parts), self.fence, join_key(self.sub, sub))

    def read_bytes(self, key: str) -> bytes:
        return self.inner.read_bytes(key)

    def write_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        if if_absent:
            raise StorageError("a fenced store has no create-only writes (claims are made on the plain store)")
        self.fence.put(self._k(key), bytes(data))
        return True

    def upload_file(self, key: str, path: Path) -> None:
        self.fence.put(self._k(key), Path(path))

    def download_file(self, key: str, path: Path) -> None:
        self.inner.download_file(key, path)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def size(self, key: str) -> int:
        return self.inner.size(key)

    def list(self, prefix: str = "") -> list[str]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.fence.delete(self._k(key))

    def local_path(self) -> Path | None:
        return self.inner.local_path()
