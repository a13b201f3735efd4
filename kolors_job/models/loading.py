"""Loading Kolors once into reusable components (the samplers are ``schedulers``').

Where the weights come from (hub, bucket, path, ``tiny://``) is ``kolors_job.sources``' job:
``sources.fetch_model`` hands this module a checked local directory.

``load_kolors_components`` loads each part once; ``make_pipeline`` assembles a ``KolorsPipeline``
from them without reloading, so training and sampling share the same weights in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from kolors_job.core.errors import InputError
from kolors_job.core.redact import one_line
from kolors_job.models.schedulers import make_scheduler
from kolors_job.models.weights import DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS, local_weights

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, KolorsPipeline, UNet2DConditionModel
    from diffusers.pipelines.kolors.text_encoder import ChatGLMModel
    from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

__all__ = [
    "KolorsComponents",
    "files_digest",
    "load_kolors_components",
    "load_tokenizer",
    "load_vae",
    "make_pipeline",
    "place",
    "stored_dtype",
    "vae_force_upcast",
]

M = TypeVar("M", bound="torch.nn.Module")

_TOKENIZERS: dict[str, ChatGLMTokenizer] = {}


def load_tokenizer(folder: Path) -> ChatGLMTokenizer:
    """The ChatGLM tokenizer in ``folder``, built once per process for each distinct set of files.

    Building it walks its 65,024-token vocabulary four times in Python (~0.25 CPU-s), and a job loads Kolors
    twice (training, then the story). Keyed by the files' names and bytes, not the path, so copies of one
    tokenizer share it. Shared means read-only: nothing in the job adds tokens or changes its settings.
    """
    from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer

    vocab = Path(folder) / ChatGLMTokenizer.vocab_files_names["vocab_file"]
    if not vocab.is_file():  # else the tokenizer asserts on a None path: a TypeError, not a missing file
        raise FileNotFoundError(f"no {vocab.name} in {folder}")
    digest = files_digest(folder)
    if digest not in _TOKENIZERS:
        _TOKENIZERS[digest] = ChatGLMTokenizer.from_pretrained(folder)
    return _TOKENIZERS[digest]


def files_digest(folder: Path) -> str:
    """SHA-256 over the names and bytes of the files directly in ``folder``: equal for two copies of one
    tokenizer, different when any file differs."""
    import hashlib

    key = hashlib.sha256()
    for file in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        key.update(file.name.encode() + b"\0" + hashlib.sha256(file.read_bytes()).digest())
    return key.hexdigest()


@dataclass
class KolorsComponents:
    """Kolors loaded once: training uses the parts, sampling wraps them with ``make_pipeline``."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: ChatGLMModel | None
    """None once training has encoded its captions and freed it."""
    tokenizer: ChatGLMTokenizer
    noise_scheduler: DDPMScheduler
    """For training (add_noise, targets): DDPM from the model's own config, so 1100 steps."""
    pipeline_scheduler: SchedulerMixin
    """The sampler the model ships (Kolors: Euler); ``make_pipeline`` may swap it."""
    force_zeros_for_empty_prompt: bool = False
    """From ``model_index.json`` (Kolors: false): how an empty negative prompt is embedded."""


_SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def stored_dtype(folder: Path, files: Iterable[str]) -> torch.dtype | None:
    """The one floating dtype of the safetensors among ``files`` in ``folder`` (what ``from_pretrained`` will
    open: :func:`~kolors_job.models.weights.local_weights`), read from their headers, nothing loaded; None for
    pickles, mixed dtypes (which cannot stay mapped) and unreadable headers (the loader then says what is
    wrong with the file, as one line)."""
    import torch
    from safetensors import SafetensorError, safe_open

    shards = [f for f in files if f.endswith(".safetensors")]
    if not shards:
        return None
    kinds: set[str] = set()
    for shard in shards:
        try:
            with safe_open(str(folder / shard), framework="pt") as f:
                kinds |= {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        except (SafetensorError, OSError):
            return None
    floats = {_SAFETENSORS_DTYPES.get(k) for k in kinds if k.startswith(("F", "BF"))}
    return getattr(torch, floats.pop()) if len(floats) == 1 and None not in floats else None


def place(module: M, device: torch.device | str, dtype: torch.dtype) -> M:
    """``module`` on ``device`` in ``dtype``, cast one tensor at a time on its way.

    With ``load_kolors_components(cast=False)`` the weights are still the memory-mapped files in their
    stored dtype: this is the one copy, made on the device, so the host never holds a cast copy of the
    model (every DDP rank would hold its own). ``torch.nn.Module.to`` itself: diffusers' override warns
    about fp32-kept modules on every dtype cast, and none of the Kolors models has any.
    """
    import torch

    return torch.nn.Module.to(module, device=device, dtype=dtype)  # type: ignore[return-value]


def load_vae(folder: Path, dtype: torch.dtype, *, cast: bool = True) -> AutoencoderKL:
    """An ``AutoencoderKL`` from ``folder`` on the CPU (weights and ``cast`` as in
    :func:`load_kolors_components`); one line naming the folder when it cannot be loaded."""
    import torch
    from diffusers import AutoencoderKL

    files, variant = local_weights(folder, DIFFUSERS_WEIGHTS, prefer_fp16=dtype != torch.float32)
    held = None if cast else stored_dtype(folder, files)
    try:
        return AutoencoderKL.from_pretrained(
            folder, torch_dtype=held or dtype, **({"variant": variant} if variant else {})
        )
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"cannot load the VAE from {folder}: {one_line(exc)}") from exc


def vae_force_upcast(folder: Path) -> bool:
    """The VAE config's ``force_upcast`` (diffusers' default: true): false only for a VAE made for fp16, such
    as ``sdxl-vae-fp16-fix``; the stock SDXL/Kolors VAE overflows in fp16."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return True
    return bool(config.get("force_upcast", True)) if isinstance(config, dict) else True


def load_kolors_components(
    path: Path,
    *,
    vae_path: Path | None = None,
    dtype: torch.dtype,
    vae_dtype: torch.dtype | None = None,
    cast: bool = True,
) -> KolorsComponents:
    """Load every Kolors part on the CPU from a resolved ``pipeline`` dir (``vae_path``: a replacement VAE).

    ``dtype`` (VAE: ``vae_dtype``, default ``dtype``) picks the files (fp16 variant for a half-precision
    run, plain for fp32, either falling back to what is there) and is what the modules compute in.
    ``cast=False`` leaves each module in the dtype its safetensors store instead: the tensors are then the
    page-cached file itself, shared by every process that maps it, not a private copy; the caller
    places each module on its device in ``dtype`` (:func:`place`). The values are the same either way.
    """
    import diffusers
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.pipelines.kolors.text_encoder import ChatGLMModel

    path = Path(path)
    vae_dtype = dtype if vae_dtype is None else vae_dtype

    def load(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (OSError, ValueError, KeyError) as exc:  # missing/corrupt files, wrong config
            raise InputError(f"cannot load the {what} from {args[0]}: {one_line(exc)}") from exc

    def weights(
        folder: Path, names: tuple[tuple[str, str], ...], want: torch.dtype
    ) -> tuple[dict[str, Any], torch.dtype]:
        """``variant`` (real repos ship fp16-variant files; Kolors-diffusers has nothing else) and dtype."""
        files, chosen = local_weights(folder, names, prefer_fp16=want != torch.float32)
        held = None if cast else stored_dtype(folder, files)
        return {"variant": chosen} if chosen else {}, held or want

    unet_kw, unet_dtype = weights(path / "unet", DIFFUSERS_WEIGHTS, dtype)
    unet = load("UNet", UNet2DConditionModel.from_pretrained, path, subfolder="unet", torch_dtype=unet_dtype,
                **unet_kw)
    vae = load_vae(Path(vae_path) if vae_path is not None else path / "vae", vae_dtype, cast=cast)
    te_kw, te_dtype = weights(path / "text_encoder", TRANSFORMERS_WEIGHTS, dtype)
    text_encoder = load("text encoder", ChatGLMModel.from_pretrained, path / "text_encoder", dtype=te_dtype,
                        **te_kw)
    tokenizer = load("tokenizer", load_tokenizer, path / "tokenizer")
    sched_config = load("scheduler config", DDPMScheduler.load_config, path, subfolder="scheduler")
    noise_scheduler = DDPMScheduler.from_config(sched_config)
    sched_cls = getattr(diffusers, str(sched_config.get("_class_name")), None)
    if sched_cls is None:
        raise InputError(f"scheduler in {path} is {sched_config.get('_class_name')!r}: not a diffusers class")
    index = (
        json.loads((path / "model_index.json").read_text()) if (path / "model_index.json").is_file() else {}
    )
    return KolorsComponents(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        noise_scheduler=noise_scheduler,
        pipeline_scheduler=sched_cls.from_config(sched_config),
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)),
    )




def make_pipeline(components: KolorsComponents, scheduler_name: str | None = None) -> KolorsPipeline:
    """A ``KolorsPipeline`` over the already-loaded modules, with a fresh scheduler.

    ``scheduler_name`` is one of ``SCHEDULERS`` (None: the model's own). Schedulers are stateful, so
    each pipeline gets its own instance even when the modules are shared.
    """
    from diffusers import KolorsPipeline

    base = components.pipeline_scheduler
    if scheduler_name is None:
        scheduler = type(base).from_config(base.config)
    else:
        scheduler = make_scheduler(scheduler_name, base.config)
    return KolorsPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=components.force_zeros_for_empty_prompt,
    )


def enable_tiling(vae: Any, height: int, width: int) -> None:
    """diffusers tiles only above the config's sample size (1024 for Kolors): tiles of half the image."""
    vae.enable_tiling()
    vae.tile_sample_min_size = max(256, min(height, width) // 2)
    vae.tile_latent_min_size = vae.tile_sample_min_size // 8
