"""The ``models`` stage: every model the job names, as checked local directories, and what getting them cost.

Every hub source (the datasets too) is listed and sized before the first download, so a cache that cannot hold
them all stops before any byte travels. The device was checked before this (``job.preflight``).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kolors_job.core.uris import TINY_SCHEME
from kolors_job.sources import check_free_space, fetch_model, plan_dataset, plan_model

if TYPE_CHECKING:
    from kolors_job.job.context import Job

__all__ = ["ResolvedModels", "resolve_models"]

log = logging.getLogger(__name__)


@dataclass
class ResolvedModels:
    base: Path
    vae: Path | None
    aesthetic: Path
    random_weights: bool
    sources: list[dict[str, Any]] = field(default_factory=list)
    """Per source: uri, commit, bytes downloaded vs reused (report.json ``sources``)."""
    train_vae: Path | None = None
    """``model.train_vae``: the VAE that encodes the training images (the reference's sdxl-vae-fp16-fix)."""


def resolve_models(job: Job) -> ResolvedModels:
    """List, check and fetch the models: Kolors, the VAEs the manifest names, the aesthetic predictor."""
    spec = job.manifest.spec
    # A half-precision run reads fp16 weight variants; an fp32 (CPU) run prefers the plain ones.
    prefer_fp16 = job.device != "cpu" or spec.train.precision in ("bf16", "fp16")
    skip = ("vae",) if spec.model.vae else ()
    plan = plan_model(spec.model.base, kind="pipeline", settings=job.settings, prefer_fp16=prefer_fp16, skip=skip)
    fetch_base = functools.partial(
        fetch_model, spec.model.base, kind="pipeline", settings=job.settings, prefer_fp16=prefer_fp16, skip=skip
    )
    if plan is None:  # not a hub: a wrong path fails here, before any hub is asked
        base, base_src = fetch_base()
    vae_plan = None
    if spec.model.vae:
        vae_plan = plan_model(spec.model.vae, kind="vae", settings=job.settings, prefer_fp16=prefer_fp16)
    train_vae_plan = None
    if spec.model.train_vae:
        train_vae_plan = plan_model(spec.model.train_vae, kind="vae", settings=job.settings, prefer_fp16=prefer_fp16)
    aesthetic_plan = plan_model(spec.score.aesthetic_model, kind="aesthetic", settings=job.settings, prefer_fp16=True)
    datasets = [plan_dataset(d, job.settings) for d in spec.datasets]
    check_free_space([plan, vae_plan, train_vae_plan, aesthetic_plan, *datasets], job.settings)
    if plan is not None:
        base, base_src = fetch_base(plan=plan)
    sources = [base_src]
    vae = None
    if spec.model.vae:
        vae, vae_src = fetch_model(
            spec.model.vae, kind="vae", settings=job.settings, prefer_fp16=prefer_fp16, plan=vae_plan
        )
        sources.append(vae_src)
    train_vae = None
    if spec.model.train_vae:
        train_vae, train_vae_src = fetch_model(
            spec.model.train_vae, kind="vae", settings=job.settings, prefer_fp16=prefer_fp16, plan=train_vae_plan
        )
        sources.append(train_vae_src)
    aesthetic, aesthetic_src = fetch_model(
        spec.score.aesthetic_model, kind="aesthetic", settings=job.settings, plan=aesthetic_plan
    )
    sources.append(aesthetic_src)
    for src in sources:
        log.info(
            "source %s: %d files, %s downloaded, %s reused", src.uri, src.files,
            _mb(src.bytes_downloaded), _mb(src.bytes_reused), extra={"commit": src.commit},
        )
    random_weights = any(u.startswith(f"{TINY_SCHEME}://") for u in (spec.model.base, spec.score.aesthetic_model))
    return ResolvedModels(base, vae, aesthetic, random_weights, [s.to_dict() for s in sources], train_vae)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
