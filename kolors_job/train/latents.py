"""Training caches: ChatGLM prompt embeddings per caption, VAE latent distributions per (image, flip).

Why cache: ChatGLM3-6B (12 GB in bf16) and the VAE see each distinct input once, not once per step;
after caching they leave the GPU, so the UNet has it to itself. Why *these* tensors:

* prompt embeddings come from ``KolorsPipeline.encode_prompt`` itself (256 tokens, ``hidden_states[-2]``
  sequence, last token of ``hidden_states[-1]`` pooled), so training is conditioned exactly like
  sampling. Re-implementing it is how trainers drift (wrong layer, wrong length, zeroed empties).
* latents are cached as the encoder's Gaussian (mean, std), not one sample, so every step can train on the
  mean (the reference's) or draw a fresh latent sample from a seeded generator, as an uncached trainer would.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

    from kolors_job.data.images import ImageItem

log = logging.getLogger(__name__)



def mix_seed(*parts: object) -> int:
    """A stable 63-bit seed from parts: unlike ``hash()`` it is identical across processes and runs."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)






@dataclass(frozen=True)
class LatentEntry:
    """The VAE posterior of one (image, flip) crop, unscaled, fp32 on the CPU; ``time_ids`` are SDXL's 6."""

    mean: torch.Tensor
    std: torch.Tensor
    time_ids: tuple[int, int, int, int, int, int]

    def sample(self, eps: torch.Tensor) -> torch.Tensor:
        return self.mean + self.std * eps


@torch.no_grad()
def cache_latents(
    vae: AutoencoderKL,
    items: Sequence[ImageItem],
    *,
    resolution: int,
    center_crop: bool,
    flips: Sequence[bool],
    seed: int,
    device: torch.device | str,
    dtype: torch.dtype,
    batch_size: int = 8,
    progress: Any = None,
    resize_filter: str = "lanczos",
    exif_orientation: bool = True,
    jpeg_reencode: int = 0,
) -> dict[tuple[int, bool], LatentEntry]:
    """Encode every item once per flip variant; key ``(item index, flipped)``.

    With a random crop the crop is drawn once per image (seeded by ``seed`` and the item's index) and
    then fixed for the whole run: that is the price of caching. Both flips are cached when
    ``random_flip`` is on, so flipping stays a per-sample choice at train time. Items of different sizes
    (``dataset.buckets``) are encoded in chunks of one size each; with one size the chunks are as they always
    were (the VAE's batch may round differently, so they must not move).
    """
    from kolors_job.data.images import load_image

    device = torch.device(device)
    jobs: list[tuple[int, bool]] = [(i, f) for i in range(len(items)) for f in flips]

    def load(job: tuple[int, bool]) -> tuple[torch.Tensor, tuple[int, ...]]:
        i, flip = job
        # The rng is re-seeded per (seed, image): same crop offsets for both flips, whatever the order.
        pixel, time_ids = load_image(
            items[i], resolution, center_crop, flip, random.Random(mix_seed(seed, "crop", i)), resize_filter,
            exif_orientation=exif_orientation, jpeg_reencode=jpeg_reencode,
        )
        return pixel, tuple(int(v) for v in time_ids)

    out: dict[tuple[int, bool], LatentEntry] = {}
    by_size: dict[tuple[int, int] | None, list[tuple[int, bool]]] = {}
    for job in jobs:
        by_size.setdefault(items[job[0]].bucket, []).append(job)
    chunks = [group[k : k + batch_size] for group in by_size.values() for k in range(0, len(group), batch_size)]
    # Decoding + LANCZOS-resizing big images dominates; PIL releases the GIL, so threads load the next
    # chunk while the VAE encodes this one (at most two chunks of pixels in memory).
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        pending = [pool.submit(load, job) for job in chunks[0]] if chunks else []
        for n, chunk in enumerate(chunks):
            loaded = [f.result() for f in pending]
            pending = [pool.submit(load, job) for job in chunks[n + 1]] if n + 1 < len(chunks) else []
            shapes = {tuple(p.shape) for p, _ in loaded}
            if len(shapes) != 1:
                raise ValueError(
                    f"load_image gave differently sized crops {sorted(shapes)}; expected one size"
                )
            pixels = torch.stack([p for p, _ in loaded]).to(device, dtype)
            dist = vae.encode(pixels).latent_dist
            mean, std = dist.mean.float().cpu(), dist.std.float().cpu()
            for k, key in enumerate(chunk):
                tids = loaded[k][1]
                out[key] = LatentEntry(mean=mean[k].clone(), std=std[k].clone(), time_ids=tids)  # type: ignore[arg-type]
            if progress is not None:
                progress(len(chunk))
    return out
