"""Story sampling on the tiny random Kolors with a freshly trained LoRA (CPU, 64², 3 steps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from kolors_job.data.images import ImageItem
from kolors_job.manifest.story import Frame, StorySpec
from kolors_job.manifest.train import TrainSpec
from kolors_job.models.schedulers import reference_timesteps
from kolors_job.models.tiny import build_tiny_kolors
from kolors_job.render.pipeline import encode_texts, load_story_pipeline, render, to_device
from kolors_job.story.draw import CANDIDATE_SEED_STRIDE, FrameResult, generate_story, plan_jobs
from kolors_job.train.loop import train_lora

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2, 5, 0, 1, 7, 0)  # the reference notebook's


@pytest.fixture(scope="module")
def tiny_model(shared_cache: Path) -> Path:
    return build_tiny_kolors(shared_cache / "tiny-kolors", seed=0)


@pytest.fixture(scope="module")
def lora(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA trained hard enough (lr 5e-2) to visibly change the tiny model's pixels."""
    root = tmp_path_factory.mktemp("lora")
    rng = np.random.default_rng(1)
    items = []
    for i in range(2):
        path = root / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        items.append(ImageItem(path, "二次元", 64, 64))
    spec = TrainSpec(rank=4, alpha=2.0, learning_rate=5e-2, steps=3, resolution=64, checkpoint_every=1000)
    return train_lora(tiny_model, items, spec, work_dir=root / "work", device="cpu", progress=False).lora_dir


def story(**overrides: Any) -> StorySpec:
    frames = [Frame(prompt=f"二次元，紫色短发小女孩，第{i + 1}幕", seed=s) for i, s in enumerate(SEEDS)]
    frames[2] = frames[2].model_copy(update={"negative_prompt_extra": "扭曲的手指，多余的手指"})
    base: dict[str, Any] = {
        "frames": frames,
        "steps": 3,
        "width": 64,
        "height": 64,
        "cfg_scale": 4.0,
        "batch_size": 4,
        "lora_scale": 0.5,
    }
    return StorySpec(**{**base, **overrides})


def read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_batching_does_not_change_pixels(tiny_model: Path, lora: Path) -> None:
    """Each image has its own generator: batch 4 vs one at a time agree to float rounding (not bitwise:
    CPU kernels block a batch of 4 differently from a batch of 1, re-associating sums)."""
    spec = story(scheduler="euler_a")  # the ancestral sampler draws noise every step: the harder case
    pipe = load_story_pipeline(tiny_model, spec, lora_dir=lora, device="cpu")
    jobs = plan_jobs(spec)[:4]
    batched = np.stack(render(pipe, jobs, spec, output_type="np"))
    single = np.stack([render(pipe, [j], spec, output_type="np")[0] for j in jobs])
    assert np.abs(batched - single).max() < 1e-5


class FreshProcess:
    """Frame 1 drawn by plain diffusers in a new process (the model's own Euler given the reference grid as
    ``timesteps=``), started before the in-process story so that the two run side by side."""

    def __init__(self, model: Path, lora: Path, spec: StorySpec, out: Path) -> None:
        frame = spec.frames[0]
        args = {
            "model": str(model),
            "lora": str(lora),
            "prompt": frame.prompt,
            "negative": spec.negative_for(frame),
            "timesteps": reference_timesteps(spec.steps, 1100),  # the default sampler's grid
            "cfg": spec.cfg_scale,
            "size": spec.width,
            "seed": frame.seed,
            "scale": spec.lora_scale,
            "out": str(out),
        }
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the session's own: it starts warm (tests/procs/)
        self.out, self.log = out, out.with_suffix(".log")
        with self.log.open("w") as log:  # a file, not a pipe: a full pipe would block the child
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.procs.fresh_frame", json.dumps(args)],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def result(self) -> np.ndarray:
        self.proc.wait(timeout=300)
        assert self.proc.returncode == 0, self.log.read_text()[-4000:]
        return np.load(self.out)


@pytest.fixture(scope="module")
def drawn(tiny_model: Path, lora: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("story")
    spec = story(batch_size=1)
    fresh = FreshProcess(tiny_model, lora, spec, out / "fresh.npy")
    seen: list[FrameResult] = []
    try:
        results = generate_story(
            tiny_model, spec, out_dir=out, lora_dir=lora, device="cpu", on_frame=seen.append, progress=False
        )
        yield {"out": out, "results": results, "seen": seen, "spec": spec, "fresh": fresh}
    finally:
        if fresh.proc.poll() is None:
            fresh.proc.kill()
            fresh.proc.wait()


def test_story_writes_every_frame_in_order(drawn: dict[str, Any]) -> None:
    results, spec = drawn["results"], drawn["spec"]
    assert [r.index for r in results] == list(range(1, 9)) and drawn["seen"] == results
    for r, frame in zip(results, spec.frames, strict=True):
        assert r.path == drawn["out"] / "images" / f"{r.index:02d}.png" and r.path.is_file()
        assert (r.prompt, r.seed, r.candidates, r.score) == (frame.prompt, frame.seed, [], None)
        assert r.negative_prompt == spec.negative_for(frame)
    assert results[2].negative_prompt.endswith("，扭曲的手指，多余的手指")


def test_lora_scale_and_the_fused_path(tiny_model: Path, lora: Path) -> None:
    """The LoRA changes pixels; scale 0 is exactly the base model; and the CUDA default (LoRA fused at the
    scale, then QKV fused, channels-last) matches the unfused LoRA."""
    spec = story()
    zero = spec.model_copy(update={"lora_scale": 0.0})
    jobs = plan_jobs(spec)[:2]

    def draw(pipe: Any, s: StorySpec) -> np.ndarray:
        return np.stack(render(pipe, jobs, s, output_type="np"))

    with_lora = draw(load_story_pipeline(tiny_model, spec, lora_dir=lora, device="cpu"), spec)
    at_zero = draw(load_story_pipeline(tiny_model, zero, lora_dir=lora, device="cpu"), zero)
    pipe = load_story_pipeline(tiny_model, zero, lora_dir=None, device="cpu")
    base = draw(pipe, zero)
    assert np.array_equal(at_zero, base)
    assert np.abs(with_lora - base).max() > 0.02

    fast = load_story_pipeline(tiny_model, spec, lora_dir=lora, device="cpu", fused=True)
    to_device(fast, spec, "cpu", fused=True)  # what CUDA gets by default: LoRA merged, q/k/v fused, channels-last
    assert not any("lora" in name for name, _ in fast.unet.named_parameters())  # merged, wrappers gone
    assert fast.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.fused_projections
    assert np.abs(draw(fast, spec) - with_lora).max() < 1e-4


def test_the_cuda_story_in_fp16_from_the_fp16_only_layout(hub_artifacts: dict[str, Path], lora: Path) -> None:
    """The story as CUDA runs it by default (fp16; LoRA merged on the host; q/k/v fused; channels-last;
    ChatGLM left as its mapped fp16 files until it is placed), from the files Kolors-diffusers ships, here
    on the CPU: the same pictures as the fp32 unfused story of those weights, to fp16's precision."""
    kolors = hub_artifacts["kolors"]  # fp16-variant files only
    spec, ref_spec = story(precision="fp16"), story(precision="fp32")
    jobs = plan_jobs(spec)[:2]
    fast = load_story_pipeline(kolors, spec, lora_dir=lora, device="cpu", fused=True)
    assert fast.unet.dtype == torch.float16 and fast.text_encoder.dtype == torch.float16
    texts = encode_texts(fast, jobs, "cpu")
    to_device(fast, spec, "cpu", fused=True)
    assert not any("lora" in name for name, _ in fast.unet.named_parameters())
    assert fast.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.fused_projections
    got = np.stack(render(fast, jobs, spec, texts=texts, output_type="np"))
    ref = load_story_pipeline(kolors, ref_spec, lora_dir=lora, device="cpu")
    want = np.stack(render(ref, jobs, ref_spec, output_type="np"))
    assert ref.text_encoder.dtype == torch.float32  # the fp16 files, upcast when they were placed
    base = np.stack(render(load_story_pipeline(kolors, ref_spec, lora_dir=None, device="cpu"), jobs, ref_spec,
                           output_type="np"))  # fmt: skip
    assert np.isfinite(got).all()
    lora_effect, fp16_error = np.abs(want - base).max(), np.abs(got - want).max()
    print(f"\nfp16 story vs fp32: max error {fp16_error:.4f}; the LoRA moves pixels by {lora_effect:.4f}")
    assert fp16_error < 0.02 < lora_effect, (fp16_error, lora_effect)


def test_skip_leaves_existing_frames_alone(
    drawn: dict[str, Any], tiny_model: Path, lora: Path, tmp_path: Path
) -> None:
    results = generate_story(
        tiny_model,
        drawn["spec"],
        out_dir=tmp_path,
        lora_dir=lora,
        device="cpu",
        skip=set(range(1, 8)),
        progress=False,
    )
    assert [r.index for r in results] == [8]
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["08.png"]
    assert np.array_equal(read(results[0].path), read(drawn["results"][7].path))
    assert (
        generate_story(tiny_model, drawn["spec"], out_dir=tmp_path, lora_dir=lora, skip=set(range(1, 9)))
        == []
    )


class BrightnessScorer:
    """Stands in for the aesthetic predictor: deterministic, and different for every image."""

    def __init__(self) -> None:
        self.calls: list[list[float]] = []

    def score(self, images: list[Image.Image]) -> list[float]:
        scores = [float(np.asarray(im, dtype=np.float64).mean()) for im in images]
        self.calls.append(scores)
        return scores


def test_best_of_keeps_the_argmax(tiny_model: Path, lora: Path, tmp_path: Path) -> None:
    spec = story(best_of=3, steps=2)
    with pytest.raises(ValueError, match="scorer"):
        generate_story(tiny_model, spec, out_dir=tmp_path, lora_dir=lora)
    scorer = BrightnessScorer()
    results = generate_story(
        tiny_model, spec, out_dir=tmp_path, lora_dir=lora, device="cpu", scorer=scorer, progress=False
    )
    assert len(results) == 8 and len(scorer.calls) == 8
    for r, frame, scores in zip(results, spec.frames, scorer.calls, strict=True):
        seeds = [frame.seed + k * CANDIDATE_SEED_STRIDE for k in range(3)]
        best = int(np.argmax(scores))
        assert (r.seed, r.score) == (seeds[best], scores[best])
        assert r.path == tmp_path / "images" / f"{r.index:02d}.png"
        assert [c[0] for c in r.candidates] == [s for k, s in enumerate(seeds) if k != best]
        for seed, path, score in r.candidates:
            assert path == tmp_path / "images" / "candidates" / f"{r.index:02d}-{seed}.png"
            assert score is not None and score <= r.score
            assert BrightnessScorer().score([Image.open(path)]) == [score]  # the file is the scored image
        assert BrightnessScorer().score([Image.open(r.path)]) == [r.score]
    assert len(list((tmp_path / "images" / "candidates").iterdir())) == 16


def test_fresh_process_reproduces_frame_1(drawn: dict[str, Any]) -> None:
    """Plain diffusers in a new process (from_pretrained, load_lora_weights, scale via cross_attention_kwargs)
    draws frame 1 exactly as generate_story did (batch 1)."""
    assert np.array_equal(drawn["fresh"].result(), read(drawn["results"][0].path))


def test_out_of_memory_halves_the_batch_and_keeps_the_pixels(
    drawn: dict[str, Any], tiny_model: Path, lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A card too small for the batch: the CUDA allocator's OutOfMemoryError (raised here by our own render
    for batches over 2) makes the story retry with halved batches; the frames equal the batch-1 ones."""
    import kolors_job.story.draw as draw

    real_render, tried = draw.render, []

    def small_card(pipe: Any, jobs: Any, *args: Any, **kwargs: Any) -> Any:
        tried.append(len(jobs))
        if len(jobs) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_render(pipe, jobs, *args, **kwargs)

    monkeypatch.setattr(draw, "render", small_card)
    spec = drawn["spec"].model_copy(update={"batch_size": 8})
    results = generate_story(tiny_model, spec, out_dir=tmp_path, lora_dir=lora, device="cpu", progress=False)
    assert tried == [8, 4, 2, 2, 2, 2]
    assert "retrying with batches of 2" in caplog.text
    assert [r.index for r in results] == list(range(1, 9))
    for r, ref in zip(results, drawn["results"], strict=True):
        assert np.abs(read(r.path).astype(int) - read(ref.path).astype(int)).max() <= 1


def test_an_added_sampler_is_one_table_entry(tiny_model: Path, lora: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/architecture.md's "add a sampler" recipe, followed: one entry in ``models.SCHEDULERS`` and the
    manifest accepts the name (and lists it in the schema), the story pipeline samples with that class, and
    the frames differ from another sampler's; without the entry the manifest refuses it again."""
    from pydantic import ValidationError

    from kolors_job.manifest.spec import Manifest
    from kolors_job.models.schedulers import SCHEDULERS, Sampler

    with pytest.raises(ValidationError, match="Input should be"):
        story(scheduler="heun")
    monkeypatch.setitem(SCHEDULERS, "heun", Sampler("HeunDiscreteScheduler", {}))
    assert "heun" in json.dumps(Manifest.model_json_schema())
    spec = story(scheduler="heun")
    pipe = load_story_pipeline(tiny_model, spec, lora_dir=lora, device="cpu")
    assert type(pipe.scheduler).__name__ == "HeunDiscreteScheduler"
    jobs = plan_jobs(spec)[:1]
    heun = render(pipe, jobs, spec, output_type="np")[0]
    euler_spec = story(scheduler="euler")
    euler = render(load_story_pipeline(tiny_model, euler_spec, lora_dir=lora, device="cpu"), jobs, euler_spec,
                   output_type="np")[0]  # fmt: skip
    assert np.isfinite(heun).all() and np.abs(heun - euler).max() > 1e-3
    monkeypatch.delitem(SCHEDULERS, "heun")
    with pytest.raises(ValidationError):
        story(scheduler="heun")
