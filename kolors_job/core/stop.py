"""Stopping on request: SIGTERM/SIGINT set a flag that long stages poll at step boundaries.

Training checkpoints and returns, the story stops after the current frame, and the job exits 75
(temporary) so a rerun resumes. Storage retries stop too: a dying pod must not spend its grace
period on backoff.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from kolors_job.storage import base as storage_base

log = logging.getLogger("kolors_job.runner")


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
        storage_base.request_stop()  # failed storage requests are no longer retried

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        storage_base.clear_stop()
