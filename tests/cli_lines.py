"""Reading what ``kolors-job`` printed: off a terminal its stderr is JSON lines (every line, the last one too)."""

from __future__ import annotations

import json


def messages(stderr: str) -> list[str]:
    """Each stderr line's message: a JSON line's ``msg``, a plain (text-mode) line as it is."""
    out = []
    for line in stderr.strip().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        out.append(str(record.get("msg", "")) if isinstance(record, dict) else line)
    return out


def last_message(stderr: str) -> str:
    """The last line's message: the CLI's ``error: …`` (or success) line, in either log format."""
    lines = messages(stderr)
    return lines[-1] if lines else ""
