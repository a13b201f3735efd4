"""A trial's metric lines: each validation point and the final score, in the form each engine reads.

Three metrics, all "higher is better": ``objective`` (the sweep's weighted sum, what the engine optimises),
``mean_aesthetic`` and ``consistency`` (the story's, as report.json has them). A validation point reports
them for its frames (``train.validation``); the final line reports the whole story's. A trial under the
quality gate reports its final ``objective`` as Katib's ``unavailable`` (and none to PAI): *failed-gate*,
not zero, so the engine never ranks it — and it exits 3, so the engine counts it failed.

- **Katib File collector, JSON** (``--metrics-file``, the default in ``render katib``): one JSON object per
  line, values as strings, with an RFC 3339 ``timestamp`` — exactly what Katib's
  ``file-metricscollector.go`` ``parseLogsInJsonFormat`` accepts (it skips non-string values).
- **Katib StdOut collector** (``--metrics-stdout``): ``<RFC 3339 time> objective=… mean_aesthetic=…`` on
  stdout, which Katib's default filter ``([\\w|-]+)\\s*=\\s*([+-]?\\d*(\\.\\d+)?([Ee][+-]?\\d+)?)`` reads.
  Log lines go to stderr as JSON (``"key": value``, never ``key=value``), so they never match it.
- **PAI AutoML json** (``--metrics-json URI``): one JSON object ``{"objective": …, "mean_aesthetic": …,
  "consistency": …, "step": …}`` rewritten at every point (the last one wins), in the trial's storage, which
  the experiment's ``metric_config`` (``metric_type: json``, ``final_mode: final``) names.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kolors_job.core.errors import ManifestError

log = logging.getLogger(__name__)

OBJECTIVE = "objective"
METRIC_NAMES = (OBJECTIVE, "mean_aesthetic", "consistency")
UNAVAILABLE = "unavailable"
"""Katib's ``consts.UnavailableMetricValue``: a metric that was not reported."""
DEFAULT_WEIGHTS = {"mean_aesthetic": 1.0}


def parse_weights(text: str | None) -> dict[str, float]:
    """``run --objective``: ``mean_aesthetic=1,consistency=2`` (or one metric name) → weights."""
    if not text:
        return dict(DEFAULT_WEIGHTS)
    weights: dict[str, float] = {}
    for part in text.split(","):
        name, sep, raw = part.strip().partition("=")
        if name not in ("mean_aesthetic", "consistency"):
            raise ManifestError(f"--objective {text!r}: {name!r} is not a metric (mean_aesthetic, consistency)")
        try:
            weights[name] = float(raw) if sep else 1.0
        except ValueError:
            raise ManifestError(f"--objective {text!r}: {raw!r} is not a number") from None
    if not any(weights.values()) or any(not math.isfinite(w) for w in weights.values()):
        raise ManifestError(f"--objective {text!r}: at least one finite, non-zero weight")
    return weights


def objective(weights: Mapping[str, float], metrics: Mapping[str, Any]) -> float | None:
    """The weighted sum; None when a weighted metric is missing or not finite (then nothing is reported)."""
    total = 0.0
    for name, weight in weights.items():
        value = metrics.get(name)
        if not weight:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        total += weight * float(value)
    return total


def rfc3339(t: float | None = None) -> str:
    """UTC time with microseconds, as Go's ``time.RFC3339Nano`` parses it."""
    t = time.time() if t is None else t
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1e6):06d}Z"


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}  # fmt: skip


@dataclass
class TrialMetrics:
    """Writes one trial's metric lines to every sink it was given (a job observer: ``validation_point``)."""

    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    katib_file: Path | None = None
    katib_stdout: bool = False
    pai_json: str | None = None
    out: IO[str] | None = None
    lines: list[dict[str, Any]] = field(default_factory=list)

    def validation_point(self, point: Mapping[str, Any]) -> None:
        """A checkpoint's validation: ``step``, ``mean_aesthetic``, ``consistency``."""
        metrics = _numbers({k: point.get(k) for k in ("mean_aesthetic", "consistency")})
        self._emit(metrics, step=point.get("step"), passed=None)

    def final(self, score: Mapping[str, Any] | None, *, step: Any = None) -> None:
        """The story's score (report.json's ``score``); ``passed: false`` makes the objective unavailable."""
        if not score:
            return
        metrics = _numbers({"mean_aesthetic": score.get("mean"), "consistency": score.get("consistency")})
        self._emit(metrics, step=step, passed=score.get("passed") is not False, final=True)

    def _emit(self, metrics: dict[str, float], *, step: Any, passed: bool | None, final: bool = False) -> None:
        value = objective(self.weights, metrics)
        if value is not None and passed is not False:
            metrics = {OBJECTIVE: value, **metrics}
        record = {"step": step, "final": final, "gate_failed": passed is False, **metrics}
        self.lines.append(record)
        try:
            if self.katib_file is not None:
                self._katib_json(metrics, step=step, gate_failed=passed is False)
            if self.katib_stdout:
                self._katib_text(metrics)
            if self.pai_json:
                self._pai(metrics, step=step, gate_failed=passed is False)
        except OSError as e:  # a metrics sink must never fail the job it measures
            log.warning("could not write the trial's metrics: %s", e)

    def _katib_json(self, metrics: dict[str, float], *, step: Any, gate_failed: bool) -> None:
        line: dict[str, str] = {"timestamp": rfc3339()}
        if step is not None:
            line["step"] = str(step)
        line.update({k: repr(v) for k, v in metrics.items()})
        if gate_failed:
            line[OBJECTIVE] = UNAVAILABLE
        assert self.katib_file is not None
        self.katib_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.katib_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")

    def _katib_text(self, metrics: dict[str, float]) -> None:
        if not metrics:
            return
        out = self.out or sys.stdout
        out.write(rfc3339() + " " + " ".join(f"{k}={v!r}" for k, v in metrics.items()) + "\n")
        out.flush()

    def _pai(self, metrics: dict[str, float], *, step: Any, gate_failed: bool) -> None:
        from kolors_job.storage import open_store

        assert self.pai_json is not None
        parent, _, name = self.pai_json.rstrip("/").rpartition("/")
        doc: dict[str, Any] = {**metrics, "step": step}
        if gate_failed:
            doc["quality_gate"] = "failed"
        try:
            open_store(parent).write_bytes(name, json.dumps(doc, ensure_ascii=False).encode())
        except Exception as e:  # storage errors are JobErrors: reported, never fatal here
            log.warning("could not write %s: %s", name, e)
