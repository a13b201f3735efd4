"""An exclusive, leased claim on a job's output prefix, so two runs never write into one prefix.

Checking ``manifest.resolved.yaml`` and writing it later is a check-then-act race: two runs that start
together both pass the check. The claim closes it with the stores' conditional create (S3
``If-None-Match: *``, OSS ``x-oss-forbid-overwrite``, a hard link / ``O_EXCL`` locally), which exactly
one of several writers wins.

Claims are numbered generations ``_claim/00000001.json``, ``00000002.json`` …; the highest one is the
current claim. Each holds its owner id, the manifest digest and a heartbeat (wall-clock seconds) the
owner rewrites every quarter of the lease. A run takes generation N+1 only when generation N is
*released* (its run ended) or its lease has *expired* (no heartbeat for ``lease_s``: the run was killed
or preempted), so a live run is never joined and a preempted one is resumed by its rerun. Two runs
that both see N expire race for N+1, and the conditional create lets only one of them have it.
Generations are never reused (old ones stay, a few hundred bytes each), so a slow run that decides on
N+1 late finds it taken. Wall clocks of different machines must agree to well within the lease.

A run whose heartbeat finds a higher generation, or that could not renew its lease before it expired,
has lost the claim: it stops like on SIGTERM (exit 75). A heartbeat is only a check made earlier,
though, and a run paused past its lease (SIGSTOP, a frozen VM) wakes up believing it owns the prefix.
So every write and delete of the holder, its heartbeats included, goes through the generation's
*fence* (``kolors_job.storage.fence``: the store itself refuses them), and a run taking generation
N+1 *seals* generation N's fence before it creates N+1: from then on nothing of N's owner lands, and
that owner stops at its next write with ClaimLostError (exit 75).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from kolors_job.core.errors import (
    ClaimLostError,
    ExitCode,
    JobError,
    JobInterruptedError,
    OutputConflictError,
    StorageNotFoundError,
)
from kolors_job.storage import Store
from kolors_job.storage.fence import Fence, FencedStore, open_fence, seal_fence

log = logging.getLogger(__name__)

CLAIM_DIR = "_claim"
_RECORD = re.compile(r"(\d+)\.json")
"""``_claim/<generation>.json``; a generation's fence stage lives beside it in ``<generation>.stage/``."""


def new_owner_id() -> str:
    """Unique per process and run: host, pid and a random part (pids repeat across pods)."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(4)}"


@dataclass
class ClaimRecord:
    owner: str
    digest: str
    heartbeat: float
    """``time.time()`` of the owner's last renewal."""
    lease_s: float
    started: float
    released: bool = False

    def live(self, now: float) -> bool:
        return not self.released and now < self.heartbeat + self.lease_s


class ClaimHeldError(JobError):
    """The same manifest's live run kept the prefix for the whole wait: rerun later."""

    exit_code = ExitCode.TEMPORARY


class OutputClaim:
    """Take, keep (heartbeat thread) and release the claim on one output prefix."""

    def __init__(
        self,
        store: Store,
        digest: str,
        *,
        lease_s: float,
        wait_s: float,
        should_stop: Callable[[], bool] = lambda: False,
        on_lost: Callable[[str], None] = lambda reason: None,
        owner: str | None = None,
    ) -> None:
        self.store, self.digest, self.lease_s, self.wait_s = store, digest, lease_s, wait_s
        self.owner = owner or new_owner_id()
        self.should_stop, self.on_lost = should_stop, on_lost
        self.generation: int | None = None
        self.fence: Fence | None = None
        self.fenced: FencedStore | None = None
        """The prefix as the holder writes it: every write and delete through the fence."""
        self.lost = threading.Event()
        self._stop_heartbeat = threading.Event()
        self._thread: threading.Thread | None = None
        self._record: ClaimRecord | None = None

    # -- keys -----------------------------------------------------------------------------------
    @staticmethod
    def _key(generation: int) -> str:
        return f"{CLAIM_DIR}/{generation:08d}.json"

    @staticmethod
    def stage(generation: int) -> str:
        """Where generation ``generation``'s fence stages its writes (see kolors_job.storage.fence)."""
        return f"{CLAIM_DIR}/{generation:08d}.stage"

    def _generations(self) -> list[int]:
        gens = []
        for key in self.store.list(f"{CLAIM_DIR}/"):
            if m := _RECORD.fullmatch(key[len(CLAIM_DIR) + 1 :]):
                gens.append(int(m.group(1)))
        return sorted(gens)

    def _read(self, generation: int) -> ClaimRecord | None:
        try:
            doc = json.loads(self.store.read_bytes(self._key(generation)))
            return ClaimRecord(**{k: doc[k] for k in ClaimRecord.__dataclass_fields__ if k in doc})
        except StorageNotFoundError:  # removed by hand between our listing and this read
            return None
        except (ValueError, TypeError, KeyError):  # not a claim record (hand-written?): nothing it could hold
            return None

    def _write(self, generation: int, record: ClaimRecord, *, create: bool) -> bool:
        """Create a record (plain store: the race for a generation), or rewrite ours (through the fence)."""
        data = json.dumps(asdict(record), indent=2).encode()
        if not create and self.fence is not None and generation == self.generation:
            self.fence.put(self._key(generation), data, lane="claim")
            return True
        return self.store.write_bytes(self._key(generation), data, if_absent=create)

    # -- acquire --------------------------------------------------------------------------------
    def acquire(self, poll_s: float | None = None) -> None:
        """Take the claim, waiting for a live run of the same manifest; raise for anything else.

        Raises OutputConflictError (exit 6) when a live run of another manifest holds the prefix,
        ClaimHeldError (exit 75) when one of this manifest still holds it after ``wait_s``, and
        JobInterruptedError (75) on SIGTERM while waiting.
        """
        poll_s = poll_s if poll_s is not None else max(0.2, min(5.0, self.lease_s / 4))
        give_up = time.monotonic() + self.wait_s
        said_waiting = False
        while True:
            if self.should_stop():
                raise JobInterruptedError("interrupted while waiting for the output claim; rerun to resume")
            gens = self._generations()
            top = gens[-1] if gens else 0
            if top:
                current = self._read(top)
                now = time.time()
                if current is not None and current.live(now):
                    if current.digest != self.digest:
                        raise OutputConflictError(
                            f"{self.store.uri}: a live run of a different manifest (owner {current.owner}, "
                            f"heartbeat {now - current.heartbeat:.0f}s ago) holds this prefix; use a new job "
                            "id (--job-id or metadata.name)"
                        )
                    if time.monotonic() >= give_up:
                        raise ClaimHeldError(
                            f"{self.store.uri}: still held by a live run of this manifest (owner "
                            f"{current.owner}) after waiting {self.wait_s:.0f}s; rerun later"
                        )
                    if not said_waiting:
                        log.info(
                            "output claimed by a live run of this manifest (owner %s): waiting up to %.0fs "
                            "for it to end", current.owner, self.wait_s,
                        )
                        said_waiting = True
                    time.sleep(poll_s)
                    continue
            if top:  # seal the ended generation first: whatever its owner still tries is refused by the store
                seal_fence(self.store, self.stage(top), self.owner)
            now = time.time()
            record = ClaimRecord(self.owner, self.digest, now, self.lease_s, now)
            if self._write(top + 1, record, create=True):
                if max(self._generations(), default=0) == top + 1:
                    self.generation, self._record = top + 1, record
                    self.fence = open_fence(self.store, self.stage(top + 1), self._fenced)
                    self.fenced = FencedStore(self.store, self.fence)
                    if top:
                        log.info("took over the output claim (generation %d, the previous one ended)", top)
                    return
                # someone took a higher generation between our create and our look: theirs wins
                self._write(top + 1, ClaimRecord(**{**asdict(record), "released": True}), create=False)

    # -- keep -----------------------------------------------------------------------------------
    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._heartbeat, name="output-claim-heartbeat", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        assert self.generation is not None and self._record is not None
        last_ok = time.monotonic()
        while not self._stop_heartbeat.wait(self.lease_s / 4):
            try:
                if max(self._generations(), default=0) > self.generation:
                    return self._lose("another run took over the output prefix")
                self._record.heartbeat = time.time()
                self._write(self.generation, self._record, create=False)
                last_ok = time.monotonic()
            except ClaimLostError:  # the store refused the renewal: sealed by the run that took over
                return None
            except Exception as e:  # storage trouble: keep trying until the lease would be gone
                log.warning("could not renew the output claim: %s", e)
                if time.monotonic() - last_ok >= self.lease_s:
                    return self._lose("could not renew the output claim before its lease expired")
        return None

    def _lose(self, reason: str) -> None:
        """The heartbeat saw the claim gone: stop (the fence refuses whatever is written meanwhile)."""
        if not self.lost.is_set():
            log.warning("%s: stopping at the next step boundary (exit 75)", reason)
            self.lost.set()
            self.on_lost(reason)

    def _fenced(self, reason: str) -> None:
        """The store refused a write: the ClaimLostError raised with ``reason`` is the one line that says so."""
        if not self.lost.is_set():
            self.lost.set()
            self.on_lost(reason)

    # -- release --------------------------------------------------------------------------------
    def release(self) -> None:
        """Mark the claim released (best effort): the next run takes over at once, not after the lease."""
        self._stop_heartbeat.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.generation is None or self._record is None or self.lost.is_set():
            return
        self._record.released = True
        try:
            self._write(self.generation, self._record, create=False)
            if self.fence is not None:
                self.fence.close()
        except ClaimLostError:
            pass  # taken over since our last write: nothing of ours to release
        except Exception as e:  # the lease then expires on its own
            log.warning("could not release the output claim (it expires in %.0fs): %s", self.lease_s, e)
        self.generation = None
