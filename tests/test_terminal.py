"""The first screen a person sees: ``--help`` as prose, no foreign warnings, progress bars on a TTY.

The demo runs under a pseudo-terminal (what a person's shell gives it); off a TTY the same run logs
JSON lines, which the end-to-end tests read.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from kolors_job.cli import build_parser
from kolors_job.core.log import setup_logging
from kolors_job.launch.options import prose
from tests.cli_lines import run_on_terminal

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
            logging.getLogger("kolors_job.train.loop").warning("stopping at step 3 on request")
            logging.getLogger("kolors_job.train.loop").info("step", extra={"step": 3, "loss": 0.123456789012345, "lr": 1e-4})
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


def test_text_lines_leave_out_fields_without_a_value_json_keeps_them() -> None:
    """``source …: 3 files [commit=None]`` said nothing useful; JSON keeps the key (a null is data)."""
    for fmt in ("text", "json"):
        stream = io.StringIO()
        setup_logging(fmt, "INFO", stream=stream)
        try:
            logging.getLogger("kolors_job.runner").info("source x", extra={"commit": None, "score": None, "files": 3})
        finally:
            root = logging.getLogger()
            for h in [h for h in root.handlers if getattr(h, "_kolors_job", False)]:
                root.removeHandler(h)
            logging.captureWarnings(False)
        out = stream.getvalue()
        if fmt == "text":
            assert "None" not in out and out.rstrip().endswith("source x  [files=3]"), out
        else:
            assert json.loads(out) | {"ts": None} == {"ts": None, "level": "info", "logger": "kolors_job.runner",
                                                      "msg": "source x", "commit": None, "score": None, "files": 3}


def test_demo_on_a_terminal_shows_bars_not_warnings(tmp_path: Path, shared_cache: Path) -> None:
    """``kolors-job demo`` on a TTY: a training bar with step/total, loss, lr, rate and ETA, the story's
    image bar and its denoising bar; none of torch's/pynvml's/bitsandbytes' warnings; rounded losses."""
    env = {**os.environ, "KOLORS_JOB_CACHE_DIR": str(shared_cache), "KOLORS_JOB_WORK_DIR": str(tmp_path / "work"),
           "OMP_NUM_THREADS": "1", "COLUMNS": "160"}  # fmt: skip
    env.pop("KOLORS_JOB_LOG_FORMAT", None)
    env.pop("PYTHONWARNINGS", None)
    rc, screen = run_on_terminal([sys.executable, "-m", "kolors_job", "demo", "--output", str(tmp_path / "out")], env, ROOT)
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


# ------------------------------------------------------------------------------------ JSON mode: every line

LIBRARY_ZOO = '''
import logging, sys
logging.getLogger("early.lib").addHandler(logging.StreamHandler())  # a handler made before setup_logging
from kolors_job.core.log import setup_logging
setup_logging("json", "DEBUG")
logging.getLogger("early.lib").warning("a library configured before setup")
import transformers.utils.logging as tlog
tlog.get_logger("transformers.modeling_utils").error("transformers error")
import diffusers.utils.logging as dlog
dlog.get_logger("diffusers.pipelines").warning("diffusers warning")
import huggingface_hub.utils.logging as hlog
hlog.get_logger("huggingface_hub.file_download").warning("hf hub warning")
from modelscope.utils.logger import get_logger as ms_logger
ms_logger().warning("modelscope warning")
from modelscope_hub.utils.logger import get_logger as msh_logger
for i in (1, 2):
    msh_logger("legacy_api").warning(f"listing failed (NetworkError), retry in {i}s ({i}/4)")
import urllib3
try:
    urllib3.PoolManager(retries=urllib3.Retry(total=1, backoff_factor=0)).request("GET", "http://127.0.0.1:9/")
except urllib3.exceptions.MaxRetryError:
    pass
from PIL import Image
Image.MAX_IMAGE_PIXELS = 100
Image.new("RGB", (12, 12)).save(sys.argv[1])
Image.open(sys.argv[1])  # DecompressionBombWarning
import torch
torch.tensor([1.0]).new_tensor(torch.tensor([2.0]))  # torch's UserWarning
print("a plain print to stderr", file=sys.stderr)
from tqdm import tqdm
for _ in tqdm(range(3), desc="download"):
    pass
logging.lastResort.handle(logging.LogRecord("orphan", logging.ERROR, "", 0, "last resort", None, None))
sys.stderr.write("a last line without its newline")
'''


def _json_lines(stderr: str) -> list[dict]:
    records = []
    for line in stderr.splitlines():
        record = json.loads(line)  # fails the test on the first line that is not JSON
        assert isinstance(record, dict), line
        records.append(record)
    return records


def test_json_mode_makes_every_librarys_stderr_line_json(tmp_path: Path) -> None:
    """Whichever library writes to stderr — through its own handler (transformers, diffusers, huggingface_hub,
    modelscope, modelscope_hub, one made before setup), through logging (urllib3), as a Python warning (PIL,
    torch), a print, a progress bar, logging's last resort — each line is one JSON object, under its logger."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PYTHONWARNINGS", None)
    res = subprocess.run([sys.executable, "-c", LIBRARY_ZOO, str(tmp_path / "big.png")], capture_output=True,
                         text=True, env=env, timeout=300, cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    records = _json_lines(res.stderr)
    by = {(r["logger"], r["msg"].split(":")[-1].strip() if r["logger"] == "py.warnings" else r["msg"]) for r in records}
    for logger, msg in [
        ("early.lib", "a library configured before setup"),
        ("transformers.modeling_utils", "transformers error"),
        ("diffusers.pipelines", "diffusers warning"),
        ("huggingface_hub.file_download", "hf hub warning"),
        ("modelscope", "modelscope warning"),
        ("modelscope_hub.legacy_api", "listing failed (NetworkError), retry in 2s (2/4)"),
        ("stderr", "a plain print to stderr"),
        ("orphan", "last resort"),
        ("stderr", "a last line without its newline"),
    ]:
        assert (logger, msg) in by, (logger, msg, sorted(by))
    assert sum(r["logger"] == "modelscope_hub.legacy_api" for r in records) == 2, "each record once"
    assert any(r["logger"] == "urllib3.connectionpool" and r["msg"].startswith("Retrying") for r in records)
    warned = " ".join(r["msg"] for r in records if r["logger"] == "py.warnings")
    assert "DecompressionBombWarning" in warned and "UserWarning: To copy construct from a tensor" in warned
    (bar,) = [r for r in records if r["msg"].startswith("download")]
    assert "3/3" in bar["msg"], "a progress bar leaves one line, its last state"


def test_the_offline_hub_run_logs_only_json_and_text_mode_no_none(tmp_path: Path) -> None:
    """The issue's run: the default manifest, the hub unreachable. JSON mode: every stderr line JSON, the final
    error too (the hub client's own log lines as records are shown by
    ``test_json_mode_makes_every_librarys_stderr_line_json``: an unreachable hub is now refused on its first
    connection, before the client logs a retry); text mode: no field printed as None."""
    m = tmp_path / "m.yaml"
    m.write_text(f"spec: {{output: {{uri: '{tmp_path / 'out'}'}}}}")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MODELSCOPE_ENDPOINT": "http://127.0.0.1:9",
           "KOLORS_JOB_CACHE_DIR": str(tmp_path / "cache"), "KOLORS_JOB_ALLOW_CPU": "1"}  # fmt: skip
    env.pop("PYTHONWARNINGS", None)
    for fmt in ("json", "text"):
        res = subprocess.run([sys.executable, "-m", "kolors_job", "run", "--manifest", str(m), "--log-format", fmt,
                              "--job-id", f"offline-{fmt}"], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
        assert res.returncode == 75, res.stderr[-3000:]
        if fmt == "json":
            records = _json_lines(res.stderr)
            assert records[-1]["msg"].startswith("error: ModelScope unreachable") and records[-1]["exit_code"] == 75
        else:
            assert not re.search(r"=None\b", res.stderr), res.stderr
            assert res.stderr.strip().splitlines()[-1].startswith("error: ModelScope unreachable")


# ------------------------------------------------------------------------------------ small CLI promises


def test_top_level_help_lists_every_exit_code_and_run_options_all_have_help() -> None:
    from kolors_job.core.errors import ExitCode

    text = " ".join(_help().split())
    for code in ExitCode:
        if code != ExitCode.OK:
            assert re.search(rf"\b{int(code)} [a-z]", text), (int(code), text)
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name in ("run", "demo"):
        for action in subs[name]._actions:
            assert action.help, f"{name} {action.option_strings}: no help"


def test_validate_takes_the_manifest_as_run_does(capsys: pytest.CaptureFixture[str]) -> None:
    from kolors_job.cli import main

    minimal = str(ROOT / "examples" / "minimal.yaml")
    assert main(["validate", minimal]) == 0
    positional = capsys.readouterr().out
    assert main(["validate", "--manifest", minimal]) == 0
    assert capsys.readouterr().out == positional and positional.startswith("apiVersion:")
    assert main(["validate", minimal, "--manifest", str(ROOT / "examples" / "16gb.yaml")]) == 2
    assert "give the manifest once" in capsys.readouterr().err


def test_an_interrupted_demo_resumes_and_any_other_starts_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared_cache: Path
) -> None:
    """Ctrl-C in ``demo`` says "rerun to resume": so a rerun of an interrupted demo resumes (no --force),
    while a finished one, or one of another manifest, starts over."""
    from kolors_job import runner
    from kolors_job.cli import main
    from kolors_job.core.errors import ExitCode
    from kolors_job.core.settings import Settings
    from kolors_job.demo import demo_manifest
    from kolors_job.job.context import Job

    monkeypatch.setenv("KOLORS_JOB_CACHE_DIR", str(shared_cache))
    out = tmp_path / "demo-out"
    manifest = demo_manifest(Settings(), output=str(out))
    forced: list[bool] = []

    def fake_run(job: Job) -> runner.JobOutcome:
        forced.append(job.force)
        return runner.JobOutcome(job.job_id, job.output_uri, ExitCode.OK, "succeeded")

    monkeypatch.setattr(runner, "run_job", fake_run)
    status = out / manifest.job_id / "status.json"
    status.parent.mkdir(parents=True)
    try:
        for state, digest, expect_force in [("interrupted", manifest.digest(), False),
                                            ("succeeded", manifest.digest(), True),
                                            ("interrupted", "another-manifest", True)]:  # fmt: skip
            status.write_text(json.dumps({"state": state, "manifest_digest": digest}))
            assert main(["demo", "--output", str(out), "--log-format", "text"]) == 0
            assert forced[-1] is expect_force, (state, digest)
        status.unlink()
        assert main(["demo", "--output", str(out), "--log-format", "text"]) == 0 and forced[-1] is True
    finally:
        root = logging.getLogger()
        for h in [h for h in root.handlers if getattr(h, "_kolors_job", False)]:
            root.removeHandler(h)
        logging.captureWarnings(False)
