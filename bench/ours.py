"""Our side of ``bench.gpu``, step by step: the trainer's set-up steps (``kolors_job.train.setup``) and
``train_step`` on a full-size UNet with random weights, the story's CFG step eager, fused and compiled, the VAE
decode, the device itself."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import torch

from bench.context import CannotRunError, Ctx, cuda_flags, free
from bench.facts import CAPTION


def m_ours_train(
    ctx: Ctx,
    *,
    batch_size: int = 1,
    ckpt: bool = False,
    channels_last: bool = True,
    fused: bool = True,
    compile_blocks: bool = False,
) -> dict[str, Any]:
    """One optimizer step by the trainer itself: ``train_lora``'s set-up steps (``setup_accelerator``, ``add_lora``,
    ``make_optimizer``, ``make_lr_scheduler``, ``prepare``) on a randomly initialised UNet, then its ``train_step``
    (``make_batch`` on the CPU, the loss under the ``Accelerator``, backward, grad-norm clip, AdamW, lr schedule,
    one host sync for the loss). Only the caches are synthetic (latent posteriors, prompt embeddings), like after
    ``build_caches``. Variants override what the trainer decides (channels-last, fused AdamW, ckpt, compile)."""
    from diffusers import DDPMScheduler

    from kolors_job.data.images import ImageItem
    from kolors_job.manifest.train import TrainSpec
    from kolors_job.models.configs import KOLORS_SCHEDULER_CONFIG
    from kolors_job.models.prompts import PromptEmbeds
    from kolors_job.train import setup as kt
    from kolors_job.train.data import SampleStream
    from kolors_job.train.latents import LatentEntry
    from kolors_job.train.step import Run, train_step

    if compile_blocks and not ctx.cuda:
        raise CannotRunError("compile: CUDA only (train_lora ignores spec.train.compile on the CPU)")
    spec = TrainSpec(
        batch_size=batch_size, resolution=ctx.res, gradient_checkpointing="on" if ckpt else "off",
        compile=compile_blocks,
    )
    precision = kt.resolve_precision(spec.precision, ctx.dev)
    weight_dtype = kt.weight_dtype_for(precision)
    kt._reset_accelerate_state()
    accelerator = kt.setup_accelerator(spec, ctx.dev, precision)
    try:
        with cuda_flags(ctx, benchmark=True):  # train_lora: TF32 + cudnn.benchmark on CUDA
            unet = ctx.build_unet(weight_dtype)
            params, use_ckpt = kt.add_lora(unet, spec, ctx.dev, channels_last=channels_last)
            optimizer = kt.make_optimizer(spec, params, ctx.dev, fused=fused)
            lr_scheduler = kt.make_lr_scheduler(spec, optimizer, n_steps=10**6)
            unet, optimizer = kt.prepare(accelerator, unet, optimizer, lr_scheduler, spec)
            noise_scheduler = DDPMScheduler.from_config(KOLORS_SCHEDULER_CONFIG)
            n_items, lat, r = 8, ctx.latent, ctx.res
            gen = torch.Generator().manual_seed(0)
            items = [ImageItem(Path(f"synthetic-{i}.png"), CAPTION, r, r) for i in range(n_items)]
            latents = {
                (i, False): LatentEntry(
                    mean=torch.randn(4, lat, lat, generator=gen), std=torch.full((4, lat, lat), 0.05),
                    time_ids=(r, r, 0, 0, r, r),
                )
                for i in range(n_items)
            }
            prompts = {
                CAPTION: PromptEmbeds(
                    embeds=torch.randn(ctx.seq, ctx.text_dim, generator=gen).to(weight_dtype),
                    pooled=torch.randn(ctx.pooled_dim, generator=gen).to(weight_dtype),
                )
            }
            run = Run(
                accelerator, spec, unet, optimizer, lr_scheduler, params, noise_scheduler,
                SampleStream(n_items, spec.seed), items, latents, prompts, scaling_factor=0.13025,
                prediction_type="epsilon", num_train_timesteps=int(noise_scheduler.config.num_train_timesteps),
                weight_dtype=weight_dtype, caption_dropout=0.0,
            )
            steps = itertools.count(1)
            losses: list[float] = []
            run.unet.train()

            def step() -> None:
                losses.append(train_step(run, next(steps)).loss)

            ctx.reset_peak()
            res = ctx.bench(step, warmup=3 if compile_blocks else 2)
        if compile_blocks:
            res["compile_s"] = round(sum(res["warmup_s"]) - len(res["warmup_s"]) * res["ms"] / 1e3, 1)
        res.update(
            peak_gib=ctx.peak_gib(), batch=batch_size, kind="train", loss_finite=all(map(math.isfinite, losses)),
            ms_per_sample=round(res["ms"] / batch_size, 3),
            config={"precision": precision, "channels_last": channels_last, "fused_adamw": fused and ctx.cuda,
                    "grad_ckpt": use_ckpt,
                    "compile": "compile_repeated_blocks (default mode)" if compile_blocks else None,
                    "lora": f"r{spec.rank} α{spec.alpha} fp32 {list(spec.target_modules)}",
                    "max_grad_norm": spec.max_grad_norm, "cudnn_benchmark": ctx.cuda},
        )
        return res
    finally:
        accelerator.free_memory()
        kt._reset_accelerate_state()


def m_ours_train_batch(ctx: Ctx) -> dict[str, Any]:
    """The largest batch of {8, 4, 2} that fits (--smoke: 2), default variant: per-sample throughput and peak."""
    tried: dict[int, str] = {}
    for bs in (2,) if ctx.args.smoke else (8, 4, 2):
        res = None
        try:
            res = m_ours_train(ctx, batch_size=bs)
        except torch.cuda.OutOfMemoryError:
            tried[bs] = "oom"
        if res is None:
            free(ctx)  # after the except block: the traceback (and the tensors its frames hold) is gone
            continue
        res["tried"] = {**tried, bs: "ok"}
        return res
    raise CannotRunError(f"no batch of 8, 4 or 2 fits: {tried}")


def m_cfg(
    ctx: Ctx,
    *,
    dtype: torch.dtype,
    fuse: bool = False,
    channels_last: bool = False,
    compile_mode: str | None = None,
) -> dict[str, Any]:
    """One CFG denoising step as ``KolorsPipeline`` runs it: the UNet on batch 2 (negative + positive) under
    ``no_grad``, then the guidance combine. ``compile_mode``: ``blocks`` = ``compile_repeated_blocks()``,
    ``whole`` = ``torch.compile(unet)`` as ``generate.py`` does; both default mode."""
    if compile_mode and not ctx.cuda:
        raise CannotRunError("compile: CUDA only (generate.py ignores spec.story.compile on the CPU)")
    dtype = ctx.dtype(dtype)
    unet = ctx.build_unet(dtype).eval()
    unet.requires_grad_(False)
    if fuse:
        unet.fuse_qkv_projections()
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    model: Any = unet
    if compile_mode == "blocks":
        unet.compile_repeated_blocks()
    elif compile_mode == "whole":
        model = torch.compile(unet)
    torch.manual_seed(0)
    kw = {"device": ctx.dev, "dtype": dtype}
    lat, r = ctx.latent, ctx.res
    x = torch.randn(2, 4, lat, lat, **kw)
    t = torch.tensor(499.0, device=ctx.dev)
    emb = torch.randn(2, ctx.seq, ctx.text_dim, **kw)
    added = {
        "text_embeds": torch.randn(2, ctx.pooled_dim, **kw),
        "time_ids": torch.tensor([[r, r, 0, 0, r, r]] * 2, device=ctx.dev, dtype=dtype),
    }

    @torch.no_grad()
    def step() -> torch.Tensor:
        out = model(x, t, encoder_hidden_states=emb, added_cond_kwargs=added, return_dict=False)[0]
        uncond, cond = out.chunk(2)
        return uncond + 4.0 * (cond - uncond)

    ctx.reset_peak()
    res = ctx.bench(step, warmup=3 if compile_mode else 2)
    if compile_mode:
        res["compile_s"] = round(sum(res["warmup_s"]) - len(res["warmup_s"]) * res["ms"] / 1e3, 1)
    res.update(peak_gib=ctx.peak_gib(), batch=2, kind="cfg",
               config={"dtype": str(dtype).removeprefix("torch."), "fuse_qkv": fuse, "channels_last": channels_last,
                       "compile": compile_mode, "attention": "SDPA (diffusers default)"})
    return res


def m_vae_decode(ctx: Ctx, *, dtype: torch.dtype, tiled: bool = False, batch: int = 1) -> dict[str, Any]:
    """``vae.decode`` of 1024² latents as the pipeline calls it; tiled = 512² tiles (diffusers only tiles above
    its config's sample_size, 1024 for Kolors, so the tile size is lowered to make it tile at all)."""
    dtype = ctx.dtype(dtype)
    vae = ctx.build_vae(dtype).eval()
    vae.requires_grad_(False)
    if tiled:
        vae.enable_tiling()
        vae.tile_latent_min_size = ctx.latent // 2
        vae.tile_sample_min_size = ctx.res // 2
    torch.manual_seed(0)
    z = torch.randn(batch, 4, ctx.latent, ctx.latent, device=ctx.dev, dtype=dtype)
    scale = float(ctx.vae_cfg["scaling_factor"])

    @torch.no_grad()
    def step() -> torch.Tensor:
        return vae.decode(z / scale, return_dict=False)[0]

    ctx.reset_peak()
    res = ctx.bench(step, warmup=2, max_iters=20)
    res.update(peak_gib=ctx.peak_gib(), batch=batch, kind="vae",
               config={"dtype": str(dtype).removeprefix("torch."), "tiled": tiled,
                       "tile": f"{ctx.res // 2}² px" if tiled else None})
    return res


def m_device(ctx: Ctx) -> dict[str, Any]:
    """A large bf16 matmul: the device's achievable dense rate, to read the percentages below against."""
    n = 8192 if ctx.cuda else 512
    dtype = ctx.dtype(torch.bfloat16)
    a = torch.randn(n, n, device=ctx.dev, dtype=dtype)
    b = torch.randn(n, n, device=ctx.dev, dtype=dtype)
    res = ctx.bench(lambda: a @ b, warmup=3, min_iters=10, max_iters=50)
    res.update(kind="device", n=n, tflops_measured=round(2 * n**3 / (res["ms"] / 1e3) / 1e12, 1))
    return res
