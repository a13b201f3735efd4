"""``make demo``: the real job, end to end, on a tiny random Kolors and a small generated dataset.

Nothing is faked: the same stages run on a model whose *shapes* are tiny. The weights are random,
so the images are noise-like and the scores meaningless — the report says so in a banner.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from kolors_job.core.settings import Settings
from kolors_job.manifest.spec import Manifest

DEMO_RESOLUTION = 64


def build_demo_dataset(root: Path, n: int = 12, seed: int = 0) -> Path:
    """Small images of coloured shapes with captions, plus a few bad files the scan must skip."""
    marker = root / ".complete"
    if marker.exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        w, h = rng.choice([(96, 96), (128, 96), (96, 128), (160, 120)])
        img = Image.new("RGB", (w, h), tuple(rng.randrange(40, 220) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = rng.randrange(w), rng.randrange(h)
            r = rng.randrange(8, 40)
            colour = tuple(rng.randrange(256) for _ in range(3))
            if rng.random() < 0.5:
                draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=colour)
            else:
                angle = rng.random() * math.pi
                draw.line((x0, y0, x0 + r * math.cos(angle) * 3, y0 + r * math.sin(angle) * 3), fill=colour, width=5)
        img.save(root / f"img_{i:02d}.png")
        (root / f"img_{i:02d}.txt").write_text("二次元，彩色的几何图形", encoding="utf-8")
    # inputs a real dataset has: each is skipped and counted in the report
    (root / "empty.png").write_bytes(b"")
    (root / "notes.png").write_text("not an image", encoding="utf-8")
    buf = io.BytesIO()
    Image.new("RGB", (96, 96), (200, 10, 10)).save(buf, "JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    Image.new("RGB", (32, 32)).save(root / "too_small.png")
    marker.write_text("ok")
    return root


def tiny_job(data: Path, output: str, overrides: Mapping[str, Any] | None = None, *, name: str = "tiny-job",
             resolution: int = DEMO_RESOLUTION) -> dict[str, Any]:
    """A whole job on the tiny random Kolors as a manifest dict (the demo's, and every end-to-end test's).

    ``overrides`` are dotted paths into ``spec`` (``{"train.steps": 4, "story.batch_size": 1}``).
    """
    spec: dict[str, Any] = {
        # the tiny model's own VAE stands in for the reference's training VAE (sdxl-vae-fp16-fix)
        "model": {"base": "tiny://kolors", "train_vae": "tiny://kolors"},
        "dataset": {"source": str(data), "filters": {"min_width": resolution, "min_height": resolution}},
        # validation at every checkpoint is on by default; a few steps keep the tiny jobs quick
        "train": {"resolution": resolution, "precision": "fp32", "validation": {"steps": 3}},
        "story": {"width": resolution, "height": resolution},
        # random weights: the tiny predictor's scores are arbitrary, so the gate is nominal
        "score": {"aesthetic_model": "tiny://aesthetic", "threshold": 1.0},
        "output": {"uri": output},
    }
    for dotted, value in (overrides or {}).items():
        node = spec
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return {"metadata": {"name": name}, "spec": spec}


def resumes(manifest: Manifest, settings: Settings) -> bool:
    """Whether the demo's output holds an interrupted run of this very manifest: then ``demo`` resumes it
    (Ctrl-C says "rerun to resume"); any other time it starts over, so every ``make demo`` shows a whole run."""
    from kolors_job.storage import open_store

    try:
        status = json.loads(open_store(manifest.spec.output.uri, settings).child(manifest.job_id).read_bytes(
            "status.json"))  # fmt: skip
    except Exception:  # none yet, unreadable, half-written: start over
        return False
    return isinstance(status, dict) and status.get("state") == "interrupted" and (
        status.get("manifest_digest") == manifest.digest())  # fmt: skip


def demo_manifest(settings: Settings, output: str = "demo-output") -> Manifest:
    data = build_demo_dataset(settings.cache_dir / "demo-dataset")
    doc = tiny_job(
        data,
        output,
        {
            "dataset.caption": {"fixed": None},
            "train.steps": 24,
            "train.batch_size": 2,
            "train.learning_rate": 1e-3,
            "train.checkpoint_every": 8,
            "train.validation": {"steps": 3},  # 3 validations (steps 8, 16, 24) of frames 1 and 8
            "story.steps": 8,
            "story.batch_size": 8,
        },
        name="demo",
    )
    doc["metadata"]["labels"] = {"random-weights": "true"}
    return Manifest.model_validate(doc)
