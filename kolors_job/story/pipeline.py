"""The story stage: draw each frame with Kolors + the trained LoRA, reproducibly, in batches.

Reproducibility rules (why the code looks like this):

* every image has its own ``torch.Generator(device).manual_seed(seed)`` and a batch passes a *list* of
  them, so the initial noise of an image depends on its seed only, never on its batch neighbours (the
  noise is drawn on the device, as DiffSynth's reference pipeline does: GPU and CPU runs differ);
* each prompt and negative prompt is encoded alone, once, with ``encode_prompt`` (then ChatGLM leaves
  the GPU), so the conditioning is bit-identical to a plain one-image pipeline call;
* the LoRA strength is ``set_adapters(..., adapter_weights=[lora_scale])``: peft then scales the LoRA
  branch by ``lora_scale * alpha / r`` (alpha from the file's metadata), and ``lora_scale = 0`` gives the
  base model's pixels exactly;
* the default sampler (``reference``) visits DiffSynth's Kolors DDIM timesteps and ends fully clean, in
  fp16 on CUDA like the reference (``story.precision``);
* on CUDA the LoRA is first *fused* into the weights at that scale and unloaded — only in fp16/fp32, whose
  mantissa keeps it; in bf16 it stays a peft branch — then the q/k/v projections are fused
  (``fuse_qkv_projections`` copies the base q/k/v weights into one matrix and would silently bypass an
  unfused peft LoRA on q/k/v, so it is skipped while one remains); on the CPU (tests, demo) it stays a
  peft adapter, so ``lora_scale = 0`` is the base model bit for bit. Both agree to float rounding (tested).

Frames in ``skip`` are already in the output and are not drawn again. With ``best_of = N`` each frame
draws N candidates (seeds ``seed + k * 10007``), the scorer picks the best for ``images/NN.png`` and
the others go to ``images/candidates/NN-<seed>.png``.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from kolors_job.export.lora_io import LORA_WEIGHT_NAME
from kolors_job.manifest.spec import StorySpec
from kolors_job.storage.atomic import atomic_target
from kolors_job.train.latents import PromptEmbeds, encode_captions
from kolors_job.train.loop import resolve_device

if TYPE_CHECKING:
    import numpy as np
    from diffusers import KolorsPipeline
    from PIL import Image

log = logging.getLogger("kolors_job.story.pipeline")

CANDIDATE_SEED_STRIDE = 10007
"""Candidate k of a frame uses ``seed + k * 10007``: far from the small seeds stories use for other frames."""
ADAPTER_NAME = "story"


class Scorer(Protocol):
    def score(self, images: Sequence[Image.Image]) -> list[float]: ...


@dataclass
class FrameResult:
    index: int
    """1-based frame number (``images/NN.png``)."""
    prompt: str
    negative_prompt: str
    seed: int
    """Seed of the kept image (the frame's seed unless a best-of candidate won)."""
    path: Path
    candidates: list[tuple[int, Path, float | None]] = field(default_factory=list)
    """The *rejected* best-of candidates ``(seed, path under images/candidates/, score)``."""
    score: float | None = None


@dataclass(frozen=True)
class ImageJob:
    """One image to draw: frame ``index`` (1-based), candidate ``k``."""

    index: int
    k: int
    prompt: str
    negative_prompt: str
    seed: int


def plan_jobs(spec: StorySpec, skip: Collection[int] = frozenset()) -> list[ImageJob]:
    jobs = []
    for index, frame in enumerate(spec.frames, start=1):
        if index in skip:
            continue
        for k in range(spec.best_of):
            jobs.append(
                ImageJob(
                    index, k, frame.prompt, spec.negative_for(frame), frame.seed + k * CANDIDATE_SEED_STRIDE
                )
            )
    return jobs


_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
LORA_FUSION_DTYPES = (torch.float16, torch.float32)
"""Dtypes whose mantissa keeps a fused LoRA: bf16's 8 bits round small updates ``W + s·BA`` back to ``W``
(measured on the tiny model in tests/test_reference_oracle.py), so in bf16 the LoRA stays a separate branch."""


def sampling_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """``auto``: fp16 on CUDA, the reference's sampling dtype (and its first noise draw bit for bit); fp32 on
    CPU. fp16 is safe for decoding: an fp16-fix VAE (``force_upcast: false``) stays fp16 and the stock SDXL
    VAE (``force_upcast: true``) is upcast to fp32 for the decode by the pipeline itself."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return _DTYPES[precision]


def _fast(dev: torch.device, fused: bool | None) -> bool:
    """The speed path (LoRA merged where the dtype allows, fused q/k/v, channels-last): CUDA by default."""
    return dev.type == "cuda" if fused is None else fused


def fuses_lora(dev: torch.device, dtype: torch.dtype, fused: bool | None = None) -> bool:
    """Whether the LoRA is merged into the weights: on the speed path, in a dtype that keeps it."""
    return _fast(dev, fused) and dtype in LORA_FUSION_DTYPES


def sampler_record(model_dir: Path, spec: StorySpec, device: str | torch.device | None = None) -> dict[str, Any]:
    """What the story samples with (prompts.json, report.json): the sampler's name and class, the timesteps
    it visits and its last sigma, the sampling dtype and whether the LoRA is fused (and in which dtype).

    Built by the same functions the story uses, from the model's scheduler config only (no weights)."""
    from diffusers import DDPMScheduler

    from kolors_job.models.loading import make_scheduler, sampler_timesteps

    dev = resolve_device(device)
    config = DDPMScheduler.load_config(Path(model_dir), subfolder="scheduler")
    scheduler = make_scheduler(spec.scheduler, config)
    explicit = sampler_timesteps(spec.scheduler, spec.steps, config)
    if explicit is not None:
        scheduler.set_timesteps(timesteps=explicit)
    else:
        scheduler.set_timesteps(spec.steps)
    sigmas = getattr(scheduler, "sigmas", None)
    dtype = sampling_dtype(dev, spec.precision)
    fused = fuses_lora(dev, dtype)
    return {
        "name": spec.scheduler,
        "class": type(scheduler).__name__,
        "timesteps": [_number(t) for t in scheduler.timesteps.tolist()],
        "final_sigma": None if sigmas is None else _number(sigmas[-1].item()),
        "precision": _dtype_name(dtype),
        "lora_fused": fused,
        "lora_fusion_dtype": _dtype_name(dtype) if fused else None,
    }


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else round(float(x), 4)


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]


def load_story_pipeline(
    model_dir: Path,
    spec: StorySpec,
    *,
    lora_dir: Path | None,
    vae_dir: Path | None = None,
    device: str | torch.device | None = None,
    fused: bool | None = None,
) -> KolorsPipeline:
    """The sampling pipeline in ``spec.precision`` with the LoRA at ``spec.lora_scale``, every module still on
    the CPU.

    ChatGLM (12.5 GB in bf16) then visits the GPU alone (:func:`encode_texts`) and is dropped before the
    UNet and VAE arrive (:func:`to_device`), so the peak is the larger of the two, not their sum (~18 GB):
    that is what lets a 16 GB card draw the story at 1024². ``fused`` (default: on CUDA) merges the LoRA
    into the weights when the dtype keeps it (:func:`fuses_lora`), so :func:`to_device` can fuse the q/k/v
    projections; pass the same to both.
    """
    from kolors_job.models.loading import load_kolors_components, make_pipeline, place

    dev = resolve_device(device)
    dtype = sampling_dtype(dev, spec.precision)
    comps = load_kolors_components(Path(model_dir), vae_path=vae_dir, dtype=dtype, cast=False)
    # The LoRA is applied (and merged) on the CPU in the sampling dtype, so the UNet and the small VAE are cast here;
    # ChatGLM, the largest part, stays the mapped files until encode_texts casts it on its way to the GPU.
    place(comps.unet, "cpu", dtype)
    place(comps.vae, "cpu", dtype)
    pipe = make_pipeline(comps, spec.scheduler)
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        apply_lora(pipe, Path(lora_dir), spec.lora_scale, fuse=fuses_lora(dev, dtype, fused))
    return pipe


def to_device(
    pipe: KolorsPipeline, spec: StorySpec, device: str | torch.device | None = None, *, fused: bool | None = None
) -> None:
    """UNet and VAE to ``device`` (the text encoder stays where it is), made fast there.

    ``fused`` (default: on CUDA): channels-last, and q/k/v in one matmul (``fuse_qkv_projections``) unless an
    unfused LoRA branch is still there (bf16), which the fused projection would bypass — 116 → 65 ms per
    CFG step on an H100 for the two, no compile needed. ``spec.compile`` (CUDA only) adds ``torch.compile``
    of the repeated blocks (65 → 36 ms, after a compile cached on the cache volume).
    """
    dev = resolve_device(device)
    pipe.unet.to(dev)
    pipe.vae.to(dev)
    # Decode a batch one image at a time: eight 1024² decodes at once need more than a 24 GB card has
    # left beside the UNet, and the decode is a small part of the story's time.
    pipe.vae.enable_slicing()
    if _fast(dev, fused):
        if not getattr(pipe.unet, "peft_config", None):  # LoRA merged and unloaded (or none): nothing bypassed
            pipe.unet.fuse_qkv_projections()
        pipe.unet.to(memory_format=torch.channels_last)
    if spec.compile and dev.type != "cuda":
        log.info("spec.story.compile ignored on %s", dev.type)
    elif spec.compile:
        # Default mode (max-autotune's compile never pays back here), and only the repeated transformer
        # blocks: compile time is job time (docs/design.md §2), and the blocks are most of the FLOPs.
        if getattr(pipe.unet, "_repeated_blocks", None):
            pipe.unet.compile_repeated_blocks()
        else:
            pipe.unet = torch.compile(pipe.unet)


def apply_lora(pipe: KolorsPipeline, lora_dir: Path, scale: float, *, fuse: bool = False) -> None:
    """Load the LoRA (α/r from its metadata) at ``scale``; ``fuse`` merges it into the base weights.

    Fusing is required before ``fuse_qkv_projections`` (which would bypass an unfused q/k/v LoRA) and
    saves the LoRA branch's matmuls; unfused keeps ``scale`` changeable and ``scale = 0`` exact.
    """
    # Kolors' LoRA is UNet-only; silence diffusers' "no LoRA keys for ChatGLMModel" warning about it.
    lora_log = logging.getLogger("diffusers.loaders.lora_base")
    level = lora_log.level
    lora_log.setLevel(logging.ERROR)
    try:
        # weight_name explicit: with HF_HUB_OFFLINE=1 diffusers refuses to guess the file name
        pipe.load_lora_weights(str(lora_dir), weight_name=LORA_WEIGHT_NAME, adapter_name=ADAPTER_NAME)
    finally:
        lora_log.setLevel(level)
    if fuse:
        pipe.fuse_lora(components=["unet"], lora_scale=scale, adapter_names=[ADAPTER_NAME])
        pipe.unload_lora_weights()  # the fused weights stay; the peft wrappers go
    else:
        pipe.set_adapters([ADAPTER_NAME], adapter_weights=[scale])


def encode_texts(
    pipe: KolorsPipeline, jobs: Sequence[ImageJob], device: str | torch.device | None = None
) -> dict[str, PromptEmbeds]:
    """Every distinct prompt and negative prompt, each encoded alone exactly as the pipeline encodes a
    single prompt (so a frame's conditioning never depends on its batch), kept on the CPU.

    The text encoder is moved to ``device`` (default: the UNet's), in the UNet's dtype, and left there; on a CPU
    while the UNet is half precision for a GPU (the memory plan's choice on a small card) it computes in bf16 and
    the embeddings are cast to the UNet's dtype.
    """
    from kolors_job.models.loading import place

    dev = torch.device(device) if device else pipe.unet.device
    half_on_cpu = dev.type == "cpu" and pipe.unet.dtype == torch.float16
    place(pipe.text_encoder, dev, torch.bfloat16 if half_on_cpu else pipe.unet.dtype)
    texts = [t for j in jobs for t in (j.prompt, j.negative_prompt)]
    return encode_captions(pipe, texts, device=dev, dtype=pipe.unet.dtype if half_on_cpu else None)


def render(
    pipe: KolorsPipeline,
    jobs: Sequence[ImageJob],
    spec: StorySpec,
    *,
    texts: dict[str, PromptEmbeds] | None = None,
    output_type: str = "pil",
) -> list[Any]:
    """One pipeline call for ``jobs`` (same size): per-image conditioning and generators.

    ``texts`` (from :func:`encode_texts`) lets the text encoder leave the GPU before denoising.
    """
    from kolors_job.models.loading import sampler_timesteps

    dev = pipe.unet.device
    texts = texts if texts is not None else encode_texts(pipe, jobs)

    def stack(which: str, attr: str) -> torch.Tensor:
        return torch.stack([getattr(texts[getattr(j, which)], attr) for j in jobs]).to(dev)

    generators = [torch.Generator(dev).manual_seed(j.seed) for j in jobs]
    out = pipe(
        prompt_embeds=stack("prompt", "embeds"),
        pooled_prompt_embeds=stack("prompt", "pooled"),
        negative_prompt_embeds=stack("negative_prompt", "embeds"),
        negative_pooled_prompt_embeds=stack("negative_prompt", "pooled"),
        num_inference_steps=spec.steps,
        timesteps=sampler_timesteps(spec.scheduler, spec.steps, pipe.scheduler.config),  # None: its own grid
        guidance_scale=spec.cfg_scale,
        width=spec.width,
        height=spec.height,
        generator=generators,
        output_type=output_type,
    )
    return list(out.images)


def _save_png(image: Image.Image, path: Path) -> Path:
    """Write then rename: an interrupted run never leaves a truncated PNG that looks like a finished frame."""
    with atomic_target(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def generate_story(
    model_dir: Path,
    spec: StorySpec,
    *,
    out_dir: Path,
    lora_dir: Path | None,
    vae_dir: Path | None = None,
    device: str | None = None,
    skip: Collection[int] = frozenset(),
    on_frame: Callable[[FrameResult], None] | None = None,
    scorer: Scorer | None = None,
    progress: bool = True,
    text_encoder_device: str | None = None,
    vae_tiling: bool = False,
) -> list[FrameResult]:
    """Draw the story's frames into ``out_dir/images/NN.png``; returns the frames drawn (not the skipped).

    ``text_encoder_device`` (``cpu``: ChatGLM encodes there) and ``vae_tiling`` come from the memory plan.

    ``on_frame`` is called once per frame as soon as its files exist (the runner uploads them), in
    frame order within each batch. ``scorer`` is required when ``best_of > 1``; with ``best_of = 1``
    it is optional and only fills ``score``.
    """
    if spec.best_of > 1 and scorer is None:
        raise ValueError("spec.story.best_of > 1 needs an aesthetic scorer to pick the best candidate")
    start = time.monotonic()
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    jobs = plan_jobs(spec, skip)
    if not jobs:
        log.info("story: every frame already exists; nothing to draw")
        return []
    dev = resolve_device(device)
    pipe = load_story_pipeline(model_dir, spec, lora_dir=lora_dir, vae_dir=vae_dir, device=dev)
    texts = encode_texts(pipe, jobs, text_encoder_device or dev)  # ChatGLM on the GPU alone ...
    if dev.type == "cuda":  # ... and gone (12.5 GB; denoising takes embeddings) before the UNet and VAE arrive
        pipe.text_encoder = None
        gc.collect()
        torch.cuda.empty_cache()
    to_device(pipe, spec, dev)
    if vae_tiling:
        from kolors_job.plan.simulate import enable_tiling

        enable_tiling(pipe.vae, spec.height, spec.width)
    log.info(
        "story",
        extra={
            "frames": len({j.index for j in jobs}),
            "images": len(jobs),
            "batch_size": spec.batch_size,
            "device": str(pipe.unet.device),
            "dtype": str(pipe.unet.dtype),
            "lora": str(lora_dir),
        },
    )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="story", unit="img", dynamic_ncols=True)
        # Under it, the pipeline's own bar: the denoising steps of the batch being drawn (minutes on an A10).
        pipe.set_progress_bar_config(disable=False, leave=False, desc="denoise", dynamic_ncols=True)

    results: list[FrameResult] = []
    pending: dict[int, list[tuple[ImageJob, Image.Image]]] = {}
    try:
        done, size = 0, spec.batch_size
        while done < len(jobs):
            batch = jobs[done : done + size]
            t0 = time.monotonic()
            try:
                images = render(pipe, batch, spec, texts=texts)
            except torch.OutOfMemoryError:
                if size == 1:
                    raise
                # A smaller card than the batch was sized for: halve it and redraw. Each image has its own
                # generator, so the pixels do not depend on the batch size (to float rounding).
                size = max(1, size // 2)
                log.warning("story: out of GPU memory; retrying with batches of %d", size, extra={"batch_size": size})
                gc.collect()
                torch.cuda.empty_cache()
                continue
            done += len(batch)
            log.info("batch", extra={"images": len(batch), "seconds": round(time.monotonic() - t0, 3)})
            if bar is not None:
                bar.update(len(batch))
            for job, image in zip(batch, images, strict=True):
                pending.setdefault(job.index, []).append((job, image))
            for index in sorted(pending):
                if len(pending[index]) == spec.best_of:
                    result = _finish_frame(pending.pop(index), images_dir, scorer)
                    results.append(result)
                    log.info(
                        "frame",
                        extra={
                            "index": result.index,
                            "seed": result.seed,
                            "score": result.score,
                            "path": str(result.path),
                        },
                    )
                    if on_frame is not None:
                        on_frame(result)
    finally:
        if bar is not None:
            bar.close()
        del pipe
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    log.info("story done", extra={"frames": len(results), "seconds": round(time.monotonic() - start, 3)})
    return results


def _finish_frame(
    candidates: list[tuple[ImageJob, Image.Image]], images_dir: Path, scorer: Scorer | None
) -> FrameResult:
    """Score, keep the argmax (first on ties: the frame's own seed) as NN.png, the rest as candidates."""
    candidates.sort(key=lambda c: c[0].k)
    scores: list[float | None] = (
        [float(s) for s in scorer.score([im for _, im in candidates])]
        if scorer is not None
        else [None] * len(candidates)
    )
    best = max(range(len(candidates)), key=lambda i: (scores[i] if scores[i] is not None else 0.0, -i))
    job, image = candidates[best]
    path = _save_png(image, images_dir / f"{job.index:02d}.png")
    rejected = []
    for i, (cand, cand_image) in enumerate(candidates):
        if i != best:
            p = _save_png(cand_image, images_dir / "candidates" / f"{cand.index:02d}-{cand.seed}.png")
            rejected.append((cand.seed, p, scores[i]))
    return FrameResult(
        index=job.index,
        prompt=job.prompt,
        negative_prompt=job.negative_prompt,
        seed=job.seed,
        path=path,
        candidates=rejected,
        score=scores[best],
    )


def as_array(images: Sequence[Image.Image]) -> np.ndarray:
    """Stack PIL frames into one uint8 array (tests compare frames with ``np.array_equal``)."""
    import numpy as np

    return np.stack([np.asarray(im.convert("RGB")) for im in images])
