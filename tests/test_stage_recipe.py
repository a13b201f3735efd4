"""A stage is four touches (docs/architecture.md, "Where to add things"): its module, its entry in the table of
``kolors_job/runner.py``, its section of the manifest, its field of report.json.

The test makes exactly those four edits to a copy of the package, as a developer would (a stage that writes each
training image's caption into the output, ``captions/<image>.txt``), checks that nothing else of the copy
differs, and runs a whole tiny job with the copy in a fresh interpreter: the stage runs, after ``dataset`` and
before ``train``, its files are in the output, its section is in report.json and its record in
``_state/captions.json``. The job is made to fail its quality gate (exit 3, every file kept), so the rerun of the
same manifest resumes: it skips the stage (its function is not called again, its output is the record) and ends
the same way.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from kolors_job.core.errors import ExitCode
from kolors_job.demo import build_demo_dataset, tiny_job

ROOT = Path(__file__).resolve().parents[1]

STAGE_MODULE = '''\
"""The ``captions`` stage (a test's): each training image's caption as ``captions/<image>.txt`` in the output."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from kolors_job.data.stage import ScannedDataset
from kolors_job.job.context import Job

CALLS = Path({calls!r})  # each run of the stage's function adds a line (the test counts them)


@dataclass(frozen=True)
class CaptionsInput:
    dataset: ScannedDataset


class Captions(BaseModel):
    written: list[str]

    def report_fields(self) -> dict[str, Any]:
        return {{"captions": {{"written": len(self.written)}}}}


def write_captions(job: Job, given: CaptionsInput) -> Captions:
    with CALLS.open("a") as calls:
        calls.write(f"rank {{job.rank}}\\n")
    suffix = job.manifest.spec.captions.suffix
    written = []
    for item in given.dataset.items:
        key = f"captions/{{Path(item.path).stem}}.txt"
        if job.main:
            job.store.write_text(key, item.caption + suffix)
        written.append(key)
    return Captions(written=written)
'''

# (file, text after which the touch goes, the touch)
TOUCHES = [
    ("kolors_job/runner.py", "from kolors_job.data.stage import ScannedDataset, run_dataset\n",
     "from kolors_job.data.captions_stage import Captions, CaptionsInput, write_captions\n"),
    ("kolors_job/runner.py", '    Stage("dataset", run_dataset, None, ScannedDataset, node_first=True),\n',
     '    Stage("captions", write_captions, CaptionsInput, Captions, resumable=True),\n'),
    ("kolors_job/manifest/spec.py", "class Spec(Strict):\n", textwrap.dedent('''\
        class CaptionsSpec(Strict):
            suffix: FreeText = ""
            """Appended to every caption file."""


        '''), "before"),
    ("kolors_job/manifest/spec.py", '''    """The aesthetic scoring and the quality gate."""\n''', textwrap.indent(textwrap.dedent('''\
        captions: CaptionsSpec = CaptionsSpec()
        """The captions stage's settings."""
        '''), "    ")),
    ("kolors_job/report/model.py", "class Report(_Section):\n", textwrap.dedent('''\
        class Captions(_Section):
            written: int | None = None


        '''), "before"),
    ("kolors_job/report/model.py", "    submission: Submission | None = None\n", "    captions: Captions | None = None\n"),
]


def _touch(root: Path, rel: str, anchor: str, text: str, where: str = "after") -> None:
    path = root / rel
    source = path.read_text()
    assert source.count(anchor) == 1, f"{rel}: the anchor of the touch is not there once: {anchor!r}"
    path.write_text(source.replace(anchor, text + anchor if where == "before" else anchor + text))


def test_a_stage_added_in_four_touches_runs_in_a_whole_job_and_a_rerun_skips_it(
    tmp_path: Path, shared_cache: Path
) -> None:
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "kolors_job", copy / "kolors_job", ignore=shutil.ignore_patterns("__pycache__"))
    calls = tmp_path / "calls.txt"
    (copy / "kolors_job/data/captions_stage.py").write_text(STAGE_MODULE.format(calls=str(calls)))
    for rel, anchor, text, *where in TOUCHES:
        _touch(copy, rel, anchor, text, *where)

    # the four touches, and nothing else of the package changed
    changed: list[str] = []

    def walk(cmp: filecmp.dircmp[str], prefix: str) -> None:
        changed.extend(prefix + name for name in cmp.diff_files + cmp.left_only + cmp.right_only)
        for name, sub in cmp.subdirs.items():
            walk(sub, f"{prefix}{name}/")

    walk(filecmp.dircmp(ROOT / "kolors_job", copy / "kolors_job", ignore=["__pycache__"]), "kolors_job/")
    assert sorted(changed) == ["kolors_job/data/captions_stage.py", "kolors_job/manifest/spec.py",
                               "kolors_job/report/model.py", "kolors_job/runner.py"]  # fmt: skip

    data = build_demo_dataset(tmp_path / "data", n=3)
    doc = tiny_job(data, str(tmp_path / "out"), {
        "dataset.caption": {"fixed": None}, "train.steps": 2, "train.batch_size": 2, "train.checkpoint_every": 2,
        "story.steps": 2, "score.threshold": 10.0,  # the tiny predictor scores far below: the gate fails, exit 3
        "captions": {"suffix": " (caption file)"},
    })  # fmt: skip
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(doc, allow_unicode=True))
    env = {**os.environ, "PYTHONPATH": str(copy), "KOLORS_JOB_CACHE_DIR": str(shared_cache),
           "KOLORS_JOB_WORK_DIR": str(tmp_path / "work"), "KOLORS_JOB_LOG_FORMAT": "json"}  # fmt: skip

    def run() -> list[dict]:
        res = subprocess.run([sys.executable, "-m", "kolors_job", "run", "--manifest", str(manifest)],
                             capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)  # fmt: skip
        assert res.returncode == ExitCode.QUALITY_GATE, res.stderr[-3000:]
        return [json.loads(line) for line in res.stderr.splitlines() if line.startswith("{")]

    first = run()
    out = tmp_path / "out" / "tiny-job"
    status = json.loads((out / "status.json").read_text())
    assert list(status["stages"]) == ["models", "dataset", "captions", "train", "export", "story", "score", "report"]
    captions = sorted((out / "captions").iterdir())
    assert [p.name for p in captions] == ["img_00.txt", "img_01.txt", "img_02.txt"]  # the images the scan kept
    assert all(p.read_text().endswith(" (caption file)") for p in captions)
    report = json.loads((out / "report.json").read_text())
    assert report["captions"] == {"written": 3}
    record = json.loads((out / "_state" / "captions.json").read_text())
    assert record["written"] == [f"captions/{p.name}" for p in captions]
    assert calls.read_text() == "rank 0\n"
    assert not any("not run again" in r["msg"] for r in first)

    second = run()  # the same manifest, no _SUCCESS (the gate failed): a resume
    assert calls.read_text() == "rank 0\n", "the recorded stage ran again"
    skipped = {r["msg"].split(":")[0] for r in second if "already complete in the output" in r["msg"]}
    assert skipped == {"captions", "train", "export"}
    assert json.loads((out / "report.json").read_text())["captions"] == {"written": 3}
