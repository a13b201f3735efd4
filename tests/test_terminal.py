"""The first screen a person sees: ``--help`` as prose, no foreign warnings, progress bars on a TTY.

The demo runs under a pseudo-terminal (what a person's shell gives it); off a TTY the same run logs
JSON lines, which the end-to-end tests read.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import warnings
from pathlib import Path

import pytest

from kolors_job.cli import build_parser, prose
from kolors_job.log import setup_logging

ROOT = Path(__file__).resolve().parents[1]
MARKUP = re.compile(r"``|:(mod|class|func|meth|attr):`")


def _help(*argv: str) -> str:
    buf = io.StringIO()
    with pytest.raises(SystemExit), contextlib.redirect_stdout(buf):
        build_parser().parse_args([*argv, "--help"])
    return buf.getvalue()


@pytest.mark.parametrize("argv", [(), ("submit",), ("render", "k8s"), ("run",), ("demo",), ("sample",)])
def test_help_is_prose_without_docstring_markup(argv: tuple[str, ...]) -> None:
    text = _help(*argv)
    assert text.startswith("usage: kolors-job") and not MARKUP.search(text), text
    assert prose("see :mod:`kolors_job.launch` and ``kolors-job run``") == "see kolors_job.launch and kolors-job run"


def _logger_run(level: str, fmt: str = "text") -> str:
    stream = io.StringIO()
    with warnings.catch_warnings():  # restores warnings.showwarning, which captureWarnings replaces
        warnings.simplefilter("always")
        logging.captureWarnings(False)  # an earlier test's capture outlives pytest's per-test showwarning
        setup_logging(fmt, level, stream=stream)
        try:
            warnings.warn_explicit("The pynvml package is deprecated", FutureWarning, "torch/cuda/__init__.py", 68)
            logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward")
            logging.getLogger("kolors_job.train").warning("stopping at step 3 on request")
            logging.getLogger("kolors_job.train").info("step", extra={"step": 3, "loss": 0.123456789012345, "lr": 1e-4})
            logging.getLogger("botocore.retries").warning("retrying")
        finally:
            root = logging.getLogger()
            for h in [h for h in root.handlers if getattr(h, "_kolors_job", False)]:
                root.removeHandler(h)
            logging.captureWarnings(False)
    return stream.getvalue()


def test_foreign_warnings_are_debug_records_and_text_losses_are_rounded() -> None:
    out = _logger_run("INFO")
    assert "pynvml" not in out and "gemm_4bit" not in out
    assert "stopping at step 3" in out and "retrying" in out  # ours, and a storage SDK's, still show
    assert "loss=0.1235 lr=0.0001" in out
    debug = _logger_run("DEBUG")
    assert re.search(r" D py\.warnings: .*FutureWarning: The pynvml package is deprecated", debug), debug
    assert " D bitsandbytes.backends.cpu.ops: Failed to load CPU gemm_4bit_forward" in debug
    records = [json.loads(line) for line in _logger_run("INFO", "json").splitlines()]
    step = next(r for r in records if r["msg"] == "step")
    assert step["loss"] == 0.123456789012345  # JSON keeps every digit
    assert not [r for r in records if "pynvml" in r["msg"] or "gemm_4bit" in r["msg"]]


def test_demo_on_a_terminal_shows_bars_not_warnings(tmp_path: Path, shared_cache: Path) -> None:
    """``kolors-job demo`` on a TTY: a training bar with step/total, loss, lr, rate and ETA, the story's
    image bar and its denoising bar; none of torch's/pynvml's/bitsandbytes' warnings; rounded losses."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a real window, not 0x0
    env = {**os.environ, "KOLORS_JOB_CACHE_DIR": str(shared_cache), "KOLORS_JOB_WORK_DIR": str(tmp_path / "work"),
           "OMP_NUM_THREADS": "1", "COLUMNS": "160"}  # fmt: skip
    env.pop("KOLORS_JOB_LOG_FORMAT", None)
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.Popen([sys.executable, "-m", "kolors_job", "demo", "--output", str(tmp_path / "out")],
                            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal)  # fmt: skip
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
    screen = b"".join(chunks).decode(errors="replace")
    assert rc == 0, screen[-4000:]
    for noise in ("Warning", "pynvml", "gemm_4bit", "torch.jit"):
        assert noise not in screen, f"{noise!r} on the first screen:\n{screen[:3000]}"
    assert re.search(r"train: +\d+%\|.*\| *24/24 \[.*<.*(it/s|s/it|step/s|s/step).*loss=\d\.\d+.*lr=", screen), screen
    assert re.search(r"story: .*8/8", screen) and "denoise" in screen, screen
    assert not re.search(r"loss=\d\.\d{6,}", screen), "text losses are rounded"
    assert "demo finished" in screen
    # the demo watches itself learn: validation points, the selected checkpoint, the strip, TensorBoard
    job = tmp_path / "out" / "demo"
    report = json.loads((job / "report.json").read_text())
    assert len(report["validation"]) >= 2 and all({"step", "mean_aesthetic"} <= set(p) for p in report["validation"])
    assert report["selected_checkpoint"]["step"] == 24 and report["selected_checkpoint"]["reason"].startswith("last")
    page = (job / "report.html").read_text()
    for point in report["validation"]:
        row = re.search(rf'<tr class="vstep[^"]*" data-step="{point["step"]}">(.*?)</tr>', page, re.S)
        assert row and len(re.findall(r'<img src="data:image/jpeg;base64,', row.group(1))) == len(point["images"])
    assert list((job / "logs" / "tensorboard").glob("events.out.tfevents.*"))
