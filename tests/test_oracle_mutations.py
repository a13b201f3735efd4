"""The oracle bites: each single drift from the reference, alone, fails at least one oracle check.

A drift is applied to the resolved default manifest (what ``kolors-job validate`` prints for ``output.uri``
alone) or to a code path (monkeypatched), and the cheap oracle checks of ``tests/reference/oracle.py`` run on
it; no job runs. The table of drifts and the check that caught each is printed (``make oracle-mutations``
shows it; ``make test`` runs it too). The first ten are the drifts that once passed all eleven oracle tests
together (issue 23).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from kolors_job.manifest.spec import Manifest
from tests.reference import oracle

Edit = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Edit:
    """Set ``spec.<path>`` (dotted; a number indexes a list) in the resolved manifest."""

    def edit(doc: dict[str, Any]) -> None:
        node: Any = doc["spec"]
        *parents, leaf = path.split(".")
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[int(leaf) if leaf.isdigit() else leaf] = value

    return edit


def _both(*edits: Edit) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        for e in edits:
            e(doc)

    return edit


def _fp32_sampling_on_cuda(mp: pytest.MonkeyPatch) -> None:
    from kolors_job.render import pipeline as generate

    original = generate.sampling_dtype
    mp.setattr(generate, "sampling_dtype", lambda dev, precision="auto": torch.float32 if dev.type == "cuda"
               else original(dev, precision))


def _bicubic_for_bilinear(mp: pytest.MonkeyPatch) -> None:
    from kolors_job.data import images

    mp.setitem(images._RESIZE_FILTERS, "bilinear", Image.Resampling.BICUBIC)


def _crop_time_ids_always(mp: pytest.MonkeyPatch) -> None:
    from kolors_job.train import data as train_data

    make_batch = train_data.make_batch
    mp.setattr(train_data, "make_batch", lambda *a, **k: make_batch(*a, **{**k, "time_ids": "crop"}))


def _kaiming_init(mp: pytest.MonkeyPatch) -> None:
    import peft

    config = peft.LoraConfig
    mp.setattr(peft, "LoraConfig", lambda **k: config(**{**k, "init_lora_weights": True}))


DRIFTS: dict[str, Edit | Callable[[pytest.MonkeyPatch], None]] = {
    # the ten drifts of issue 23
    "cfg 4 -> 5": _set("story.cfg_scale", 5.0),
    "shortened negative prompt": _set("story.negative_prompt", "丑陋、变形、嘈杂"),
    "frame 1 seed 0 -> 3": _set("story.frames.0.seed", 3),
    "story size 1024 -> 768": _both(_set("story.width", 768), _set("story.height", 768)),
    "train alpha 4 -> 8 and lora_scale 0.5 -> 0.25": _both(_set("train.alpha", 8.0), _set("story.lora_scale", 0.25)),
    "lora_scale 0.5 -> 0.25 alone": _set("story.lora_scale", 0.25),
    "steps 500 -> 1000": _set("train.steps", 1000),
    "resolution 1024 -> 512": _set("train.resolution", 512),
    "random crop": _set("train.center_crop", False),
    "CUDA sampling fp16 -> fp32 (code)": _fp32_sampling_on_cuda,
    # and the init, one story prompt, one negative, the time ids, the resize filter
    "LoRA init gaussian -> kaiming (manifest)": _set("train.init_lora_weights", "default"),
    "LoRA init gaussian -> kaiming (code)": _kaiming_init,
    "frame 3 prompt without 露出憧憬的神情": _set(
        "story.frames.2.prompt", "二次元，一个紫色短发小女孩穿着粉色吊带漏肩连衣裙坐在演唱会的观众席"
    ),
    "frame 4 negative without its hands": _set("story.frames.3.negative_prompt_extra", None),
    "time ids from the crop (manifest)": _set("train.time_ids", "crop"),
    "time ids from the crop (code)": _crop_time_ids_always,
    "resize filter lanczos (manifest)": _set("train.resize_filter", "lanczos"),
    "resize filter bicubic (code)": _bicubic_for_bilinear,
    # the rest of the recipe's switches, and more of the reference's numbers
    "latent: a posterior sample": _set("train.latent", "sample"),
    "data order: a shuffle per epoch": _set("train.data_order", "shuffle"),
    "training VAE: the model's own": _set("model.train_vae", None),
    "no JPEG re-encoding": _set("train.jpeg_reencode", 0),
    "one JPEG re-encoding": _set("train.jpeg_reencode", 1),
    "EXIF orientation applied": _set("train.exif_orientation", True),
    "tiling with Lanczos": _set("story.tiling", "lanczos"),
    "recipe: tuned": _set("recipe", "tuned"),
    "story sampled in fp32": _set("story.precision", "fp32"),
    "story 30 steps": _set("story.steps", 30),
    "train precision bf16": _set("train.precision", "bf16"),
    "learning rate 2e-4": _set("train.learning_rate", 2e-4),
    "weight decay 0": _set("train.weight_decay", 0.0),
    "gradient clipping at 1": _set("train.max_grad_norm", 1.0),
    "rank 8": _set("train.rank", 8),
    "no LoRA on to_v": _set("train.target_modules", ["to_q", "to_k", "to_out.0"]),
    "batch 2": _set("train.batch_size", 2),
    "random flip": _set("train.random_flip", True),
    "min width 512": _set("dataset.filters.min_width", 512),
    "threshold 5.5": _set("score.threshold", 5.5),
}


def _drifted(edit: Edit) -> Manifest:
    doc = oracle.resolved_default().model_dump(mode="json")
    edit(doc)
    if doc["spec"]["recipe"] == "tuned":  # a recipe change: its switches come back unset, as a user writes it
        from kolors_job.manifest.recipe import SWITCHES

        for path in SWITCHES:
            section, field = path.split(".")
            doc["spec"][section].pop(field, None)
    return Manifest.model_validate(doc)


def test_the_resolved_default_passes_every_check(tmp_path: Path) -> None:
    """The control: without a drift nothing fails (so a failure below is the drift's doing)."""
    assert oracle.failures(oracle.resolved_default(), tmp_path) == {}


def test_every_drift_alone_fails_an_oracle_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert len(DRIFTS) >= 12
    caught: dict[str, str] = {}
    for i, (name, drift) in enumerate(DRIFTS.items()):
        with pytest.MonkeyPatch.context() as mp:
            if getattr(drift, "__name__", "") == "edit":
                manifest = _drifted(drift)  # type: ignore[arg-type]
            else:
                drift(mp)  # type: ignore[call-arg]
                manifest = oracle.resolved_default()
            failed = oracle.failures(manifest, tmp_path / f"d{i}", first_only=True)
        caught[name] = next(iter(failed), "")
    width = max(map(len, caught))
    with capsys.disabled():
        print(f"\n{'drift':<{width}}  caught by")
        for name, check in caught.items():
            print(f"{name:<{width}}  {check or 'NOT CAUGHT'}")
    assert [n for n, c in caught.items() if not c] == []
