"""Aspect-ratio buckets and several datasets (issue 29): the bucket table, an image's bucket, its resize/crop
and time ids, batches of one size, repeats, a bucketed tiny run that resumes bit for bit, and the dataset
stage's per-dataset and per-bucket counts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from kolors_job.core.errors import InputError
from kolors_job.data.buckets import assign_buckets, bucket_counts
from kolors_job.data.images import ImageItem, load_image
from kolors_job.export.lora_io import LORA_WEIGHT_NAME
from kolors_job.manifest.buckets import bucket_sizes, nearest_bucket
from kolors_job.manifest.load import parse_manifest
from kolors_job.manifest.train import TrainSpec
from kolors_job.models.tiny import build_tiny_kolors
from kolors_job.report import model as rm
from kolors_job.train import step as step_mod
from kolors_job.train.data import SampleStream
from kolors_job.train.loop import train_lora

KOHYA_1024 = [
    (704, 1408), (768, 1344), (768, 1280), (832, 1216), (896, 1152), (960, 1088), (1024, 1024),
    (1088, 960), (1152, 896), (1216, 832), (1280, 768), (1344, 768), (1408, 704),
]
"""kohya sd-scripts' ``make_bucket_resolutions((1024, 1024), min_size=64, max_size=16384, divisible=64)``
(library/train_util.py), those with aspect ratio within the reference's filter [0.5, 2], by ratio."""


def _png(path: Path, w: int, h: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


# ------------------------------------------------------------------------------------------- the table


def test_buckets_are_kohyas_table_within_the_aspect_filter() -> None:
    sizes = bucket_sizes(1024, (0.5, 2.0))
    assert sizes == KOHYA_1024
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 1024 * 1024 for w, h in sizes)
    assert {(h, w) for w, h in sizes} == set(sizes)  # portrait and landscape alike
    # each image to the bucket nearest its aspect ratio
    assert nearest_bucket(2048, 1024, sizes) == (1408, 704) and nearest_bucket(1024, 2048, sizes) == (704, 1408)
    assert nearest_bucket(1600, 1200, sizes) == (1152, 896)  # 4:3 → 1.29 (1216x832 is 1.46)
    assert nearest_bucket(3000, 3000, sizes) == (1024, 1024)
    assert bucket_sizes(1024, (1.0, 1.0)) == [(1024, 1024)]
    assert bucket_sizes(192, (0.5, 2.0)) == [(128, 256), (192, 192), (256, 128)]


def test_a_bucketed_image_covers_its_bucket_and_its_time_ids_say_how(tmp_path: Path) -> None:
    """A 3:1 image in the 2:1 bucket 256x128: scaled to height 128 (384 wide), centre-cropped 64 px from the
    left; time ids (original h, w, crop top, left, bucket h, w), as SDXL's bucketed training conditions."""
    path = _png(tmp_path / "wide.png", 300, 100)
    item = ImageItem(path, "x", 300, 100, bucket=(256, 128))
    tensor, time_ids = load_image(item, 192, center_crop=True, flip=False, resize_filter="lanczos")
    assert tuple(tensor.shape) == (3, 128, 256)
    assert time_ids == (100, 300, 0, 64, 128, 256)
    want = Image.open(path).convert("RGB").resize((384, 128), Image.Resampling.LANCZOS).crop((64, 0, 320, 128))
    expected = torch.from_numpy(np.asarray(want, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(tensor, expected)
    # without a bucket: the square crop, as always
    square, ids = load_image(ImageItem(path, "x", 300, 100), 64, center_crop=True, flip=False)
    assert tuple(square.shape) == (3, 64, 64) and ids[4:] == (64, 64)


# ------------------------------------------------------------------------------------------- sampling


def test_batches_hold_one_bucket_and_repeats_weight_the_draws() -> None:
    sizes = ["a", "a", "b", "b", "b"]
    for order in ("random", "shuffle"):
        stream = SampleStream(5, 7, order, sizes=sizes, repeats=[1, 3, 1, 1, 1], batch_size=2)
        twin = SampleStream(5, 7, order, sizes=sizes, repeats=[1, 3, 1, 1, 1], batch_size=2)
        draws = [stream.item(g) for g in range(2000)]
        assert draws == [twin.item(g) for g in reversed(range(2000))][::-1]  # a pure function of the index
        for b in range(0, 2000, 2):
            assert sizes[draws[b]] == sizes[draws[b + 1]], (order, b)  # one bucket per batch
        counts = np.bincount(draws, minlength=5) / len(draws)
        assert counts[1] > 2 * counts[0], (order, counts)  # repeats: 3 copies of item 1, one of item 0
        assert stream.n == 7
    # one size, or batches of one: exactly the plain stream (so nothing changes for an unbucketed run)
    for order in ("random", "shuffle"):
        plain = SampleStream(5, 7, order)
        assert [SampleStream(5, 7, order, sizes=["a"] * 5, batch_size=4).item(g) for g in range(50)] == [
            plain.item(g) for g in range(50)
        ]
        assert [SampleStream(5, 7, order, sizes=sizes, batch_size=1).item(g) for g in range(50)] == [
            plain.item(g) for g in range(50)
        ]
    # shuffle: every copy once an epoch (a bucket's last batch filled from its own start)
    stream = SampleStream(5, 7, "shuffle", sizes=sizes, batch_size=2)
    assert stream.batches_per_epoch == 3  # a: 1 batch, b: 2
    epoch = [stream.item(g) for g in range(6)]
    assert set(epoch) == set(range(5))


# ------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tiny_model(shared_cache: Path) -> Path:
    return build_tiny_kolors(shared_cache / "tiny-kolors", seed=0)


SPEC = TrainSpec(
    rank=4, alpha=2.0, learning_rate=1e-3, steps=4, batch_size=2, resolution=192, seed=2, checkpoint_every=2,
    log_with=[],
)
"""The reference's switches (random order, target time ids, posterior mean) at a resolution whose buckets
(within [0.5, 2]) are 128x256, 192x192 and 256x128; batches of 2."""


@pytest.fixture(scope="module")
def bucketed_items(tmp_path_factory: pytest.TempPathFactory) -> list[ImageItem]:
    root = tmp_path_factory.mktemp("bucket-images")
    wide = ImageItem(_png(root / "wide.png", 384, 192, seed=1), "二次元", 384, 192)
    square = ImageItem(_png(root / "square.png", 200, 200, seed=2), "二次元，方", 200, 200, repeats=2)
    return assign_buckets([wide, square], SPEC.resolution, (0.5, 2.0))


@pytest.fixture(scope="module")
def bucketed(
    tiny_model: Path, bucketed_items: list[ImageItem], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("bucketed")
    batches: list[step_mod.Batch] = []
    real = step_mod.make_batch

    def make_batch(*args: Any, **kwargs: Any) -> step_mod.Batch:
        batches.append(real(*args, **kwargs))
        return batches[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(step_mod, "make_batch", make_batch)
        result = train_lora(tiny_model, bucketed_items, SPEC, work_dir=work, device="cpu", progress=False)
    return {"result": result, "batches": batches, "work": work}


def test_a_bucketed_run_trains_each_image_at_its_bucket(
    bucketed: dict[str, Any], bucketed_items: list[ImageItem]
) -> None:
    assert [it.bucket for it in bucketed_items] == [(256, 128), (192, 192)]
    assert bucket_counts(bucketed_items, SPEC.resolution) == {"192x192": 1, "256x128": 1}
    seen = set()
    for batch in bucketed["batches"]:
        assert len(set(batch.items)) >= 1 and batch.latents.shape[0] == 2
        sizes = {bucketed_items[i].bucket for i in batch.items}
        assert len(sizes) == 1  # one bucket per batch (torch.stack would fail otherwise)
        (w, h), = sizes
        assert tuple(batch.latents.shape[2:]) == (h // 8, w // 8)
        for j, i in enumerate(batch.items):
            item = bucketed_items[i]
            # the original size and crop offset, though train.time_ids is the reference's "target"
            _, want = load_image(item, SPEC.resolution, SPEC.center_crop, False, None, SPEC.resize_filter,
                                 exif_orientation=False, jpeg_reencode=SPEC.jpeg_reencode)
            assert tuple(int(v) for v in batch.time_ids[j]) == want
            assert want[:2] == (item.height, item.width) and want[4:] == (h, w)
        seen |= sizes
    assert seen == {(256, 128), (192, 192)}
    assert bucketed["result"].steps == 4 and all(np.isfinite(bucketed["result"].losses))


def test_a_bucketed_run_resumes_bit_for_bit(
    bucketed: dict[str, Any], tiny_model: Path, bucketed_items: list[ImageItem], tmp_path: Path
) -> None:
    """Interrupted after step 2 and resumed: the same batches, the same LoRA bytes as the uninterrupted run."""
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] >= 2

    first = train_lora(tiny_model, bucketed_items, SPEC, work_dir=tmp_path, device="cpu", progress=False,
                       should_stop=stop)
    assert first.interrupted and first.steps == 2
    state = json.loads((first.lora_dir / "state.json").read_text())
    assert state["fingerprint"]["buckets"] == [[256, 128], [192, 192]] and state["fingerprint"]["repeats"] == [1, 2]
    second = train_lora(tiny_model, bucketed_items, SPEC, work_dir=tmp_path, device="cpu", progress=False,
                        resume_from=first.lora_dir)
    full = bucketed["result"]
    assert second.losses == full.losses
    assert (second.lora_dir / LORA_WEIGHT_NAME).read_bytes() == (full.lora_dir / LORA_WEIGHT_NAME).read_bytes()
    # another bucket assignment is another run: refused
    square = [ImageItem(it.path, it.caption, it.width, it.height, repeats=it.repeats) for it in bucketed_items]
    with pytest.raises(ValueError, match="different run configuration"):
        train_lora(tiny_model, square, SPEC, work_dir=tmp_path / "other", device="cpu", progress=False,
                   resume_from=first.lora_dir)


# ------------------------------------------------------------------------------------------- several datasets


def _job(tmp_path: Path, spec: dict[str, Any]) -> Any:
    from kolors_job.core.settings import Settings
    from kolors_job.job.context import Job

    manifest = parse_manifest(json.dumps({"spec": {"output": {"uri": str(tmp_path / "out")}, **spec}}))
    return Job(manifest, settings=Settings())


def test_several_datasets_each_with_its_filters_repeats_and_buckets(job_env: Path, tmp_path: Path) -> None:
    from kolors_job.data.stage import run_dataset
    from kolors_job.report.html import render_html

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    _png(a / "wide.png", 384, 192)
    _png(a / "small.png", 50, 50)  # under a's size filter
    _png(b / "tall.png", 100, 200)
    (b / "notes.bin").write_bytes(b"\0" * 10)  # not an image
    job = _job(tmp_path, {
        "train": {"resolution": 192},
        "dataset": [
            {"source": str(a), "repeats": 3, "buckets": True, "caption": {"fixed": "二次元"},
             "filters": {"min_width": 100, "min_height": 100}},
            {"source": str(b), "caption": {"fixed": "高", "prefix": "tall "},
             "filters": {"min_width": 64, "min_height": 64}},
        ],
    })  # fmt: skip
    scanned = run_dataset(job)
    items, summary = scanned.items, scanned.summary
    assert [(it.path.name, it.dataset, it.repeats, it.bucket, it.caption) for it in items] == [
        ("wide.png", 0, 3, (256, 128), "二次元"),
        ("tall.png", 1, 1, None, "tall 高"),
    ]
    first, second = summary["datasets"]
    assert (first["source"], first["kept"], first["skipped"], first["repeats"]) == (str(a), 1, {"too_small": 1}, 3)
    assert first["buckets"] == {"256x128": 1} and first["filters"]["min_size"]["dropped"] == 1
    assert (second["kept"], second["skipped"], "repeats" in second) == (1, {"not_image": 1}, False)
    assert (summary["kept"], summary["examined"], summary["skipped"]) == (2, 4, {"not_image": 1, "too_small": 1})
    assert summary["buckets"] == {"192x192": 1, "256x128": 1}  # the square-cropped image at resolution²
    html = render_html({"dataset": rm.Dataset.model_validate(summary).model_dump(exclude_unset=True)}, tmp_path)
    assert str(b) in html and "256x128" in html

    # one dataset: report.json's dataset section keeps its single-dataset shape
    one = _job(tmp_path, {"train": {"resolution": 192}, "dataset": {
        "source": str(b), "buckets": True, "filters": {"min_width": 64, "min_height": 64}}})
    scanned = run_dataset(one)
    items, summary = scanned.items, scanned.summary
    assert "datasets" not in summary and summary["source"] == str(b) and summary["buckets"] == {"128x256": 1}

    # a dataset of which nothing survives is named
    (b / "tall.png").unlink()
    with pytest.raises(InputError, match=r"dataset\[1\] .*no image survived"):
        run_dataset(job)
    shutil.rmtree(a)
