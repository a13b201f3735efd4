"""The training options (issue 29): each is off by default, and each changes the first step's loss or update
as its formula says — min-SNR-γ (checked against diffusers' own ``compute_snr`` on the Kolors schedule), the
noise offset, DoRA (peft's, read back by diffusers), Prodigy (its first step in closed form) and the EMA of the
LoRA weights (diffusers' ``EMAModel`` warm-up, exported, carried through a resume bit for bit).

Each run is one to three steps of the tiny random Kolors on the CPU (64² images, batch 1).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from kolors_job.data.images import ImageItem
from kolors_job.export.lora_io import LORA_WEIGHT_NAME
from kolors_job.manifest.train import TrainSpec
from kolors_job.models.configs import KOLORS_SCHEDULER_CONFIG
from kolors_job.models.tiny import build_tiny_kolors
from kolors_job.train import loop as train_mod
from kolors_job.train import step as step_mod
from kolors_job.train.loop import train_lora

BASE = TrainSpec(
    rank=4, alpha=2.0, learning_rate=1e-3, steps=1, batch_size=1, resolution=64, seed=1, checkpoint_every=1,
    log_with=[],
)
"""The reference recipe's switches (the defaults) on a one-step tiny run; each test turns one option on."""


@pytest.fixture(scope="module")
def tiny_model(shared_cache: Path) -> Path:
    return build_tiny_kolors(shared_cache / "tiny-kolors", seed=0)


@pytest.fixture(scope="module")
def items(tmp_path_factory: pytest.TempPathFactory) -> list[ImageItem]:
    root = tmp_path_factory.mktemp("option-images")
    rng = np.random.default_rng(5)
    out = []
    for i, (w, h) in enumerate([(64, 80), (96, 64)]):
        path = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        out.append(ImageItem(path, "二次元", w, h))
    return out


def _train(tiny_model: Path, items: list[ImageItem], work: Path, spec: TrainSpec, **kwargs: Any) -> dict[str, Any]:
    """One ``train_lora`` call, with every batch it trained on."""
    batches: list[step_mod.Batch] = []
    real = step_mod.make_batch

    def make_batch(*args: Any, **kw: Any) -> step_mod.Batch:
        batches.append(real(*args, **kw))
        return batches[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(step_mod, "make_batch", make_batch)
        result = train_lora(tiny_model, items, spec, work_dir=work, device="cpu", progress=False, **kwargs)
    return {"result": result, "batches": batches, "work": work}


@pytest.fixture(scope="module")
def plain(tiny_model: Path, items: list[ImageItem], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _train(tiny_model, items, tmp_path_factory.mktemp("plain"), BASE)


def _kolors_scheduler() -> Any:
    """The training schedule as the trainer builds it (``models.load_kolors_components``): DDPM from Kolors'
    own scheduler config (scaled_linear 0.00085 → 0.014 over 1100 steps)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(KOLORS_SCHEDULER_CONFIG)


def test_every_option_is_off_by_default_and_recorded(plain: dict[str, Any]) -> None:
    spec = TrainSpec()
    assert (spec.loss_weighting, spec.noise_offset, spec.dora, spec.optimizer, spec.ema) == (
        "none", 0.0, False, "adamw", False,
    )
    assert plain["result"].summary()["options"] == {
        "optimizer": "adamw", "loss_weighting": "none", "noise_offset": 0.0, "dora": False, "ema": False,
    }


def test_min_snr_weights_are_diffusers_compute_snr_on_the_kolors_schedule() -> None:
    """Expected values from diffusers' ``compute_snr`` (and, independently, from the schedule's betas in
    float64), never from our function."""
    from diffusers.training_utils import compute_snr

    sched = _kolors_scheduler()
    t = torch.tensor([0, 1, 50, 200, 500, 800, 1099])
    snr = compute_snr(sched, t)
    betas = np.linspace(0.00085**0.5, 0.014**0.5, 1100, dtype=np.float64) ** 2  # scaled_linear
    ac = np.cumprod(1 - betas)[t.numpy()]
    np.testing.assert_allclose(snr.numpy(), ac / (1 - ac), rtol=1e-4)  # the Kolors schedule, not another
    for gamma in (5.0, 1.0):
        eps = step_mod.min_snr_weights(sched, t, gamma, "epsilon")
        v = step_mod.min_snr_weights(sched, t, gamma, "v_prediction")
        torch.testing.assert_close(eps, torch.clamp(snr, max=gamma) / snr)
        torch.testing.assert_close(v, torch.clamp(snr, max=gamma) / (snr + 1))
    assert eps[0] < 1e-3 and eps[-1] == 1.0  # t = 0 is nearly clean (huge SNR): weighted down


def test_min_snr_weights_the_first_loss_by_min_snr_over_snr(
    plain: dict[str, Any], tiny_model: Path, items: list[ImageItem], tmp_path: Path
) -> None:
    from diffusers.training_utils import compute_snr

    gamma = 5.0  # the default γ; seed 1 draws t = 53, whose SNR is well above it
    run = _train(tiny_model, items, tmp_path, BASE.model_copy(update={"loss_weighting": "min_snr"}))
    (t,) = plain["batches"][0].timesteps
    assert torch.equal(run["batches"][0].timesteps, plain["batches"][0].timesteps)  # the same sample
    snr = float(compute_snr(_kolors_scheduler(), t.reshape(1))[0])
    weight = min(snr, gamma) / snr
    assert weight < 0.9, f"seed draws t={int(t)} (SNR {snr:.3f}): choose one whose SNR is above γ"
    assert run["result"].losses[0] == pytest.approx(plain["result"].losses[0] * weight, rel=1e-5)
    assert run["result"].summary()["options"]["snr_gamma"] == gamma


def test_noise_offset_adds_a_per_channel_constant_and_changes_the_first_loss(
    plain: dict[str, Any], tiny_model: Path, items: list[ImageItem], tmp_path: Path
) -> None:
    offset = 0.1
    run = _train(tiny_model, items, tmp_path, BASE.model_copy(update={"noise_offset": offset}))
    a, b = plain["batches"][0], run["batches"][0]
    assert torch.equal(a.latents, b.latents) and torch.equal(a.timesteps, b.timesteps)  # nothing else moves
    diff = (b.noise - a.noise)[0]  # [C, H, W]
    flat = diff.reshape(diff.shape[0], -1)
    torch.testing.assert_close(flat, flat[:, :1].expand_as(flat), rtol=0, atol=1e-6)  # constant per channel
    # the draw is the sample generator's next N(0, 1) after the plain draws (dropout, flip, t, latent eps, noise)
    gen = step_mod.SampleStream(len(items), BASE.seed, BASE.data_order).generator(0)
    torch.rand((2,), generator=gen)
    torch.randint(0, 1100, (), generator=gen)
    shape = a.latents.shape[1:]
    torch.randn(shape, generator=gen)
    torch.randn(shape, generator=gen)
    z = torch.randn((shape[0], 1, 1), generator=gen)
    torch.testing.assert_close(flat[:, 0], offset * z.reshape(-1), rtol=1e-5, atol=1e-6)
    assert run["result"].losses[0] != plain["result"].losses[0]
    assert run["result"].summary()["options"]["noise_offset"] == offset


def test_prodigy_first_step_is_its_closed_form(tiny_model: Path, items: list[ImageItem], tmp_path: Path) -> None:
    """Prodigy's first step (``prodigyopt`` 1.1: d = d0, no bias correction, decoupled decay) moves every
    parameter by ``-d0·lr·((1-β1)·g / (√(1-β2)·|g| + ε) + wd·p)``; LoRA B starts at zero, so its update is the
    gradient's term alone. The gradient is read as the optimizer sees it."""
    grads: dict[int, torch.Tensor] = {}
    before: dict[int, torch.Tensor] = {}
    real = train_mod.make_optimizer

    def spy(spec: TrainSpec, params: list[torch.nn.Parameter], dev: torch.device, **kw: Any) -> Any:
        opt = real(spec, params, dev, **kw)

        def record(*_: Any) -> None:
            for p in params:
                grads[id(p)], before[id(p)] = p.grad.detach().clone(), p.detach().clone()

        opt.register_step_pre_hook(record)
        spy.params = params  # type: ignore[attr-defined]
        return opt

    spec = BASE.model_copy(update={"optimizer": "prodigy", "learning_rate": 1.0})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "make_optimizer", spy)
        result = train_lora(tiny_model, items, spec, work_dir=tmp_path, device="cpu", progress=False)
    d0, lr, (beta1, beta2), eps, wd = 1e-6, 1.0, (0.9, 0.999), 1e-8, spec.weight_decay
    params = spy.params  # type: ignore[attr-defined]
    moved = 0
    for p in params:
        g, p0 = grads[id(p)], before[id(p)]
        want = p0 - d0 * lr * wd * p0 - d0 * lr * (1 - beta1) * g / ((1 - beta2) ** 0.5 * g.abs() + eps)
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-12)
        moved += int(not torch.equal(p.detach(), p0))
    assert moved  # the LoRA moved, by Prodigy's tiny first step (d0 = 1e-6)
    assert result.summary()["options"]["prodigy_d"] == pytest.approx(d0)


def _ema_dora_spec(steps: int = 3) -> TrainSpec:
    return BASE.model_copy(update={"steps": steps, "dora": True, "ema": True, "learning_rate": 1e-2})


@pytest.fixture(scope="module")
def dora_ema(tiny_model: Path, items: list[ImageItem], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three uninterrupted steps of a DoRA with an EMA, a checkpoint after each (all kept under ``kept/``: the
    trainer keeps the newest two on disk)."""
    import shutil

    work = tmp_path_factory.mktemp("dora-ema")
    run = _train(tiny_model, items, work, _ema_dora_spec(),
                 on_checkpoint=lambda path, step: shutil.copytree(path, work / "kept" / f"step-{step}"))
    return run


def test_dora_starts_as_the_base_model_and_trains_its_magnitudes(
    plain: dict[str, Any], dora_ema: dict[str, Any]
) -> None:
    """At init DoRA's magnitude is ‖W‖ per output row and B is zero, so ``m·(W + sBA)/‖W + sBA‖`` is W: the first
    loss is the plain LoRA's; the checkpoint carries a magnitude per adapted layer (trained: see the export test)."""
    assert dora_ema["result"].losses[0] == pytest.approx(plain["result"].losses[0], rel=1e-6)
    step1 = load_file(str(dora_ema["work"] / "kept" / "step-1" / LORA_WEIGHT_NAME))
    mags = {k: v for k, v in step1.items() if "lora_magnitude_vector" in k}
    assert mags and len(mags) == sum(".lora.down." in k for k in step1)  # one per adapted layer
    assert dora_ema["result"].summary()["options"]["dora"] is True


def test_dora_exports_to_diffusers_which_applies_its_formula(
    dora_ema: dict[str, Any], tiny_model: Path, tmp_path: Path
) -> None:
    """The exported diffusers file loads in diffusers as a DoRA (``use_dora``) and each adapted layer computes
    ``m · (W + s·B A) / ‖W + s·B A‖_row`` from the trained tensors; kohya and DiffSynth are skipped with their
    reason."""
    from diffusers import KolorsPipeline

    from kolors_job.export import LoraInfo, applicable_formats, export_all

    lora_dir = dora_ema["result"].lora_dir
    formats, skipped = applicable_formats(["diffusers", "kohya", "diffsynth"], lora_dir)
    assert formats == ["diffusers"] and set(skipped) == {"kohya", "diffsynth"}
    assert "dora_scale" in skipped["kohya"] and "DiffSynth" in skipped["diffsynth"]
    files = export_all(lora_dir, LoraInfo(rank=4, alpha=2.0), tmp_path, ["diffusers"], write_card=False)
    pipe = KolorsPipeline.from_pretrained(tiny_model)
    pipe.load_lora_weights(str(files["diffusers"].parent), weight_name=files["diffusers"].name, adapter_name="x")
    assert pipe.unet.peft_config["x"].use_dora
    trained = load_file(str(lora_dir / LORA_WEIGHT_NAME))
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    a, b = trained[f"unet.{module}.lora.down.weight"], trained[f"unet.{module}.lora.up.weight"]
    m = trained[f"unet.{module}.lora_magnitude_vector"]
    layer = pipe.unet.get_submodule(module)
    w = layer.base_layer.weight.detach()
    adapted = w + (2.0 / 4) * b @ a
    want_w = m[:, None] * adapted / adapted.norm(dim=1, keepdim=True)
    assert not torch.allclose(m, w.norm(dim=1))  # the magnitudes trained away from ‖W‖
    x = torch.randn(3, w.shape[1])
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ want_w.T, rtol=1e-4, atol=1e-5)
    # the story's path: the LoRA at the story's scale, as a peft branch (CPU) or fused into the weights (CUDA)
    from kolors_job.render.pipeline import apply_lora

    outs = []
    for fuse in (False, True):
        story = KolorsPipeline.from_pretrained(tiny_model)
        apply_lora(story, tmp_path, 0.5, fuse=fuse)
        with torch.no_grad():
            outs.append(story.unet.get_submodule(module)(x))
    adapted = w + 0.5 * (2.0 / 4) * b @ a
    torch.testing.assert_close(outs[0], x @ (m[:, None] * adapted / adapted.norm(dim=1, keepdim=True)).T,
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)


def test_ema_is_the_exported_lora_and_follows_emamodels_warmup(dora_ema: dict[str, Any]) -> None:
    """Update n uses decay min(ema_decay, (1 + n)/(10 + n)) after the first (decay 0: a copy), ``EMAModel``'s
    rule: the exported LoRA is the average of the checkpointed trained weights, not the last of them."""
    ckpts = dora_ema["work"] / "kept"
    live = [load_file(str(ckpts / f"step-{n}" / LORA_WEIGHT_NAME)) for n in (1, 2, 3)]
    final = load_file(str(dora_ema["result"].lora_dir / LORA_WEIGHT_NAME))
    ema = {k: v.clone() for k, v in live[0].items()}  # update 1: decay 0
    for n, weights in ((2, live[1]), (3, live[2])):
        decay = min(0.9999, (1 + (n - 1)) / (10 + (n - 1)))
        for k in ema:
            ema[k] = ema[k] - (1 - decay) * (ema[k] - weights[k])
    assert final.keys() == ema.keys()
    for k in final:
        torch.testing.assert_close(final[k], ema[k], rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(final[k], live[2][k]) for k in final)  # not simply the last weights
    ema_ckpt = load_file(str(ckpts / "step-3" / "ema" / LORA_WEIGHT_NAME))
    assert all(torch.equal(ema_ckpt[k], final[k]) for k in final)  # the checkpoint's export copy
    assert dora_ema["result"].summary()["options"]["ema_decay"] == 0.9999


def test_dora_with_ema_resumes_bit_for_bit(
    dora_ema: dict[str, Any], tiny_model: Path, items: list[ImageItem], tmp_path: Path
) -> None:
    """Stopped after step 1 and resumed: the EMA state (shadow weights, update count) and the DoRA magnitudes
    come back from the checkpoint, so the exported LoRA equals the uninterrupted run's byte for byte."""
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] >= 1

    spec = _ema_dora_spec()
    first = train_lora(tiny_model, items, spec, work_dir=tmp_path, device="cpu", progress=False, should_stop=stop)
    assert first.interrupted and first.steps == 1
    assert first.lora_dir == tmp_path / "checkpoints" / "step-1" / "ema"  # an interrupted run's LoRA: the average
    second = train_lora(tiny_model, items, spec, work_dir=tmp_path, device="cpu", progress=False,
                        resume_from=tmp_path / "checkpoints" / "step-1")
    full = dora_ema["result"]
    assert second.losses == full.losses and second.lora_sha256 == full.lora_sha256
    assert (second.lora_dir / LORA_WEIGHT_NAME).read_bytes() == (full.lora_dir / LORA_WEIGHT_NAME).read_bytes()
    assert math.isfinite(second.losses[-1])


def test_the_model_card_lists_the_options_that_are_on() -> None:
    """The card's settings table and each exported file's ``kolors_job.extra`` name the options a run used;
    a run without any (the reference, the demo) gets nothing, so its files stay byte for byte what they were."""
    from kolors_job.train.export import _option_notes

    assert _option_notes(TrainSpec()) == {}
    on = TrainSpec(optimizer="prodigy", loss_weighting="min_snr", snr_gamma=3, noise_offset=0.05, dora=True,
                   ema=True, ema_decay=0.999)
    assert _option_notes(on) == {
        "optimizer": "prodigy", "loss weighting": "min-SNR, gamma 3", "noise offset": "0.05", "DoRA": "yes",
        "EMA": "decay 0.999 (the exported weights)",
    }
