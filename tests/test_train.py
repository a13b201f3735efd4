"""LoRA training on the tiny random Kolors (CPU, 64² images, a few steps).

One module-scoped straight run (6 steps, batch 2 x accumulation 2, random crop + flip, caption
dropout, cosine schedule with warmup) is checked from several sides; a second run stops at step 3
and a third resumes it, and both must reproduce the straight run bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from kolors_job.core.errors import ManifestError
from kolors_job.data.images import ImageItem, load_image
from kolors_job.export.lora_io import LORA_WEIGHT_NAME
from kolors_job.manifest.recipe import SWITCHES
from kolors_job.manifest.train import TrainSpec
from kolors_job.models.tiny import build_tiny_kolors
from kolors_job.train import setup as setup_mod
from kolors_job.train import step as step_mod
from kolors_job.train.checkpoints import COMPLETE_NAME
from kolors_job.train.latents import mix_seed
from kolors_job.train.loop import TrainResult, train_lora
from kolors_job.train.setup import make_optimizer, resolve_precision, want_checkpointing

DROPOUT = 0.25
TUNED = {path.split(".")[1]: values[1] for path, values in SWITCHES.items() if path.startswith("train.")}
"""The tuned recipe's data switches: crop time ids, posterior samples, a shuffle per epoch, EXIF, original bytes,
Lanczos (the reference's are the defaults: tests/test_reference_oracle.py, and every whole-job test)."""
SPEC = TrainSpec(
    **TUNED,
    rank=4,
    alpha=2.0,
    learning_rate=1e-3,
    steps=6,
    batch_size=2,
    gradient_accumulation=2,
    resolution=64,
    center_crop=False,
    random_flip=True,
    lr_scheduler="cosine",
    warmup_steps=1,
    seed=7,
    checkpoint_every=3,
)


@pytest.fixture(scope="module")
def tiny_model(shared_cache: Path) -> Path:
    return build_tiny_kolors(shared_cache / "tiny-kolors", seed=0)


def make_items(root: Path) -> list[ImageItem]:
    """Non-square images in both orientations, so crops have real offsets; two captions."""
    rng = np.random.default_rng(0)
    items = []
    for i, (w, h) in enumerate([(64, 96), (96, 64), (80, 80), (72, 112)]):
        path = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        items.append(ImageItem(path, "二次元" if i % 2 else "二次元，紫色短发", w, h))
    return items


@pytest.fixture(scope="module")
def items(tmp_path_factory: pytest.TempPathFactory) -> list[ImageItem]:
    return make_items(tmp_path_factory.mktemp("images"))


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def straight(
    tiny_model: Path, items: list[ImageItem], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """The reference run; records every batch it trains on, its checkpoints and its log records."""
    work = tmp_path_factory.mktemp("straight")
    batches: list[step_mod.Batch] = []
    schedulers: list[Any] = []
    calls: list[tuple[Path, int, bool]] = []
    real_make_batch, real_loss = step_mod.make_batch, step_mod._loss

    def make_batch(*args: Any, **kwargs: Any) -> step_mod.Batch:
        batches.append(real_make_batch(*args, **kwargs))
        return batches[-1]

    def loss(unet: Any, noise_scheduler: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        schedulers.append(noise_scheduler)
        return real_loss(unet, noise_scheduler, *args, **kwargs)

    handler = _Records()
    logger = logging.getLogger("kolors_job.train")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(step_mod, "make_batch", make_batch)
            mp.setattr(step_mod, "_loss", loss)
            result = train_lora(
                tiny_model,
                items,
                SPEC,
                work_dir=work,
                device="cpu",
                progress=False,
                caption_dropout=DROPOUT,
                on_checkpoint=lambda p, s: calls.append((p, s, (p / COMPLETE_NAME).is_file())),
            )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return {
        "result": result,
        "work": work,
        "batches": batches,
        "schedulers": schedulers,
        "calls": calls,
        "records": handler.records,
    }


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / LORA_WEIGHT_NAME))


def test_trains_finite_loss_and_moves_the_lora(straight: dict[str, Any]) -> None:
    result: TrainResult = straight["result"]
    assert result.steps == 6 and not result.interrupted and result.precision == "no"
    assert result.samples_seen == 6 * 2 * 2 and not result.gradient_checkpointing
    assert len(result.losses) == 6 and all(math.isfinite(x) and x > 0 for x in result.losses)
    final, mid = _tensors(result.lora_dir), _tensors(straight["work"] / "checkpoints" / "step-3")
    ups = [k for k in final if ".lora.up." in k]
    downs = [k for k in final if ".lora.down." in k]
    assert ups and len(ups) == len(downs)
    assert all(final[k].abs().max() > 0 for k in ups)  # B starts at zero
    assert all(not torch.equal(final[k], mid[k]) for k in downs)  # A trains too
    # rank/alpha travel with the weights: the header (read by load_lora_weights) and lora_config.json
    from safetensors import safe_open

    with safe_open(str(result.lora_dir / LORA_WEIGHT_NAME), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 2.0
    cfg = json.loads((result.lora_dir / "lora_config.json").read_text())
    assert cfg["rank"] == 4 and cfg["alpha"] == 2.0 and cfg["steps"] == 6
    # per-step structured log records
    steps = [r for r in straight["records"] if r.getMessage() == "step"]
    assert [r.step for r in steps] == list(range(1, 7))  # type: ignore[attr-defined]
    assert [r.loss for r in steps] == result.losses  # type: ignore[attr-defined]
    assert all(math.isfinite(r.grad_norm) and r.grad_norm > 0 for r in steps)  # type: ignore[attr-defined]


def test_grad_norm_is_measured_always_and_clips_only_when_asked() -> None:
    """The reference never clips: without ``max_grad_norm`` the gradients stay bit for bit (the norm is still
    measured for the log); with one they are scaled to it, and the pre-clip norm is what is logged."""
    from accelerate import Accelerator

    try:
        accelerator = Accelerator(cpu=True)
        grads = torch.tensor([3.0, 4.0]), torch.tensor([12.0])
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        assert step_mod._grad_norm(accelerator, params, None) == pytest.approx(13.0)
        assert all(torch.equal(p.grad, g) for p, g in zip(params, grads, strict=True))
        assert step_mod._grad_norm(accelerator, params, 1.0) == pytest.approx(13.0)
        assert float(torch.cat([p.grad for p in params]).norm()) == pytest.approx(1.0, rel=1e-5)
    finally:
        setup_mod._reset_accelerate_state()


def test_checkpoints_are_complete_and_reported(straight: dict[str, Any]) -> None:
    calls = straight["calls"]
    assert [(p.name, s, done) for p, s, done in calls] == [("step-3", 3, True), ("step-6", 6, True)]
    ckpt = calls[0][0]
    names = {p.name for p in ckpt.iterdir()}
    assert {"state.json", COMPLETE_NAME, LORA_WEIGHT_NAME, "optimizer.bin"} <= names
    assert not any(n.endswith(".safetensors") and n != LORA_WEIGHT_NAME for n in names)  # no full UNet
    assert not list(ckpt.parent.glob(".*partial"))


def test_conditioning_is_encode_prompt(straight: dict[str, Any], tiny_model: Path) -> None:
    """What the UNet trains on is exactly what sampling feeds it: encode_prompt, 256 tokens, "" encoded."""
    from diffusers import KolorsPipeline

    pipe = KolorsPipeline.from_pretrained(tiny_model)
    seen = {}
    for batch in straight["batches"]:
        for j, caption in enumerate(batch.captions):
            seen[caption] = (batch.embeds[j], batch.pooled[j])
    assert set(seen) == {"", "二次元", "二次元，紫色短发"}  # dropout happened and was encoded
    for caption, (embeds, pooled) in seen.items():
        want, _, want_pooled, _ = pipe.encode_prompt(caption, device="cpu", do_classifier_free_guidance=False)
        assert embeds.shape == (256, 32) and want.shape == (1, 256, 32)
        assert torch.equal(embeds, want[0]) and torch.equal(pooled, want_pooled[0])
    assert seen[""][0].abs().sum() > 0  # not zeroed


def test_time_ids_come_from_the_crop_and_schedule_from_the_model(
    straight: dict[str, Any], items: list[ImageItem]
) -> None:
    offsets, flips = set(), set()
    for batch in straight["batches"]:
        for j, (i, flip) in enumerate(zip(batch.items, batch.flips, strict=True)):
            _, want = load_image(items[i], 64, False, flip, random.Random(mix_seed(SPEC.seed, "crop", i)))
            got = tuple(int(v) for v in batch.time_ids[j])
            assert got == want
            assert got[:2] == (items[i].height, items[i].width) and got[4:] == (64, 64)
            offsets.add(got[2:4])
            flips.add(flip)
    assert any(o != (0, 0) for o in offsets) and flips == {False, True}
    sched = straight["schedulers"][0]
    assert sched.config.num_train_timesteps == 1100 and sched.config.beta_end == 0.014
    assert sched.config.beta_schedule == "scaled_linear"
    ts = torch.cat([b.timesteps for b in straight["batches"]])
    assert int(ts.min()) >= 0 and int(ts.max()) < 1100


def test_same_seed_and_resume_are_bitwise_identical(
    straight: dict[str, Any], tiny_model: Path, items: list[ImageItem], tmp_path: Path
) -> None:
    """Stop after step 3 (with gradient checkpointing on: same math), resume for 3 more: same bytes."""
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] >= 3

    spec_ckpt = SPEC.model_copy(update={"gradient_checkpointing": "on"})
    first = train_lora(
        tiny_model,
        items,
        spec_ckpt,
        work_dir=tmp_path,
        device="cpu",
        progress=False,
        caption_dropout=DROPOUT,
        should_stop=stop,
    )
    assert first.interrupted and first.steps == 3 and first.gradient_checkpointing
    ckpt = tmp_path / "checkpoints" / "step-3"
    assert first.lora_dir == ckpt
    ref = straight["work"] / "checkpoints" / "step-3"
    assert (ckpt / LORA_WEIGHT_NAME).read_bytes() == (
        ref / LORA_WEIGHT_NAME
    ).read_bytes()  # same seed, same run

    second = train_lora(
        tiny_model,
        items,
        SPEC,
        work_dir=tmp_path,
        device="cpu",
        progress=False,
        caption_dropout=DROPOUT,
        resume_from=ckpt,
    )
    result: TrainResult = straight["result"]
    assert second.steps == 6 and not second.interrupted
    assert second.losses == result.losses
    assert (second.lora_dir / LORA_WEIGHT_NAME).read_bytes() == (
        result.lora_dir / LORA_WEIGHT_NAME
    ).read_bytes()
    assert second.lora_sha256 == result.lora_sha256


def test_refuses_incomplete_or_foreign_checkpoint(
    straight: dict[str, Any], tiny_model: Path, items: list[ImageItem], tmp_path: Path
) -> None:
    broken = tmp_path / "step-3"
    shutil.copytree(straight["work"] / "checkpoints" / "step-3", broken)
    (broken / COMPLETE_NAME).unlink()
    with pytest.raises(ValueError, match="COMPLETE"):
        train_lora(
            tiny_model, items, SPEC, work_dir=tmp_path, device="cpu", progress=False, resume_from=broken
        )
    (broken / COMPLETE_NAME).write_text("step 3\n")
    # another job's checkpoint (its manifest digest, recorded in the fingerprint) is never resumed
    with pytest.raises(ValueError, match="different run configuration"):
        train_lora(tiny_model, items, SPEC, work_dir=tmp_path, device="cpu", progress=False,
                   caption_dropout=DROPOUT, resume_from=broken, identity="another-job")
    # nor one of the same job whose data changed under it (another caption decides other weights)
    relabelled = [*items[:-1], dataclasses.replace(items[-1], caption=items[-1].caption + " (edited)")]
    with pytest.raises(ValueError, match="different run configuration"):
        train_lora(tiny_model, relabelled, SPEC, work_dir=tmp_path, device="cpu", progress=False,
                   caption_dropout=DROPOUT, resume_from=broken)
    other = SPEC.model_copy(update={"learning_rate": 5e-4})
    with pytest.raises(ValueError, match="different run configuration"):
        train_lora(
            tiny_model,
            items,
            other,
            work_dir=tmp_path,
            device="cpu",
            progress=False,
            caption_dropout=DROPOUT,
            resume_from=broken,
        )


def test_precision_and_memory_decisions() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "no" and resolve_precision("fp32", cpu) == "no"
    cuda = torch.device("cuda")  # the reference trains in fp16 mixed precision; bf16 only when asked
    assert resolve_precision("auto", cuda) == "fp16" and resolve_precision("bf16", cuda) == "bf16"
    with pytest.raises(ManifestError, match="fp16"):
        resolve_precision("fp16", cpu)
    assert not want_checkpointing("auto", cpu, unet_params=2_579_000_000, batch_size=1, resolution=1024)
    assert want_checkpointing("on", cpu, unet_params=1, batch_size=1, resolution=64)


def test_adamw8bit_trains_with_8bit_state_and_resumes_bitwise(
    straight: dict[str, Any], tiny_model: Path, items: list[ImageItem], tmp_path: Path
) -> None:
    """The low-memory optimizer (bitsandbytes' AdamW8bit, in the lock, CPU kernels too) learns, and a
    resume through its checkpointed quantisation state is bitwise. (The tiny LoRA's tensors are under
    bitsandbytes' 4096-element minimum, so their moments stay fp32; see the next test for real sizes.)"""
    spec = SPEC.model_copy(update={"optimizer": "adamw8bit"})
    full = train_lora(tiny_model, items, spec, work_dir=tmp_path / "full", device="cpu", progress=False,
                      caption_dropout=DROPOUT)
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] >= 3

    first = train_lora(tiny_model, items, spec, work_dir=tmp_path / "cut", device="cpu", progress=False,
                       caption_dropout=DROPOUT, should_stop=stop)
    assert first.interrupted and first.steps == 3
    saved = torch.load(first.lora_dir / "optimizer.bin", weights_only=False)["state"]
    assert saved and all("__bnb_optimizer_quant_state__" in st for st in saved.values())  # bitsandbytes' own
    second = train_lora(tiny_model, items, spec, work_dir=tmp_path / "cut", device="cpu", progress=False,
                        caption_dropout=DROPOUT, resume_from=first.lora_dir)
    assert second.losses == full.losses
    assert (second.lora_dir / LORA_WEIGHT_NAME).read_bytes() == (full.lora_dir / LORA_WEIGHT_NAME).read_bytes()

    from safetensors.torch import load_file

    eight, fp32 = (load_file(str(r.lora_dir / LORA_WEIGHT_NAME)) for r in (full, straight["result"]))
    ups = [k for k in eight if ".lora.up." in k or "lora_B" in k]
    assert ups and max(float(eight[k].abs().max()) for k in ups) > 0  # B left zero-init: it learned
    assert eight.keys() == fp32.keys()
    assert any(not torch.equal(eight[k], fp32[k]) for k in ups)  # really another optimizer


def test_adamw8bit_keeps_kolors_sized_lora_moments_in_one_byte() -> None:
    """A full-size Kolors LoRA tensor (r16 x 1280): both Adam moments are uint8 — 2 bytes per parameter
    instead of AdamW's 8 (for the whole r16 LoRA, 23.2 M parameters: 46 MB instead of 186 MB)."""
    spec = SPEC.model_copy(update={"optimizer": "adamw8bit"})
    w = torch.nn.Parameter(torch.randn(16, 1280))
    opt = make_optimizer(spec, [w], torch.device("cpu"))
    before = w.detach().clone()
    (w.square().sum()).backward()
    opt.step()
    state = opt.state[w]
    assert state["state1"].dtype == state["state2"].dtype == torch.uint8
    assert state["state1"].numel() == w.numel()
    assert not torch.equal(w.detach(), before)


def test_reference_switches_posterior_mean_and_target_time_ids(tmp_path: Path) -> None:
    """``latent: mean`` trains on the posterior mean and ``time_ids: target`` on (res, res, 0, 0, res, res),
    as DiffSynth's trainer does; the random draws (t, noise) stay those of the tuned switches."""
    from kolors_job.models.prompts import PromptEmbeds
    from kolors_job.train.latents import LatentEntry

    items = [ImageItem(tmp_path / "a.png", "二次元", 100, 80)]
    entry = LatentEntry(mean=torch.full((4, 8, 8), 0.5), std=torch.ones(4, 8, 8), time_ids=(80, 100, 3, 5, 64, 64))
    prompts = {"二次元": PromptEmbeds(embeds=torch.zeros(256, 32), pooled=torch.zeros(32))}

    def batch(**switches: str) -> step_mod.Batch:
        return step_mod.make_batch(
            [0], step_mod.SampleStream(1, 0), items, {(0, False): entry}, prompts, num_train_timesteps=1100,
            scaling_factor=0.13025, caption_dropout=0.0, random_flip=False, **switches,
        )

    default, ref = batch(), batch(latent="mean", time_ids="target")
    assert (TrainSpec().latent, TrainSpec().time_ids) == ("mean", "target")  # the reference's are the defaults
    assert (SPEC.latent, SPEC.time_ids) == ("sample", "crop")
    assert default.time_ids.tolist() == [[80, 100, 3, 5, 64, 64]] and ref.time_ids.tolist() == [[64, 64, 0, 0, 64, 64]]
    assert torch.equal(ref.latents[0], entry.mean * 0.13025) and not torch.equal(default.latents, ref.latents)
    assert torch.equal(default.noise, ref.noise) and torch.equal(default.timesteps, ref.timesteps)


def test_the_fingerprint_counts_every_train_field_but_those_listed_as_not_deciding_the_weights() -> None:
    """Resume is refused across fingerprints: each ``TrainSpec`` field changed alone changes it, except the ones
    ``NOT_WEIGHTS`` names (each with its reason); and a field added to ``TrainSpec`` counts with no list to update."""
    from typing import Literal

    from kolors_job.manifest.train import ValidationSpec
    from kolors_job.train.fingerprint import NOT_WEIGHTS, VERSION, run_fingerprint

    items = [ImageItem(Path("a.png"), "二次元", 1024, 1024)]

    def fingerprint(spec: TrainSpec) -> dict[str, Any]:
        return run_fingerprint(spec, 2, items, 0.0, precision="no", identity="job")

    other = {  # a different value of each field that decides the weights (model_copy: no cross-field checks)
        "rank": 8, "alpha": 8.0, "learning_rate": 2e-4, "steps": 501, "epochs": 2, "batch_size": 2,
        "gradient_accumulation": 2, "resolution": 512, "center_crop": False, "random_flip": True,
        "resize_filter": "lanczos", "latent": "sample", "time_ids": "crop", "data_order": "shuffle",
        "exif_orientation": True, "jpeg_reencode": 0, "target_modules": ["to_q"], "init_lora_weights": "default",
        "optimizer": "prodigy", "weight_decay": 0.0, "loss_weighting": "min_snr", "snr_gamma": 1.0,
        "noise_offset": 0.1, "dora": True, "ema": True, "ema_decay": 0.99, "max_grad_norm": 1.0,
        "lr_scheduler": "cosine", "warmup_steps": 10, "seed": 1, "compile": True,
    }  # fmt: skip
    assert set(NOT_WEIGHTS) | set(other) == set(TrainSpec.model_fields), "a field neither counted nor listed"
    assert not set(NOT_WEIGHTS) & set(other) and all(NOT_WEIGHTS.values())
    base = fingerprint(TrainSpec())
    assert base["version"] == VERSION and base["job"] == "job" and base["precision"] == "no"  # as resolved
    assert not (set(NOT_WEIGHTS) - {"precision"}) & set(base)
    for name, value in other.items():
        assert fingerprint(TrainSpec().model_copy(update={name: value})) != base, name
    quiet = {"precision": "bf16", "gradient_checkpointing": "on", "checkpoint_every": 7,
             "validation": ValidationSpec(every=0), "log_with": [], "select": "best_aesthetic", "memory": "manual",
             "allow_adamw8bit": True}  # fmt: skip
    assert set(quiet) == set(NOT_WEIGHTS)
    for name, value in quiet.items():
        assert fingerprint(TrainSpec().model_copy(update={name: value})) == base, name

    class Later(TrainSpec):  # a training option added after this test was written
        timestep_bias: Literal["none", "later"] = "none"

    assert fingerprint(Later())["timestep_bias"] == "none"
    assert fingerprint(Later(timestep_bias="later")) != fingerprint(Later())


def test_a_checkpoint_of_an_earlier_fingerprint_version_is_passed_over(tmp_path: Path) -> None:
    """Checkpoints written before the fingerprint counted every field (version 1, no ``version`` key) are not
    resumed: a rerun after the upgrade trains again from step 0 instead of failing on a fingerprint mismatch."""
    from kolors_job.storage import open_store
    from kolors_job.train.checkpoints import STATE_NAME, newest_complete, step_key
    from kolors_job.train.fingerprint import VERSION

    store = open_store(str(tmp_path))
    for step, fingerprint in ((2, {"job": "j"}), (4, {"job": "j", "version": VERSION}), (6, {"job": "j"})):
        store.write_text(f"{step_key(step)}/{STATE_NAME}", json.dumps({"step": step, "fingerprint": fingerprint}))
        store.write_text(f"{step_key(step)}/{COMPLETE_NAME}", "")
    assert newest_complete(store, identity="j") == 4
    assert newest_complete(store, identity="another") is None
