"""Which files of a model folder hold its weights: the names ``from_pretrained`` opens, and the variant.

One decision for both sides: ``sources`` chooses from a hub listing what to download, the loader
(``models.loading``) chooses from the local copy what to open, and both pick the same files.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "DIFFUSERS_WEIGHTS", "FULL_SIZE_UNET_BYTES", "TRANSFORMERS_WEIGHTS", "choose_weights", "is_full_size",
    "local_weights",
]

DIFFUSERS_WEIGHTS = (("diffusion_pytorch_model", "safetensors"), ("diffusion_pytorch_model", "bin"))
TRANSFORMERS_WEIGHTS = (("model", "safetensors"), ("pytorch_model", "bin"))
"""(file stem, extension) in the order ``from_pretrained`` prefers them: safetensors before pickles."""

FULL_SIZE_UNET_BYTES = 1 << 30
"""A UNet weight file at least this large is a real model (Kolors fp16: 5.16 GB; the tiny one: KB)."""


def choose_weights(
    paths: Iterable[str], folder: str, names: Iterable[tuple[str, str]], *, prefer_fp16: bool
) -> tuple[list[str], str | None]:
    """The weight files ``from_pretrained`` will read in ``folder`` and their variant (None: plain).

    Variant order follows the run: a half-precision run takes ``fp16`` files when present (half the
    bytes, no loss), an fp32 run the plain ones; either falls back to what the repo has. A sharded
    checkpoint is its index (``model.safetensors.index.fp16.json``) plus the shards named the way
    transformers/diffusers name them (``model.fp16-00001-of-00003.safetensors``).
    """
    prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
    present = {p[len(prefix):] for p in paths if p.startswith(prefix) and "/" not in p[len(prefix):]}
    for variant in ("fp16", None) if prefer_fp16 else (None, "fp16"):
        infix = f".{variant}" if variant else ""
        for stem, ext in names:
            single = f"{stem}{infix}.{ext}"
            if single in present:
                return [prefix + single], variant
            index = f"{stem}.{ext}.index{infix}.json"
            shard = re.compile(rf"^{re.escape(stem + infix)}-\d{{5}}-of-\d{{5}}\.{re.escape(ext)}$")
            shards = sorted(p for p in present if shard.match(p))
            if index in present and shards:
                return [prefix + index, *(prefix + s for s in shards)], variant
    return [], None


def local_weights(
    folder: Path, names: Iterable[tuple[str, str]], *, prefer_fp16: bool
) -> tuple[list[str], str | None]:
    """``choose_weights`` over a local directory: the file names ``from_pretrained`` will open, and the
    ``variant=`` to pass it."""
    if not folder.is_dir():
        return [], None
    return choose_weights([p.name for p in folder.iterdir() if p.is_file()], "", names, prefer_fp16=prefer_fp16)


def is_full_size(path: Path) -> bool:
    """Whether a resolved pipeline dir holds a real (GPU-sized) UNet, judged by its weight bytes."""
    unet = path / "unet"
    return unet.is_dir() and sum(p.stat().st_size for p in unet.iterdir() if p.is_file()) >= FULL_SIZE_UNET_BYTES
