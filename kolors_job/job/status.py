"""``status.json``: the job's progress as seen from outside (CI, ``kolors-job submit``, a person).

Rewritten whole on every change (objects stores have no append), throttled for per-step updates so
a 500-step run does not make 500 PUTs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from kolors_job.core.redact import scrub
from kolors_job.storage import Store

TERMINAL_STATES = ("succeeded", "failed", "interrupted", "skipped")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class StatusWriter:
    store: Store | None
    job_id: str
    manifest_digest: str
    min_interval_s: float = 10.0
    data: dict[str, Any] = field(default_factory=dict)
    _last_write: float = 0.0

    def __post_init__(self) -> None:
        self.data = {
            "job_id": self.job_id,
            "manifest_digest": self.manifest_digest,
            "state": "running",
            "stage": None,
            "step": None,
            "total": None,
            "started": _now(),
            "updated": _now(),
            "finished": None,
            "stages": {},
            "error": None,
            "exit_code": None,
        }

    def write(self, force: bool = True) -> None:
        if self.store is None:
            return
        now = time.monotonic()
        if not force and now - self._last_write < self.min_interval_s:
            return
        self._last_write = now
        self.data["updated"] = _now()
        self.store.write_bytes("status.json", json.dumps(self.data, ensure_ascii=False, indent=2).encode())

    def stage_started(self, name: str, total: int | None = None) -> None:
        self.data.update(stage=name, step=0 if total else None, total=total)
        self.data["stages"][name] = {"state": "running", "started": _now(), "finished": None, "seconds": None}
        self.write()

    def stage_finished(self, name: str, seconds: float, state: str = "succeeded") -> None:
        self.data["stages"][name].update(state=state, finished=_now(), seconds=round(seconds, 3))
        self.write()

    def progress(self, step: int, total: int | None = None, *, force: bool = False) -> None:
        self.data["step"] = step
        if total is not None:
            self.data["total"] = total
        self.write(force=force)

    def finish(self, state: str, exit_code: int, error: str | None = None) -> None:
        stage = self.data.get("stage")
        if stage and self.data["stages"].get(stage, {}).get("state") == "running":
            self.data["stages"][stage].update(state=state, finished=_now())
        self.data.update(state=state, exit_code=exit_code, error=scrub(error) if error else None, finished=_now())
        self.write()
