"""Structured logging: JSON lines for machines (not a TTY), readable lines for people (a TTY).

Every record passes through :func:`kolors_job.core.redact.scrub`, so a credential that reaches a log
call — ours or an SDK's — is masked before it is written anywhere.

Foreign noise (Python warnings from torch/pynvml/diffusers, the warnings libraries such as bitsandbytes
log about optional kernels) is demoted to DEBUG: it is in the log at ``KOLORS_JOB_LOG_LEVEL=DEBUG``
and off the first screen otherwise. Text lines round floats to 4 significant digits and leave out
fields that have no value; JSON keeps them.

In JSON mode every line on stderr is a JSON object, whoever wrote it. Several libraries log through a
handler of their own (modelscope, modelscope_hub, transformers, diffusers, huggingface_hub), print, or
draw progress bars; :class:`JsonStderr` stands in for ``sys.stderr``: a record another library's
``StreamHandler`` writes is taken over (that handler is removed and its logger propagates to ours from
then on), and any other line becomes a record of the ``stderr`` logger. Only writes to file descriptor 2
that bypass Python (a C library's own printing) are not seen.
"""

from __future__ import annotations

import atexit
import io
import json
import logging
import os
import re
import sys
import threading
import time
from types import FrameType
from typing import Any, TextIO

from kolors_job.core.redact import scrub

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


def _package(name: str) -> str:
    """A person's line names the stage's package (``train``, ``sources``, ``sample``); JSON keeps the module."""
    return name.removeprefix("kolors_job.").split(".")[0] if name.startswith("kolors_job.") else name


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%H:%M:%S", time.localtime(record.created))
        rank = _rank()
        extras = " ".join(f"{k}={_short(v)}" for k, v in _extras(record).items() if v is not None)
        where = _package(record.name) + (f"[{rank}]" if rank is not None else "")
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


_EMIT = logging.StreamHandler.emit.__code__
_ERRORISH = re.compile(r"^\s*(error|traceback|exception|fatal|critical)\b", re.I)


def _emitting(frame: FrameType | None) -> tuple[logging.Handler, logging.LogRecord] | None:
    """The handler and record of a ``StreamHandler.emit`` on the stack just above a stream write."""
    for _ in range(4):
        if frame is None:
            return None
        if frame.f_code is _EMIT:
            handler, record = frame.f_locals.get("self"), frame.f_locals.get("record")
            if isinstance(handler, logging.Handler) and isinstance(record, logging.LogRecord):
                return handler, record
            return None
        frame = frame.f_back
    return None


def _reaches_root(logger: logging.Logger) -> bool:
    """Whether a record handled at ``logger`` goes on up to the root logger (every logger on the way propagates)."""
    c: logging.Logger | None = logger
    while c is not None and c is not logging.root:
        if not c.propagate:
            return False
        c = c.parent
    return True


def _adopt(handler: logging.Handler, name: str) -> logging.Logger | None:
    """Detach another library's ``handler`` from the logger (``name`` or an ancestor) holding it and let that
    logger propagate: its records reach our handler from now on. Returns the logger, None if none holds it."""
    c: logging.Logger | None = logging.getLogger(name)
    while c is not None:
        if handler in c.handlers:
            c.removeHandler(handler)
            c.propagate = True
            return c
        c = c.parent
    return None


class JsonStderr(io.TextIOBase):
    """``sys.stderr`` in JSON mode: each line written to it leaves as one JSON object (see the module doc)."""

    def __init__(self, target: TextIO, handler: logging.Handler) -> None:
        super().__init__()
        self.target, self.handler = target, handler
        self._partial = ""
        self._lock = threading.RLock()

    def write(self, s: str) -> int:
        if found := _emitting(sys._getframe(1)):
            handler, record = found
            owner = _adopt(handler, record.name)
            # Adopted mid-emit: the record goes on up to root (and our handler) unless the way is blocked.
            if owner is None or not _reaches_root(owner):
                self.handler.handle(record)
            return len(s)
        with self._lock:
            text = self._partial + s
            lines = text.split("\n")
            self._partial = lines.pop()
            if "\r" in self._partial:  # a progress bar redrawing itself: only its last state matters
                self._partial = self._partial.rsplit("\r", 1)[-1]
            for line in lines:
                self._line(line)
        return len(s)

    def _line(self, line: str) -> None:
        text = line.rsplit("\r", 1)[-1].rstrip()
        if not text.strip():
            return
        if text.lstrip().startswith("{"):
            try:
                if isinstance(json.loads(text), dict):
                    self.target.write(scrub(text.strip()) + "\n")
                    return
            except ValueError:
                pass
        level = logging.ERROR if _ERRORISH.match(text) else logging.WARNING
        self.handler.handle(logging.LogRecord("stderr", level, "", 0, text, None, None))

    def flush(self) -> None:
        self.target.flush()  # a partial line (a progress bar mid-redraw) waits for its end

    def finish(self) -> None:
        """Emit a last line that never got its newline (at exit, or when the real stderr comes back)."""
        with self._lock:
            if self._partial.strip():
                self._line(self._partial)
            self._partial = ""
        self.target.flush()

    def fileno(self) -> int:
        return self.target.fileno()

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.target, "encoding", "utf-8")

    def __getattr__(self, name: str) -> Any:  # ``buffer``, ``reconfigure``…: the real stream's
        return getattr(self.target, name)


def restore_stderr() -> None:
    """Put the real ``sys.stderr`` back (flushing a last partial line), if JSON mode replaced it."""
    if isinstance(sys.stderr, JsonStderr):
        wrapper = sys.stderr
        wrapper.finish()
        sys.stderr = wrapper.target


def json_mode() -> bool:
    """Whether this process logs JSON lines to the real stderr (``setup_logging`` in JSON mode)."""
    return isinstance(sys.stderr, JsonStderr)


def say(line: str, level: int = logging.INFO, **fields: Any) -> None:
    """A CLI result line (``error: …``, ``succeeded: …``): a JSON record in JSON mode, the plain line otherwise."""
    if json_mode():
        logging.getLogger("kolors_job.cli").log(level, "%s", line, extra=fields)
    else:
        print(line, file=sys.stderr, flush=True)


def _adopt_existing(ours: logging.Handler) -> None:
    """Libraries imported before ``setup_logging`` already hold handlers on the real stderr: take them over."""
    streams = {id(sys.__stderr__), id(sys.stderr), id(sys.__stdout__), id(sys.stdout)}
    for logger in [logging.getLogger(n) for n in list(logging.Logger.manager.loggerDict)]:
        for h in list(getattr(logger, "handlers", [])):
            if h is not ours and type(h) is logging.StreamHandler and id(h.stream) in streams:
                logger.removeHandler(h)
                logger.propagate = True


def setup_logging(fmt: str = "auto", level: str = "INFO", stream: TextIO | None = None) -> None:
    """Configure the root logger once; ``fmt`` is ``auto`` (JSON unless on a TTY), ``json`` or ``text``.

    Without ``stream`` (the real stderr), JSON mode also puts :class:`JsonStderr` in ``sys.stderr``'s place.
    """
    restore_stderr()
    real_stderr = stream is None
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
    if fmt == "json" and real_stderr:
        _adopt_existing(handler)
        sys.stderr = JsonStderr(stream, handler)
        atexit.register(restore_stderr)


def progress_enabled(stream: TextIO | None = None) -> bool:
    """Progress bars only on a TTY: in a pod's log they are noise; per-step log lines carry the numbers."""
    return (stream or sys.stderr).isatty()
