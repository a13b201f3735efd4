"""Drawing with Kolors and a LoRA, reproducibly: the pipeline (loaded once, the LoRA applied), every prompt
encoded alone, and one call per batch. The story (:mod:`kolors_job.story.draw`), the validation frames and
``kolors-job sample`` all draw through here, so a frame drawn at the story's settings is the story's frame.

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
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kolors_job.core.device import resolve_device
from kolors_job.export.lora_io import LORA_WEIGHT_NAME
from kolors_job.manifest.story import StorySpec
from kolors_job.models.prompts import PromptEmbeds, encode_captions

if TYPE_CHECKING:
    from diffusers import KolorsPipeline

log = logging.getLogger(__name__)

ADAPTER_NAME = "story"


@dataclass(frozen=True)
class ImageJob:
    """One image to draw: frame ``index`` (1-based), candidate ``k``."""

    index: int
    k: int
    prompt: str
    negative_prompt: str
    seed: int




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


def sampler_record(model_dir: Path, story: StorySpec, device: str | torch.device | None = None) -> dict[str, Any]:
    """What the story samples with (prompts.json, report.json): the sampler's name and class, the timesteps
    it visits and its last sigma, the sampling dtype and whether the LoRA is fused (and in which dtype).

    Built by the same functions the story uses, from the model's scheduler config only (no weights)."""
    from diffusers import DDPMScheduler

    from kolors_job.models.schedulers import make_scheduler, sampler_timesteps

    dev = resolve_device(device)
    config = DDPMScheduler.load_config(Path(model_dir), subfolder="scheduler")
    scheduler = make_scheduler(story.scheduler, config)
    explicit = sampler_timesteps(story.scheduler, story.steps, config)
    if explicit is not None:
        scheduler.set_timesteps(timesteps=explicit)
    else:
        scheduler.set_timesteps(story.steps)
    sigmas = getattr(scheduler, "sigmas", None)
    dtype = sampling_dtype(dev, story.precision)
    fused = fuses_lora(dev, dtype)
    return {
        "name": story.scheduler,
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
    story: StorySpec,
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
    dtype = sampling_dtype(dev, story.precision)
    comps = load_kolors_components(Path(model_dir), vae_path=vae_dir, dtype=dtype, cast=False)
    # The LoRA is applied (and merged) on the CPU in the sampling dtype, so the UNet and the small VAE are cast here;
    # ChatGLM, the largest part, stays the mapped files until encode_texts casts it on its way to the GPU.
    place(comps.unet, "cpu", dtype)
    place(comps.vae, "cpu", dtype)
    pipe = make_pipeline(comps, story.scheduler)
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        apply_lora(pipe, Path(lora_dir), story.lora_scale, fuse=fuses_lora(dev, dtype, fused))
    return pipe


def to_device(
    pipe: KolorsPipeline, story: StorySpec, device: str | torch.device | None = None, *, fused: bool | None = None
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
    if story.compile and dev.type != "cuda":
        log.info("spec.story.compile ignored on %s", dev.type)
    elif story.compile:
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
    story: StorySpec,
    *,
    texts: dict[str, PromptEmbeds] | None = None,
    output_type: str = "pil",
) -> list[Any]:
    """One pipeline call for ``jobs`` (same size): per-image conditioning and generators.

    ``texts`` (from :func:`encode_texts`) lets the text encoder leave the GPU before denoising.
    """
    from kolors_job.models.schedulers import sampler_timesteps

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
        num_inference_steps=story.steps,
        timesteps=sampler_timesteps(story.scheduler, story.steps, pipe.scheduler.config),  # None: its own grid
        guidance_scale=story.cfg_scale,
        width=story.width,
        height=story.height,
        generator=generators,
        output_type=output_type,
    )
    return list(out.images)
