"""Per-run scratch directories on the work volume: who owns each, and removing those whose owner is gone.

A run's scratch (``<work dir>/<job>/run-<pid>-…``, under DDP one ``ddp-…`` per torchrun group) is removed
when the run ends — but a SIGKILL, an OOM kill or a preempted spot node ends it without that, and a cache
volume that outlives its pods fills up. So each process that uses a scratch directory leaves an *owner
record* in it, and every run, as it starts, removes the scratch of owners that no longer exist:

* an owner on this machine (same host name, boot and PID namespace) is gone when its PID is, or now
  belongs to a process started at another time (PIDs are reused);
* an owner elsewhere (another pod or node sharing the volume: we cannot see its processes) renews its
  record every :data:`HEARTBEAT_S`; it is gone once the record is older than :data:`STALE_S`.

A directory with a live owner is never touched; one without any record (older versions) is removed
only when nothing in it changed for a day.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

OWNER_PREFIX = ".owner-"
HEARTBEAT_S = 60.0
STALE_S = 3600.0
"""An owner on another machine whose record is older than this is taken for gone (a stopped or
partitioned one that comes back later finds its scratch missing and fails; it resumes on rerun)."""
LEGACY_STALE_S = 24 * 3600.0
RUN_DIR_PREFIXES = ("run-", "ddp-")


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def _start_time(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot), None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22, counted after the parenthesised command name


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def identity(pid: int | None = None) -> dict[str, str | int]:
    """What names a process for as long as it lives: host, boot, PID namespace, PID and start time."""
    pid = pid or os.getpid()
    return {
        "host": socket.gethostname(),
        "boot": _boot_id(),
        "pidns": _pid_namespace(),
        "pid": pid,
        "start": _start_time(pid) or "",
    }


def owner_alive(record: dict, mtime: float, now: float | None = None) -> bool:
    """Whether the process an owner record names still exists (see the module docstring)."""
    here = identity()
    same_machine = all(record.get(k) == here[k] for k in ("host", "boot", "pidns")) and here["boot"]
    if not same_machine:
        if record.get("host") == here["host"] and record.get("boot") not in ("", here["boot"]) and here["boot"]:
            return False  # this machine, an earlier boot: every process of then is gone
        return (now or time.time()) - mtime < STALE_S
    pid = int(record.get("pid", 0))
    if pid <= 0 or not _pid_alive(pid):
        return False
    started = _start_time(pid)
    return started is None or started == "" or not record.get("start") or started == record["start"]


class ScratchOwner:
    """This process's owner record in a scratch directory, renewed by a daemon thread until :meth:`close`."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        me = identity()
        self.path = self.run_dir / f"{OWNER_PREFIX}{me['host']}-{me['pid']}.json"
        self.path.write_text(json.dumps(me) + "\n")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="scratch-owner", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def close(self) -> None:
        self._stop.set()


def sweep(work_root: Path, *, keep: Path | None = None) -> list[Path]:
    """Remove the scratch directories under ``work_root/<job>/`` whose owners are all gone; returns them.

    Safe to run from several processes at once: a directory is first renamed aside (only one rename wins),
    then deleted. ``keep`` (this run's own directory) is never looked at.
    """
    removed: list[Path] = []
    now = time.time()
    try:
        jobs = [p for p in Path(work_root).iterdir() if p.is_dir() and not p.is_symlink()]
    except OSError:
        return removed
    for job_dir in jobs:
        with contextlib.suppress(OSError):
            for run_dir in job_dir.iterdir():
                if not run_dir.name.startswith(RUN_DIR_PREFIXES) or run_dir == keep or run_dir.is_symlink():
                    continue
                if run_dir.is_dir() and not _in_use(run_dir, now):
                    aside = job_dir / f".swept-{uuid.uuid4().hex[:12]}"
                    try:
                        os.rename(run_dir, aside)
                    except OSError:
                        continue  # another run swept it first, or it is busy
                    shutil.rmtree(aside, ignore_errors=True)
                    removed.append(run_dir)
        with contextlib.suppress(OSError):
            job_dir.rmdir()  # empty now: no run of this job left anything
    if removed:
        log.info("removed the scratch of %d ended run(s)", len(removed), extra={"scratch": [str(p) for p in removed]})
    return removed


def _in_use(run_dir: Path, now: float) -> bool:
    owners = list(run_dir.glob(f"{OWNER_PREFIX}*.json"))
    if not owners:  # left by a version without owner records: removed once nothing changed for a day
        newest = max((p.stat().st_mtime for p in [run_dir, *run_dir.rglob("*")] if p.exists()), default=0.0)
        return now - newest < LEGACY_STALE_S
    for path in owners:
        try:
            record, mtime = json.loads(path.read_text()), path.stat().st_mtime
        except (OSError, ValueError):
            return True  # being written: assume alive
        if owner_alive(record, mtime, now):
            return True
    return False
