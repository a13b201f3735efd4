"""Structured logging: JSON lines for machines (not a TTY), readable lines for people (a TTY).

Every record passes through :func:`kolors_job.redact.scrub`, so a credential that reaches a log
call — ours or an SDK's — is masked before it is written anywhere.

Foreign noise (Python warnings from torch/pynvml/diffusers, the warnings libraries such as bitsandbytes
log about optional kernels) is demoted to DEBUG: it is in the log at ``KOLORS_JOB_LOG_LEVEL=DEBUG``
and off the first screen otherwise. Text lines round floats to 4 significant digits; JSON keeps them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, TextIO

from kolors_job.redact import scrub

DEMOTED_LOGGERS = ("py.warnings", "bitsandbytes", "diffusers", "transformers", "diffsynth", "modelscope", "torch",
                   "accelerate", "peft")  # fmt: skip
"""Loggers whose warnings are another library's business (not the job's): DEBUG, not WARNING."""

_STD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STD_ATTRS and not k.startswith("_")}


def _rank() -> int | None:
    """The DDP rank (torchrun's env) when there are several: their log lines interleave in one pod log."""
    world, rank = os.environ.get("WORLD_SIZE", ""), os.environ.get("RANK", "")
    return int(rank) if world.isdigit() and int(world) > 1 and rank.isdigit() else None


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if (rank := _rank()) is not None:
            entry["rank"] = rank
        entry.update(_extras(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return scrub(json.dumps(entry, ensure_ascii=False, default=str))


def _short(value: Any) -> Any:
    """4 significant digits for a person (``loss=0.1235``, ``lr=0.0001``); JSON logs keep every digit."""
    return f"{value:.4g}" if isinstance(value, float) else value


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%H:%M:%S", time.localtime(record.created))
        extras = " ".join(f"{k}={_short(v)}" for k, v in _extras(record).items())
        rank = _rank()
        where = record.name.removeprefix("kolors_job.") + (f"[{rank}]" if rank is not None else "")
        line = f"{ts} {record.levelname[0]} {where}: {record.getMessage()}"
        if extras:
            line += f"  [{extras}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return scrub(line)


class DemoteForeignWarnings(logging.Filter):
    """Other libraries' warnings as DEBUG records: shown only when the job logs at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        foreign = any(record.name == n or record.name.startswith(n + ".") for n in DEMOTED_LOGGERS)
        if record.levelno >= logging.ERROR or not foreign:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger("kolors_job").isEnabledFor(logging.DEBUG)


class _TqdmStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes through ``tqdm.write`` so a log line on a TTY does not tear an active progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def setup_logging(fmt: str = "auto", level: str = "INFO", stream: TextIO | None = None) -> None:
    """Configure the root logger once; ``fmt`` is ``auto`` (JSON unless on a TTY), ``json`` or ``text``."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "text" if stream.isatty() else "json"
    handler = (_TqdmStreamHandler if fmt == "text" and stream.isatty() else logging.StreamHandler)(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(DemoteForeignWarnings())
    logging.captureWarnings(True)  # warnings.warn from any library -> the "py.warnings" logger -> demoted
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_kolors_job", False):
            root.removeHandler(h)
    handler._kolors_job = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("kolors_job").setLevel(level.upper())
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "oss2", "modelscope", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def progress_enabled(stream: TextIO | None = None) -> bool:
    """Progress bars only on a TTY: in a pod's log they are noise; per-step log lines carry the numbers."""
    return (stream or sys.stderr).isatty()
