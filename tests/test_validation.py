"""Watching the LoRA learn (#16): validation frames at checkpoints, TensorBoard events, best_aesthetic selection.

A tiny job runs in-process with ``train.select: best_aesthetic`` and ``keep_checkpoints: 1``; the event
file is read back with a TFRecord reader over tensorboardX's ``Event`` proto (``tensorboard`` itself is
not installed), the exported LoRA is compared tensor by tensor with the export of the chosen checkpoint.
"""

from __future__ import annotations

import json
import re
import struct
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from kolors_job.core.errors import ExitCode
from kolors_job.core.settings import Settings
from kolors_job.demo import build_demo_dataset, tiny_job
from kolors_job.export import LoraInfo, export_all
from kolors_job.job.context import Job
from kolors_job.manifest.spec import Manifest
from kolors_job.runner import run_job
from kolors_job.train.validation import select_checkpoint

STEPS, EVERY = 6, 2
LORA = "pytorch_lora_weights.safetensors"


def read_events(path: Path) -> list[Any]:
    """TFRecord framing: u64 length, u32 crc of it, the Event bytes, u32 crc of them."""
    from tensorboardX.proto.event_pb2 import Event

    events, data, pos = [], path.read_bytes(), 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        events.append(Event.FromString(data[pos + 12 : pos + 12 + length]))
        pos += 12 + length + 4
    return events


@pytest.fixture(scope="module")
def best_run(shared_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("watch")
    data = build_demo_dataset(base / "ds", n=6)
    doc = tiny_job(data, str(base / "out"), {
        "dataset.caption": {"fixed": None}, "train.steps": STEPS, "train.batch_size": 2,
        "train.checkpoint_every": EVERY, "train.learning_rate": 0.1, "train.select": "best_aesthetic",
        "train.validation": {"steps": 2, "frames": [1, 2, 8]}, "story.steps": 2,
        "output.keep_checkpoints": 1, "output.lora_formats": ["diffusers"],
    }, name="watch")  # fmt: skip
    settings = Settings(cache_dir=shared_cache, work_dir=base / "work", log_format="json")
    outcome = run_job(Job(Manifest.model_validate(doc), settings=settings))
    assert outcome.exit_code == ExitCode.OK, outcome.message
    job = base / "out" / "watch"
    return {"job": job, "report": json.loads((job / "report.json").read_text())}


def test_every_checkpoint_is_validated_and_its_frames_are_stored(best_run: dict[str, Any]) -> None:
    job, report = best_run["job"], best_run["report"]
    points = report["validation"]
    assert [p["step"] for p in points] == list(range(EVERY, STEPS + 1, EVERY))
    for p in points:
        assert p["images"] == [f"validation/step-{p['step']}/{i:02d}.png" for i in (1, 2, 8)]
        assert all((job / rel).is_file() for rel in p["images"])
        assert p["mean_aesthetic"] == pytest.approx(sum(p["scores"]) / 3)
        assert -1.0 <= p["consistency"] <= 1.0


def test_best_aesthetic_selects_the_highest_mean_and_exports_that_checkpoint(best_run: dict[str, Any]) -> None:
    job, report = best_run["job"], best_run["report"]
    points = report["validation"]
    best = max(points, key=lambda p: p["mean_aesthetic"])
    assert best["step"] < STEPS  # lr 0.1 overshoots: an early checkpoint wins (the CPU run is deterministic)
    selected = report["selected_checkpoint"]
    assert selected["step"] == best["step"] and selected["mean_aesthetic"] == best["mean_aesthetic"]
    assert selected["reason"].startswith("best_aesthetic")
    # pruning (keep 1) kept the newest and the selected one
    ckpts = sorted(int(p.name.removeprefix("step-")) for p in (job / "checkpoints").glob("step-*"))
    assert ckpts == sorted({STEPS, best["step"]})
    # the exported file is the selected checkpoint's weights, exported the same way
    chosen = job / "checkpoints" / f"step-{best['step']}"
    expected = export_all(chosen, LoraInfo(rank=16, alpha=4.0), job.parent / "expected", ["diffusers"],
                          write_card=False)["diffusers"]  # fmt: skip
    got, want = load_file(job / "lora" / LORA), load_file(expected)
    assert got.keys() == want.keys()
    assert all(got[k].equal(want[k]) for k in got)
    assert json.loads((job / "lora" / "lora_config.json").read_text())["steps"] == best["step"]


def test_selection_rule() -> None:
    points = [{"step": 2, "mean_aesthetic": 5.0}, {"step": 4, "mean_aesthetic": 5.5}, {"step": 6, "mean_aesthetic": 5.2}]
    assert select_checkpoint(points, "best_aesthetic", 6)["step"] == 4
    last = select_checkpoint(points, "last", 6)
    assert (last["step"], last["mean_aesthetic"], last["reason"].split(":")[0]) == (6, 5.2, "last")
    assert select_checkpoint([], "last", 6)["mean_aesthetic"] is None


def test_tensorboard_events_hold_the_scalars_and_the_frames(best_run: dict[str, Any]) -> None:
    files = sorted((best_run["job"] / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert files
    scalars: dict[str, dict[int, float]] = {}
    images: set[int] = set()
    for event in (e for f in files for e in read_events(f)):
        for value in event.summary.value:
            if value.HasField("image"):
                images.add(event.step)
            else:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    assert set(scalars["train/loss"]) == set(scalars["train/lr"]) == set(scalars["train/grad_norm"])
    assert set(scalars["train/loss"]) == set(range(1, STEPS + 1))
    losses = best_run["report"]["train"]["losses"]
    assert [scalars["train/loss"][s] for s in range(1, STEPS + 1)] == pytest.approx(losses, rel=1e-6)
    points = {p["step"]: p for p in best_run["report"]["validation"]}
    assert scalars["validation/mean_aesthetic"] == pytest.approx({s: p["mean_aesthetic"] for s, p in points.items()})
    assert set(scalars["validation/consistency"]) == set(points) == images


class _Strips(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.step: str | None = None
        self.imgs: dict[str, int] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr" and "data-step" in a:
            self.step = a["data-step"]
            self.imgs[self.step] = 0
        elif tag == "img" and self.step is not None and (a.get("src") or "").startswith("data:image/jpeg"):
            self.imgs[self.step] += 1


def test_report_html_has_a_strip_per_validation(best_run: dict[str, Any]) -> None:
    html = (best_run["job"] / "report.html").read_text()
    parser = _Strips()
    parser.feed(html)
    assert parser.imgs == {str(p["step"]): 3 for p in best_run["report"]["validation"]}
    step = best_run["report"]["selected_checkpoint"]["step"]
    assert re.search(rf'<tr class="vstep selected" data-step="{step}">', html)
