"""The job's GPU work at full size, run on fake tensors: each ``Sim`` is one stage's device work as our code does
it (ChatGLM encode, VAE encode, a CFG step, VAE decode, scoring; a training step is ``train_step``'s), and returns
the bytes live when it started and at its peak.

Modules are built on the meta device from the real configs (:mod:`kolors_job.plan.meta`), then their weights
become fake CPU tensors (:func:`kolors_job.plan.fake.materialize`); :mod:`kolors_job.plan.table` caches each
result under :meth:`Sim.key`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kolors_job.models.loading import enable_tiling
from kolors_job.plan.fake import LiveMemory, materialize, simulation
from kolors_job.plan.meta import (
    DTYPES,
    SEQ,
    Result,
    Sim,
    aesthetic_on_meta,
    autocast,
    module_tensors,
    text_encoder_on_meta,
    unet_on_meta,
    vae_on_meta,
    weights_as,
)

__all__ = ["Count", "Denoise", "ScoreImages", "TextEncode", "VaeDecode", "VaeEncode"]










# ------------------------------------------------------------------------------------------------ modules














# ------------------------------------------------------------------------------------------------ counts


@dataclass(frozen=True)
class Count(Sim):
    """Parameter count of a part (``unet``, ``vae``, ``text_encoder``, ``aesthetic``) or of the UNet's LoRA, kept in
    the table like a measurement (``Result.peak`` holds the count): building ChatGLM even on meta takes seconds.
    ``dora``: the LoRA's count includes DoRA's magnitudes."""

    kind: ClassVar[str] = "count"
    added: ClassVar[tuple[str, ...]] = ("dora",)
    part: str
    rank: int = 0
    targets: tuple[str, ...] = ()
    dora: bool = False

    def run(self) -> Result:
        if self.part == "lora":
            module = unet_on_meta(self.rank, self.targets, self.dora)
            n = sum(p.numel() for p in module.parameters() if p.requires_grad)
        else:
            build = {"unet": unet_on_meta, "vae": vae_on_meta, "text_encoder": text_encoder_on_meta,
                     "aesthetic": aesthetic_on_meta}[self.part]  # fmt: skip
            n = sum(p.numel() for p in build().parameters())
        return Result(start=n, peak=n)


# ------------------------------------------------------------------------------------------------ stages


@dataclass(frozen=True)
class TextEncode(Sim):
    """``KolorsPipeline.encode_prompt`` of ``batch`` prompts (256 tokens) by ChatGLM in ``dtype``, no grad."""

    kind: ClassVar[str] = "text_encode"
    batch: int = 1
    dtype: str = "fp16"

    def run(self) -> Result:
        model = text_encoder_on_meta()
        with simulation(), torch.no_grad():
            materialize(model, weights_as(self.dtype))
            mem = LiveMemory()
            mem.add(module_tensors(model))
            start = mem.reset_peak()
            with mem:
                ids = torch.ones(self.batch, SEQ, dtype=torch.long)
                # No padding mask: ChatGLM reads the mask's values to choose its path (a fake tensor has none);
                # the mask it would build is B × 256² booleans, and at 256 tokens attention is small either way.
                out = model(input_ids=ids, position_ids=ids.clone(), output_hidden_states=True)
                embeds = out.hidden_states[-2].permute(1, 0, 2).clone()
                pooled = out.hidden_states[-1][-1, :, :].clone()
                del out, embeds, pooled
        return Result(start, mem.peak)


@dataclass(frozen=True)
class VaeEncode(Sim):
    """``cache_latents``: ``vae.encode`` of ``batch`` images at ``resolution``² (or ``bucket``, width × height: one
    chunk holds one bucket's images) in ``dtype``, no grad."""

    kind: ClassVar[str] = "vae_encode"
    added: ClassVar[tuple[str, ...]] = ("bucket",)
    batch: int
    resolution: int
    dtype: str
    bucket: tuple[int, ...] = ()

    def run(self) -> Result:
        width, height = self.bucket or (self.resolution, self.resolution)
        vae = vae_on_meta()
        with simulation(), torch.no_grad():
            materialize(vae, weights_as(self.dtype))
            mem = LiveMemory()
            mem.add(module_tensors(vae))
            start = mem.reset_peak()
            with mem:
                pixels = torch.empty(self.batch, 3, height, width, dtype=DTYPES[self.dtype])
                dist = vae.encode(pixels).latent_dist
                mean, std = dist.mean.float(), dist.std.float()
                del dist, mean, std, pixels
        return Result(start, mem.peak)


@dataclass(frozen=True)
class VaeDecode(Sim):
    """The pipeline's decode of ``images`` latents in ``dtype``: one at a time when ``sliced``, in 512² tiles
    when ``tiled``."""

    kind: ClassVar[str] = "vae_decode"
    images: int
    height: int
    width: int
    dtype: str = "fp32"
    sliced: bool = True
    tiled: bool = False

    def run(self) -> Result:
        vae = vae_on_meta()
        if self.sliced:
            vae.enable_slicing()
        if self.tiled:
            enable_tiling(vae, self.height, self.width)
        with simulation(), torch.no_grad():
            materialize(vae, weights_as(self.dtype))
            mem = LiveMemory()
            mem.add(module_tensors(vae))
            start = mem.reset_peak()
            with mem:
                z = torch.empty(self.images, 4, self.height // 8, self.width // 8, dtype=DTYPES[self.dtype])
                image = vae.decode(z / 0.13025, return_dict=False)[0]
                del image, z
        return Result(start, mem.peak)




@dataclass(frozen=True)
class Denoise(Sim):
    """One classifier-free-guidance step of ``KolorsPipeline`` for ``images`` images (the UNet on 2 × images).

    ``lora``: ``fused`` (merged into the weights: the story in fp16/fp32), ``branch`` (peft layers beside the
    weights in ``dtype``: the story in bf16) or ``training`` (the trainer's fp32 LoRA under ``autocast``, as
    validation draws with the UNet being trained). ``fuse_qkv``: ``fuse_qkv_projections()`` on the device, as the
    story's speed path does with the LoRA merged — diffusers keeps the separate q/k/v weights beside the fused
    ones, so it costs weights, not just time. ``dora``: the LoRA (``training`` or ``branch``) is a DoRA, whose
    forward computes each adapted layer's weight norm."""

    kind: ClassVar[str] = "denoise"
    added: ClassVar[tuple[str, ...]] = ("dora",)
    images: int
    height: int
    width: int
    dtype: str
    lora: str = "fused"
    rank: int = 16
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    autocast: str = "no"
    fuse_qkv: bool = False
    dora: bool = False

    def run(self) -> Result:
        unet = unet_on_meta(self.rank if self.lora != "fused" else None, self.targets, self.dora)
        trainable = "fp32" if self.lora == "training" else self.dtype
        dtype = DTYPES[self.dtype]
        n, h, w = self.images, self.height // 8, self.width // 8
        with simulation(), torch.no_grad():
            materialize(unet, weights_as(self.dtype, trainable))
            unet.eval()
            if self.fuse_qkv:
                unet.fuse_qkv_projections()
            mem = LiveMemory()
            mem.add(module_tensors(unet))
            start = mem.reset_peak()
            with mem:
                latents = torch.empty(n, 4, h, w, dtype=dtype)
                embeds = torch.empty(2 * n, SEQ, 4096, dtype=dtype)
                pooled = torch.empty(2 * n, 4096, dtype=dtype)
                time_ids = torch.empty(2 * n, 6, dtype=dtype)
                x = torch.cat([latents] * 2) / 2.0  # scale_model_input makes a new tensor
                added = {"text_embeds": pooled, "time_ids": time_ids}
                with autocast(self.autocast):
                    pred = unet(x, torch.tensor(999.0), encoder_hidden_states=embeds, added_cond_kwargs=added,
                                return_dict=False)[0]  # fmt: skip
                    if self.autocast != "no":
                        pred = pred.float()  # accelerate's wrapper returns fp32
                uncond, text = pred.chunk(2)
                guided = uncond + 4.0 * (text - uncond)
                latents = latents + 0.1 * guided.to(latents.dtype)  # the scheduler's step
                del pred, uncond, text, guided, x, latents
        return Result(start, mem.peak)


@dataclass(frozen=True)
class ScoreImages(Sim):
    """The aesthetic predictor (fp32) on ``images`` 224² images, no grad."""

    kind: ClassVar[str] = "score"
    images: int = 1

    def run(self) -> Result:
        model = aesthetic_on_meta()
        with simulation(), torch.no_grad():
            materialize(model, weights_as("fp32"))
            mem = LiveMemory()
            mem.add(module_tensors(model))
            start = mem.reset_peak()
            with mem:
                out = model(pixel_values=torch.empty(self.images, 3, 224, 224))
                del out
        return Result(start, mem.peak)














