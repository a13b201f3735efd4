"""Stopping on request: SIGTERM/SIGINT set a flag that long stages poll at step boundaries.

Training checkpoints and returns, the story stops after the current frame, and the job exits 75
(temporary) so a rerun resumes. Storage retries stop too: a dying pod must not spend its grace
period on backoff (``STOP``, which the storage layer and the hub clients read).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


class _StopState:
    """Process-wide: the job is stopping (SIGTERM), and whether storage already failed since.

    Storage retries are what keep a stopping job alive on a dead endpoint (8 tries of a read timeout
    each), so once the job stops, failed requests are not retried; once one has failed, no new request
    is even tried: the job exits 75 within about one read timeout of the signal. A request that works
    still goes through, so a stop on a healthy store still uploads its checkpoint and status.
    """

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.failed_while_stopping = threading.Event()


STOP = _StopState()


def request_stop() -> None:
    """Called from the job's SIGTERM handler."""
    STOP.stopping.set()


def clear_stop() -> None:
    """The job is over (tests run several in one process)."""
    STOP.stopping.clear()
    STOP.failed_while_stopping.clear()


@dataclass
class StopFlag:
    """Set by SIGTERM/SIGINT; long stages poll it and stop at a step boundary after checkpointing."""

    event: threading.Event = field(default_factory=threading.Event)
    signal_name: str | None = None

    def __call__(self) -> bool:
        return self.event.is_set()


@contextmanager
def stop_on_signals(flag: StopFlag) -> Iterator[None]:
    """Route SIGTERM/SIGINT to ``flag`` for the block (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        flag.signal_name = signal.Signals(signum).name
        log.warning("received %s: finishing the current step, checkpointing, then exiting 75", flag.signal_name)
        flag.event.set()
        request_stop()  # failed storage requests are no longer retried

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        clear_stop()
