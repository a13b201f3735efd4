"""What the training loop reads: the caches (prompt embeddings, latent posteriors) and its batches.

The caches are built once, before the LoRA exists: load the model, encode every distinct caption with
``KolorsPipeline.encode_prompt`` and every image (both flips if ``random_flip``) with the VAE, then drop
the text encoder and the VAE so the UNet has the device to itself. Batches are then assembled on the
CPU from those caches, with every random draw a pure function of ``(seed, global sample index)``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers.training_utils import free_memory

from kolors_job.models.prompts import PromptEmbeds, encode_captions
from kolors_job.train.latents import LatentEntry, cache_latents, mix_seed

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

    from kolors_job.data.images import ImageItem
    from kolors_job.manifest.train import TrainSpec
    from kolors_job.models.loading import KolorsComponents

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- caches


@dataclass
class Caches:
    """The model parts training keeps (UNet, noise schedule) and the inputs encoded once."""

    unet: UNet2DConditionModel
    noise_scheduler: Any
    prompts: dict[str, PromptEmbeds]
    latents: dict[tuple[int, bool], LatentEntry]
    scaling_factor: float
    prediction_type: str
    num_train_timesteps: int
    texts: dict[str, PromptEmbeds] = field(default_factory=dict)
    """``extra_texts`` encoded (validation's prompts and negative prompts)."""
    sampling: KolorsComponents | None = None
    """With ``keep_for_sampling``: the parts a pipeline needs besides the UNet (VAE on the CPU, tokenizer,
    sampler config; no text encoder)."""


def build_caches(
    model_dir: Path,
    items: Sequence[ImageItem],
    train: TrainSpec,
    *,
    vae_dir: Path | None,
    train_vae_dir: Path | None = None,
    precision: str,
    weight_dtype: torch.dtype,
    dev: torch.device,
    caption_dropout: float | Sequence[float],
    extra_texts: Sequence[str] = (),
    keep_for_sampling: bool = False,
    latent_batch: int = 8,
    text_encoder_device: str | None = None,
) -> Caches:
    """Load, encode captions (and ``extra_texts``), cache latents; then the text encoder leaves, and the VAE
    too unless ``keep_for_sampling`` (validation decodes with it: kept on the CPU). ``latent_batch``: images per
    VAE encode; ``text_encoder_device``: where ChatGLM encodes (default ``dev``; on a CPU it computes in bf16).
    ``train_vae_dir`` (``model.train_vae``) encodes the images instead of the story's VAE (``vae_dir`` or the
    model's own), and is dropped once the latents are cached."""
    from kolors_job.models.loading import load_kolors_components, load_vae, make_pipeline, place, vae_force_upcast

    story_vae_dir = Path(vae_dir) if vae_dir is not None else Path(model_dir) / "vae"
    encoder_dir = Path(train_vae_dir) if train_vae_dir is not None else story_vae_dir
    vae_dtype = vae_encode_dtype(precision, weight_dtype, force_upcast=vae_force_upcast(encoder_dir))
    # Uncast: every rank maps the same files and each module is cast on its way to the device (place).
    comps = load_kolors_components(
        Path(model_dir), vae_path=vae_dir, dtype=weight_dtype,
        vae_dtype=vae_dtype if train_vae_dir is None else weight_dtype, cast=False,
    )
    pipe = make_pipeline(comps)
    dropout = [caption_dropout] if isinstance(caption_dropout, (int, float)) else caption_dropout
    captions = [it.caption for it in items] + ([""] if max(dropout, default=0) > 0 else [])
    t0 = time.monotonic()
    te_dev = torch.device(text_encoder_device) if text_encoder_device else dev
    te_dtype = torch.bfloat16 if te_dev.type == "cpu" and dev.type != "cpu" else weight_dtype  # no fp16 CPU matmul
    place(comps.text_encoder, te_dev, te_dtype)
    cast = weight_dtype if te_dtype != weight_dtype else None  # embeddings in the UNet's dtype, as on the GPU
    prompts = encode_captions(pipe, captions, device=te_dev, dtype=cast)
    texts = encode_captions(pipe, list(extra_texts), device=te_dev, dtype=cast) if extra_texts else {}
    log.info("encoded captions", extra={"captions": len(prompts), "seconds": round(time.monotonic() - t0, 3)})
    # ChatGLM (12.5 GB in bf16) is done: free it before the VAE encodes 1024² images (16 GB cards).
    pipe.text_encoder = comps.text_encoder = None
    free_memory()
    encoder = comps.vae if train_vae_dir is None else load_vae(encoder_dir, vae_dtype, cast=False)
    vae = place(encoder, dev, vae_dtype)
    scaling_factor = float(vae.config.scaling_factor)
    flips = (False, True) if train.random_flip else (False,)
    t0 = time.monotonic()
    latents = cache_latents(
        vae,
        items,
        resolution=train.resolution,
        center_crop=train.center_crop,
        flips=flips,
        seed=train.seed,
        device=dev,
        dtype=vae_dtype,
        resize_filter=train.resize_filter,
        exif_orientation=train.exif_orientation,
        jpeg_reencode=train.jpeg_reencode,
        batch_size=latent_batch,
    )
    log.info("cached latents", extra={"latents": len(latents), "seconds": round(time.monotonic() - t0, 3)})
    unet: UNet2DConditionModel = comps.unet
    noise_scheduler = comps.noise_scheduler
    sampling = None
    if keep_for_sampling:
        if train_vae_dir is None:
            comps.vae = vae.to("cpu")
        sampling = comps
    del pipe, vae, encoder, comps
    free_memory()
    prediction_type, num_train_timesteps = _check_model(unet, noise_scheduler, prompts)
    return Caches(
        unet, noise_scheduler, prompts, latents, scaling_factor, prediction_type, num_train_timesteps, texts, sampling
    )


def vae_encode_dtype(precision: str, weight_dtype: torch.dtype, *, force_upcast: bool) -> torch.dtype:
    """The dtype the VAE encodes training images in: the training dtype (the reference's: DiffSynth casts its
    fp16-fix encoder to it, fp16 under ``16-mixed``), except fp32 for an fp16 run whose VAE overflows in fp16
    (its config's ``force_upcast``, as diffusers' pipelines read it: the stock SDXL/Kolors VAE)."""
    return torch.float32 if precision == "fp16" and force_upcast else weight_dtype


def _check_model(
    unet: UNet2DConditionModel, noise_scheduler: Any, prompts: dict[str, PromptEmbeds]
) -> tuple[str, int]:
    """Refuse a text encoder / UNet / scheduler that do not belong together; (prediction type, T)."""
    text_dim = next(iter(prompts.values())).pooled.shape[-1]
    expected = unet.add_embedding.linear_1.in_features
    if text_dim + 6 * unet.config.addition_time_embed_dim != expected:
        raise ValueError(
            f"UNet expects an added embedding of {expected}, conditioning gives {text_dim} + 6 x "
            f"{unet.config.addition_time_embed_dim}; text encoder and UNet do not belong together"
        )
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"unsupported prediction_type {prediction_type!r} in the model's scheduler config")
    return prediction_type, int(noise_scheduler.config.num_train_timesteps)


# ------------------------------------------------------------------------------------------- data order


class SampleStream:
    """Maps a global sample index to (item, random draws); the same index always gives the same sample.

    ``order="shuffle"``: epoch ``e`` visits the items in ``randperm(n, seed(seed, e))``, sample ``g`` of the
    run being position ``g % n`` of epoch ``g // n``. ``order="random"`` (the reference's, ``train.data_order``):
    sample ``g`` is an independent uniform draw from ``seed(seed, g)``, with replacement, as DiffSynth's
    dataset picks ``randint(0, n)`` per item. A DDP rank takes the indices of its slice of each step. Nothing
    depends on what ran before, which is what makes resume and DDP splits bit-reproducible.

    ``repeats`` (``dataset.repeats``, per item) puts item ``i`` ``repeats[i]`` times into what is drawn from
    (``n`` counts the copies). ``sizes`` (per item, its training size: ``dataset.buckets``) with ``batch_size``
    > 1 and several sizes makes every batch — samples ``b·B .. b·B + B - 1`` — one size: with ``random``, the
    batch's first sample is drawn as above and the others uniformly among the copies of its size; with
    ``shuffle``, each epoch's permutation is split by size into runs of ``B`` (a size's last run filled from
    its start), the runs in the order their first sample has in the permutation. One size, or ``B`` = 1,
    is the plain stream, sample for sample.
    """

    def __init__(
        self,
        n_items: int,
        seed: int,
        order: str = "shuffle",
        *,
        repeats: Sequence[int] | None = None,
        sizes: Sequence[Hashable] | None = None,
        batch_size: int = 1,
    ) -> None:
        if order not in ("shuffle", "random"):
            raise ValueError(f"unknown data order {order!r}")
        self.pool = [i for i in range(n_items) for _ in range(repeats[i] if repeats else 1)]
        self.n = len(self.pool)
        self.seed = seed
        self.order = order
        self.batch_size = batch_size
        keys = [sizes[i] for i in self.pool] if sizes is not None else []
        self.keys = keys if batch_size > 1 and len(set(keys)) > 1 else None
        self.members: dict[Hashable, list[int]] = {}
        for pos, key in enumerate(self.keys or []):
            self.members.setdefault(key, []).append(pos)
        self.batches_per_epoch = sum(-(-len(m) // batch_size) for m in self.members.values())
        self._perms: dict[int, list[int]] = {}
        self._batches: dict[int, list[list[int]]] = {}

    def item(self, g: int) -> int:
        return self.pool[self._position(g) if self.keys is None else self._bucketed(g)]

    def _position(self, g: int) -> int:
        """Sample ``g``'s position in ``pool``, ignoring sizes."""
        if self.order == "random":
            gen = torch.Generator().manual_seed(mix_seed(self.seed, "item", g))
            return int(torch.randint(0, self.n, (), generator=gen))
        epoch, pos = divmod(g, self.n)
        return self._perm(epoch)[pos]

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, "epoch", epoch))
            self._perms = {epoch: torch.randperm(self.n, generator=gen).tolist()}  # keep one epoch
        return self._perms[epoch]

    def _bucketed(self, g: int) -> int:
        assert self.keys is not None
        b, j = divmod(g, self.batch_size)
        if self.order == "random":
            first = self._position(b * self.batch_size)
            if j == 0:
                return first
            members = self.members[self.keys[first]]
            gen = torch.Generator().manual_seed(mix_seed(self.seed, "item", g))
            return members[int(torch.randint(0, len(members), (), generator=gen))]
        epoch, k = divmod(b, self.batches_per_epoch)
        if epoch not in self._batches:
            runs: dict[Hashable, list[int]] = {}
            for pos in self._perm(epoch):
                runs.setdefault(self.keys[pos], []).append(pos)
            batches = []
            for run in runs.values():
                for start in range(0, len(run), self.batch_size):
                    batches.append([run[(start + i) % len(run)] for i in range(self.batch_size)])
            order = {pos: rank for rank, pos in enumerate(self._perm(epoch))}
            self._batches = {epoch: sorted(batches, key=lambda batch: order[batch[0]])}  # keep one epoch
        return self._batches[epoch][k][j]

    def generator(self, g: int) -> torch.Generator:
        return torch.Generator().manual_seed(mix_seed(self.seed, "sample", g))


@dataclass
class Batch:
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    embeds: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor
    captions: list[str]
    items: list[int]
    flips: list[bool]


def make_batch(
    indices: Sequence[int],
    stream: SampleStream,
    items: Sequence[ImageItem],
    latents: dict[tuple[int, bool], LatentEntry],
    prompts: dict[str, PromptEmbeds],
    *,
    num_train_timesteps: int,
    scaling_factor: float,
    caption_dropout: float | Sequence[float],
    random_flip: bool,
    latent: str = "sample",
    time_ids: str = "crop",
    noise_offset: float = 0.0,
) -> Batch:
    """Assemble samples on the CPU. Draw order per sample is fixed (dropout, flip, t, latent eps, noise, then
    the noise offset's per-channel draw only when ``noise_offset`` is set: each sample has its own generator,
    so a draw added last changes none before it).

    ``latent`` / ``time_ids``: ``TrainSpec``'s switches (``mean`` / ``target`` are the reference's choices); an
    item with a ``bucket`` always gets its original size and crop offset (SDXL's bucketed conditioning).
    ``noise_offset``: ``train.noise_offset``, ``noise + offset · N(0, 1)`` per channel, constant over the image.
    ``caption_dropout``: one probability, or one per dataset (``ImageItem.dataset``)."""
    lat, noise, ts, emb, pooled, tids, caps, idx, flips = [], [], [], [], [], [], [], [], []
    for g in indices:
        i = stream.item(g)
        gen = stream.generator(g)
        u_drop, u_flip = torch.rand((2,), generator=gen).tolist()  # always drawn: fixed stream layout
        p_drop = caption_dropout if isinstance(caption_dropout, (int, float)) else caption_dropout[items[i].dataset]
        drop = u_drop < p_drop
        flip = random_flip and u_flip < 0.5
        t = torch.randint(0, num_train_timesteps, (), generator=gen)
        entry = latents[(i, flip)]
        eps = torch.randn(entry.mean.shape, generator=gen)  # drawn either way: a fixed stream layout
        lat.append((entry.mean if latent == "mean" else entry.sample(eps)) * scaling_factor)
        eps_noise = torch.randn(entry.mean.shape, generator=gen)
        if noise_offset:
            eps_noise = eps_noise + noise_offset * torch.randn((entry.mean.shape[0], 1, 1), generator=gen)
        noise.append(eps_noise)
        ts.append(t)
        caption = "" if drop else items[i].caption
        caps.append(caption)
        emb.append(prompts[caption].embeds)
        pooled.append(prompts[caption].pooled)
        target = entry.time_ids[4:]  # (h, w) of the training crop
        tid = entry.time_ids if time_ids == "crop" or items[i].bucket else (*target, 0, 0, *target)
        tids.append(torch.tensor(tid, dtype=torch.float32))
        idx.append(i)
        flips.append(flip)
    return Batch(
        latents=torch.stack(lat),
        noise=torch.stack(noise),
        timesteps=torch.stack(ts).long(),
        embeds=torch.stack(emb),
        pooled=torch.stack(pooled),
        time_ids=torch.stack(tids),
        captions=caps,
        items=idx,
        flips=flips,
    )

