"""Where model weights come from, and loading Kolors once into reusable components.

``resolve_model`` turns a manifest URI into a local directory that has been checked to look like
the requested kind of model, so a wrong path fails in the first second with one clear line
instead of deep inside ``from_pretrained`` after the dataset was downloaded:

- ``modelscope://Owner/Name[@revision]``: ModelScope's own client and cache (``<cache>/modelscope``);
- ``oss://``, ``s3://``, ``file://``: copied once into ``<cache>/models/<sha256(uri)[:16]>/`` through
  the storage layer; the copy is published atomically with a marker, so later jobs reuse it and a
  torn copy is redone;
- a plain path (a mounted NAS/OSS dir, a local checkout): used in place, nothing is copied;
- ``tiny://kolors``, ``tiny://aesthetic``: tiny random models built into the cache (tests, demo).

``load_kolors_components`` loads each part once; ``make_pipeline`` assembles a ``KolorsPipeline``
from them without reloading, so training and sampling share the same weights in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kolors_job.errors import InputError
from kolors_job.redact import redact_uri
from kolors_job.settings import Settings
from kolors_job.sources import (
    DIFFUSERS_WEIGHTS,
    FULL_SIZE_UNET_BYTES,
    HUB_SCHEMES,
    TRANSFORMERS_WEIGHTS,
    Plan,
    SourceRecord,
    download,
    local_variant,
    parse_hub_uri,
    plan_hub_model,
)

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, KolorsPipeline, UNet2DConditionModel
    from diffusers.pipelines.kolors.text_encoder import ChatGLMModel
    from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

__all__ = [
    "REQUIRED_FILES",
    "SCHEDULERS",
    "KolorsComponents",
    "ModelKind",
    "Sampler",
    "load_kolors_components",
    "make_pipeline",
    "make_scheduler",
    "reference_timesteps",
    "resolve_model",
    "sampler_timesteps",
]

log = logging.getLogger(__name__)

ModelKind = Literal["pipeline", "vae", "aesthetic"]

REQUIRED_FILES: dict[str, tuple[str, ...]] = {
    "pipeline": ("model_index.json", "unet/", "vae/", "text_encoder/", "tokenizer/", "scheduler/"),
    "vae": ("config.json",),
    "aesthetic": ("config.json", "preprocessor_config.json"),
}
"""What a resolved directory must hold per kind (a trailing '/' means a directory)."""

@dataclass(frozen=True)
class Sampler:
    """One ``story.scheduler`` choice: a diffusers class built ``from_config`` of the model's own scheduler
    config (so Kolors' 1100-step, beta_end 0.014 schedule is kept whatever the sampler), with overrides."""

    cls: str
    overrides: dict[str, Any]
    reference_grid: bool = False
    """Visit DiffSynth's Kolors DDIM timesteps (:func:`reference_timesteps`) instead of the class's own."""


SCHEDULERS: dict[str, Sampler] = {
    # The reference: deterministic DDIM over DiffSynth's grid 1099, 1077, ..., 22, 0, then to fully clean.
    # DDIM (eta 0) is Euler in sigma = sqrt((1 - abar) / abar), so Euler on those timesteps is that sampler
    # (diffusers' DDIMScheduler cannot be: it steps to t - 1100 // steps, not to the next grid point).
    "reference": Sampler("EulerDiscreteScheduler", {}, reference_grid=True),
    # Kolors-diffusers' shipped sampler: Euler on the "leading" grid 1079, 1057, ..., 1 (starts below pure noise).
    "euler": Sampler("EulerDiscreteScheduler", {}),
    "euler_a": Sampler("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": Sampler("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": Sampler("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    # diffusers' DDIM on the model's leading grid: *not* the reference's DDIM (other grid, stops at t = 1).
    "ddim": Sampler("DDIMScheduler", {}),
    "unipc": Sampler("UniPCMultistepScheduler", {}),
}
"""Sampler names accepted by ``story.scheduler`` and ``make_pipeline``: the manifest's list is these keys."""


def reference_timesteps(steps: int, num_train_timesteps: int) -> list[int]:
    """The timesteps DiffSynth 1.1.9 samples Kolors over (``EnhancedDDIMScheduler.set_timesteps``,
    diffsynth/schedulers/ddim.py lines 41-50, built with ``num_train_timesteps=1100`` by
    ``SDXLImagePipeline.fetch_models``, diffsynth/pipelines/sdxl_image.py line 68): ``steps`` points
    rounded from a linspace of ``num_train_timesteps - 1`` down to 0; after the last the sample is clean."""
    last = num_train_timesteps - 1
    steps = min(steps, last + 1)
    if steps == 1:
        return [last]
    stride = last / (steps - 1)
    return [round(last - i * stride) for i in range(steps)]


def sampler_timesteps(name: str, steps: int, scheduler_config: dict[str, Any]) -> list[int] | None:
    """Explicit ``timesteps=`` for the pipeline call, or None when the sampler spaces its own grid."""
    if not SCHEDULERS[name].reference_grid:
        return None
    return reference_timesteps(steps, int(scheduler_config["num_train_timesteps"]))


_TINY = ("kolors", "aesthetic")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


# --------------------------------------------------------------------------------------------
# resolution
# --------------------------------------------------------------------------------------------


def resolve_model(uri: str, *, kind: ModelKind, settings: Settings, prefer_fp16: bool = True) -> Path:
    """A local directory holding the model ``uri`` names, checked to be a ``kind`` model (see ``fetch_model``)."""
    return fetch_model(uri, kind=kind, settings=settings, prefer_fp16=prefer_fp16)[0]


def plan_model(
    uri: str, *, kind: ModelKind, settings: Settings, prefer_fp16: bool, skip: Iterable[str] = ()
) -> Plan | None:
    """For a hub URI, the listed and selected files (nothing downloaded yet); None for other sources."""
    ref = parse_hub_uri(uri.strip())
    return None if ref is None else plan_hub_model(ref, kind, settings, prefer_fp16=prefer_fp16, skip=skip)


def fetch_model(
    uri: str,
    *,
    kind: ModelKind,
    settings: Settings,
    prefer_fp16: bool = True,
    skip: Iterable[str] = (),
    plan: Plan | None = None,
) -> tuple[Path, SourceRecord]:
    """A local directory holding the model ``uri`` names, and what getting it cost.

    Raises ``InputError`` (one line, naming the uri) for bad URIs and missing files, and a
    ``JobError`` with exit code TEMPORARY when the hub or bucket is unreachable (a retry can help).
    ``prefer_fp16`` picks the fp16 weight variant of a hub repo that has both (half-precision runs);
    ``skip`` names pipeline parts whose weights the job replaces (not downloaded).
    """
    if kind not in REQUIRED_FILES:
        raise ValueError(f"unknown model kind {kind!r}")
    uri = uri.strip()
    if not uri:
        raise InputError(f"empty {kind} model uri")
    m = _SCHEME.match(uri)
    scheme = m.group(1).lower() if m else ""
    record = SourceRecord(uri=redact_uri(uri), kind=kind)
    if scheme in HUB_SCHEMES:
        plan = plan or plan_model(uri, kind=kind, settings=settings, prefer_fp16=prefer_fp16, skip=skip)
        assert plan is not None
        path, record = download(plan, settings)
    elif scheme == "tiny":
        path = _resolve_tiny(uri, settings)
    elif scheme in ("oss", "s3", "file"):
        path, record.bytes_downloaded = _resolve_bucket(uri, settings)
    elif scheme:
        raise InputError(
            f"{kind} model {uri!r}: unsupported scheme {scheme}:// (use modelscope://, hf://, oss://, "
            "s3://, file://, tiny:// or a local path)"
        )
    else:
        path = Path(uri).expanduser().absolute()
        if not path.is_dir():
            raise InputError(f"{kind} model {uri!r}: no such directory")
    path = _validate(path, uri, kind)
    if not record.files:  # not a hub: count what is on disk
        sizes = [p.stat().st_size for p in path.rglob("*") if p.is_file()]
        record.files, record.bytes_total = len(sizes), sum(sizes)
        record.bytes_reused = record.bytes_total - record.bytes_downloaded
    return path, record


def is_full_size(path: Path) -> bool:
    """Whether a resolved pipeline dir holds a real (GPU-sized) UNet, judged by its weight bytes."""
    unet = path / "unet"
    return unet.is_dir() and sum(p.stat().st_size for p in unet.iterdir() if p.is_file()) >= FULL_SIZE_UNET_BYTES


def _validate(path: Path, uri: str, kind: ModelKind) -> Path:
    # A standalone VAE may be given as a whole pipeline: use its vae/ subfolder.
    if kind == "vae" and not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        path = path / "vae"
    for rel in REQUIRED_FILES[kind]:
        target = path / rel.rstrip("/")
        ok = target.is_dir() if rel.endswith("/") else target.is_file()
        if not ok:
            raise InputError(f"{kind} model {uri!r} has no {rel} (looked in {path})")
    return path


def _resolve_tiny(uri: str, settings: Settings) -> Path:
    from kolors_job.tiny import TINY_BUILDER_VERSION, build_tiny_aesthetic_predictor, build_tiny_kolors

    name = uri.split("://", 1)[1].strip("/")
    if name not in _TINY:
        raise InputError(f"unknown tiny model {uri!r}: use tiny://kolors or tiny://aesthetic")
    build = build_tiny_kolors if name == "kolors" else build_tiny_aesthetic_predictor
    return build(settings.cache_dir / "tiny" / f"{name}-v{TINY_BUILDER_VERSION}-seed0", seed=0)


def _resolve_bucket(uri: str, settings: Settings) -> tuple[Path, int]:
    """Copy a bucket/``file://`` prefix into the cache once (concurrent jobs share one copy): (dir, bytes fetched)."""
    from kolors_job.storage import open_store, redact
    from kolors_job.tiny import atomic_dir

    uri = uri.rstrip("/")  # "s3://b/m/" and "s3://b/m" are the same model: one cache entry
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = settings.cache_dir / "models" / key
    try:
        store = open_store(uri, settings)
    except ValueError as exc:
        raise InputError(f"bad model uri {redact(uri)!r}: {_one_line(exc)}") from None

    fetched = 0

    def download(tmp: Path) -> None:
        nonlocal fetched
        files = store.download_dir("", tmp)
        if not files:
            raise InputError(f"model {redact(uri)!r}: no files under that prefix")
        fetched = sum(f.stat().st_size for f in files)
        log.info("downloaded %d files of %s into %s", len(files), redact(uri), target)

    return atomic_dir(target, {"uri": redact(uri)}, download, replace_stale=True), fetched


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:300] + "...") if len(text) > 300 else text or type(exc).__name__


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


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


def load_kolors_components(
    path: Path,
    *,
    vae_path: Path | None = None,
    dtype: torch.dtype,
    device: torch.device | str,
) -> KolorsComponents:
    """Load every Kolors part from a resolved ``pipeline`` dir (``vae_path``: a replacement VAE)."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.pipelines.kolors.text_encoder import ChatGLMModel
    from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer

    path = Path(path)

    def load(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (OSError, ValueError, KeyError) as exc:  # missing/corrupt files, wrong config
            raise InputError(f"cannot load the {what} from {args[0]}: {_one_line(exc)}") from exc

    # Real repos ship fp16-variant files (Kolors-diffusers has nothing else): name the variant on disk.
    half = dtype != torch.float32

    def variant(folder: Path, names: tuple[tuple[str, str], ...]) -> dict[str, Any]:
        chosen = local_variant(folder, names, prefer_fp16=half)
        return {"variant": chosen} if chosen else {}

    unet = load(
        "UNet", UNet2DConditionModel.from_pretrained, path, subfolder="unet", torch_dtype=dtype,
        **variant(path / "unet", DIFFUSERS_WEIGHTS),
    )
    vae_dir = Path(vae_path) if vae_path is not None else path / "vae"
    vae = load("VAE", AutoencoderKL.from_pretrained, vae_dir, torch_dtype=dtype, **variant(vae_dir, DIFFUSERS_WEIGHTS))
    text_encoder = load(
        "text encoder", ChatGLMModel.from_pretrained, path / "text_encoder", dtype=dtype,
        **variant(path / "text_encoder", TRANSFORMERS_WEIGHTS),
    )
    tokenizer = load("tokenizer", ChatGLMTokenizer.from_pretrained, path / "tokenizer")
    sched_config = load("scheduler config", DDPMScheduler.load_config, path, subfolder="scheduler")
    noise_scheduler = DDPMScheduler.from_config(sched_config)
    sched_cls = getattr(diffusers, str(sched_config.get("_class_name")), None)
    if sched_cls is None:
        raise InputError(f"scheduler in {path} is {sched_config.get('_class_name')!r}: not a diffusers class")
    index = (
        json.loads((path / "model_index.json").read_text()) if (path / "model_index.json").is_file() else {}
    )

    unet.to(device)
    vae.to(device)
    text_encoder.to(device)  # one ChatGLM buffer is created on the CPU whatever the context
    return KolorsComponents(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        noise_scheduler=noise_scheduler,
        pipeline_scheduler=sched_cls.from_config(sched_config),
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)),
    )


def make_scheduler(name: str, config: Any) -> SchedulerMixin:
    """A fresh ``SCHEDULERS[name]`` built ``from_config`` of the model's scheduler ``config``."""
    import diffusers

    if name not in SCHEDULERS:
        raise InputError(f"unknown scheduler {name!r}: use one of {', '.join(SCHEDULERS)}")
    sampler = SCHEDULERS[name]
    return getattr(diffusers, sampler.cls).from_config(config, **sampler.overrides)


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
