"""Model sources: a manifest URI turned into a local directory checked to look like the requested kind.

A wrong path fails in the first second with one clear line instead of deep inside ``from_pretrained``
after the dataset was downloaded:

- ``modelscope://Owner/Name[@revision]``, ``hf://…``: the files the loader reads, via the hub's client
  (``hubs``), into ``<cache>/hub/``;
- ``oss://``, ``s3://``, ``file://`` (any storage backend): copied once into
  ``<cache>/models/<sha256(uri)[:16]>/`` (``buckets``);
- a plain path (a mounted NAS/OSS dir, a local checkout): used in place, nothing is copied;
- ``tiny://kolors``, ``tiny://aesthetic``: tiny random models built into the cache (tests, demo).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from kolors_job import storage
from kolors_job.core.errors import InputError
from kolors_job.core.redact import redact_uri
from kolors_job.core.settings import Settings
from kolors_job.core.uris import HUB_SCHEMES, TINY_SCHEME, parse_hub_uri, scheme_of
from kolors_job.manifest.fields import source_schemes

from .buckets import copy_model_prefix
from .hubs import ModelKind, Plan, SourceRecord, download, plan_hub_model

__all__ = ["REQUIRED_FILES", "fetch_model", "plan_model", "resolve_model"]

REQUIRED_FILES: dict[str, tuple[str, ...]] = {
    "pipeline": ("model_index.json", "unet/", "vae/", "text_encoder/", "tokenizer/", "scheduler/"),
    "vae": ("config.json",),
    "aesthetic": ("config.json", "preprocessor_config.json"),
}
"""What a resolved directory must hold per kind (a trailing '/' means a directory)."""

_TINY = ("kolors", "aesthetic")


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
    scheme = scheme_of(uri)
    record = SourceRecord(uri=redact_uri(uri), kind=kind)
    if scheme in HUB_SCHEMES:
        plan = plan or plan_model(uri, kind=kind, settings=settings, prefer_fp16=prefer_fp16, skip=skip)
        assert plan is not None
        path, record = download(plan, settings)
    elif scheme == TINY_SCHEME:
        path = _resolve_tiny(uri, settings)
    elif scheme and storage.backend(scheme) is not None:
        path, record.bytes_downloaded = copy_model_prefix(uri, settings)
    elif scheme:
        raise InputError(
            f"{kind} model {uri!r}: unsupported scheme {scheme}:// "
            f"(use {', '.join(s + '://' for s in source_schemes())} or a local path)"
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
    from kolors_job.models.tiny import TINY_BUILDER_VERSION, build_tiny_aesthetic_predictor, build_tiny_kolors

    name = uri.split("://", 1)[1].strip("/")
    if name not in _TINY:
        raise InputError(f"unknown tiny model {uri!r}: use tiny://kolors or tiny://aesthetic")
    build = build_tiny_kolors if name == "kolors" else build_tiny_aesthetic_predictor
    return build(settings.cache_dir / "tiny" / f"{name}-v{TINY_BUILDER_VERSION}-seed0", seed=0)
