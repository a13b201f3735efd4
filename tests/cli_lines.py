"""Reading what ``kolors-job`` printed: off a terminal its stderr is JSON lines (every line, the last one too)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import termios
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def json_record(line: str | bytes) -> dict[str, Any] | None:
    """A log line's JSON record, or None for a line that is not one (text mode, a library's print)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def json_records(lines: Iterable[str | bytes]) -> list[dict[str, Any]]:
    """The JSON records among ``lines``, in order."""
    return [r for r in map(json_record, lines) if r is not None]


def messages(stderr: str) -> list[str]:
    """Each stderr line's message: a JSON line's ``msg``, a plain (text-mode) line as it is."""
    out = []
    for line in stderr.strip().splitlines():
        record = json_record(line)
        out.append(str(record.get("msg", "")) if record is not None else line)
    return out


def last_message(stderr: str) -> str:
    """The last line's message: the CLI's ``error: …`` (or success) line, in either log format."""
    lines = messages(stderr)
    return lines[-1] if lines else ""


def run_on_terminal(argv: list[str], env: dict[str, str], cwd: str | Path) -> tuple[int, str]:
    """Run ``argv`` with stdout and stderr on a pseudo-terminal of 40x160 (a real window, not 0x0), as a person
    at a shell sees it; its exit code and the whole screen."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal)
    os.close(terminal)
    chunks = []
    while True:
        try:
            data = os.read(controller, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    rc = proc.wait(timeout=600)
    os.close(controller)
    return rc, b"".join(chunks).decode(errors="replace")
