"""The job runner: the one place that knows the order of the stages.

Read it top to bottom like a recipe: prepare the output → resolve models → dataset → train →
story → score → report → ``_SUCCESS``. Each stage is a typed function in its own module; this file
only wires them, records ``status.json``, uploads what each stage produced, and makes a rerun of the
same job resume instead of starting over (finished stages are found in the output store).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from kolors_job.core.device import pick_device
from kolors_job.core.errors import (
    ExitCode,
    InputError,
    JobError,
    JobInterruptedError,
    ManifestError,
    OutputConflictError,
    StorageNotFoundError,
)
from kolors_job.core.log import progress_enabled
from kolors_job.core.redact import redact_uri, scrub
from kolors_job.core.settings import Settings
from kolors_job.core.stop import StopFlag, stop_on_signals
from kolors_job.job import scratch
from kolors_job.job.claim import CLAIM_DIR, OutputClaim
from kolors_job.job.status import StatusWriter
from kolors_job.manifest.spec import JOB_ID_PATTERN, Manifest, OutputSpec, format_validation_error
from kolors_job.storage import Store, open_store
from kolors_job.storage.base import RETRIES
from kolors_job.storage.local import TEMPORARY_ERRNOS, os_error
from kolors_job.story.stage import run_story
from kolors_job.train import checkpoints

if TYPE_CHECKING:
    from accelerate import PartialState

    from kolors_job.export import LoraInfo
    from kolors_job.plan.planner import Plan

log = logging.getLogger("kolors_job.runner")

STATE = "_state"  # per-stage results that let a rerun skip finished work


@dataclass
class JobOutcome:
    job_id: str
    output_uri: str
    exit_code: ExitCode
    state: str
    message: str = ""
    report: dict[str, Any] | None = None


def _env_int(name: str, default: int) -> int:
    """torchrun / the Kubeflow operator / PAI-DLC set RANK, LOCAL_RANK and WORLD_SIZE."""
    raw = os.environ.get(name, "")
    return int(raw) if raw.isdigit() else default


def _run_dir_name(world: int) -> str:
    """This run's scratch directory name: the process alone, or under DDP the torchrun group (every
    rank of a node must agree, so it is derived from the rendezvous torchrun gives them all)."""
    if world == 1:
        return f"run-{os.getpid()}-{os.urandom(3).hex()}"
    group = ":".join(os.environ.get(v, "") for v in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"))
    return "ddp-" + hashlib.sha256(group.encode()).hexdigest()[:12]


class Job:
    """One run of one manifest: holds the context every stage needs."""

    def __init__(
        self,
        manifest: Manifest,
        *,
        settings: Settings,
        job_id: str | None = None,
        output_uri: str | None = None,
        force: bool = False,
        stop: StopFlag | None = None,
        allow_cpu: bool = False,
    ) -> None:
        if output_uri:  # --output: validated like the manifest's own field
            try:
                output = OutputSpec.model_validate({**manifest.spec.output.model_dump(), "uri": output_uri})
            except ValidationError as e:
                raise ManifestError([p.replace("uri:", "--output:", 1) for p in format_validation_error(e)]) from None
            manifest = manifest.model_copy(update={"spec": manifest.spec.model_copy(update={"output": output})})
        self.manifest = manifest
        self.settings = settings
        self.job_id = job_id or manifest.job_id
        if not re.fullmatch(JOB_ID_PATTERN, self.job_id):
            # --job-id / KOLORS_JOB_ID bypass the manifest's own validation: the id becomes a path
            raise ManifestError(
                f"job id {self.job_id!r} is unsafe: use 1-63 lower-case letters, digits, '.', '_' or '-' "
                "(it names a directory)"
            )
        self.force = force
        self.stop = stop or StopFlag()
        self.digest = manifest.digest()
        self.rank = _env_int("RANK", 0)
        self.world = _env_int("WORLD_SIZE", 1)
        self.main = self.rank == 0
        # One process per node prepares that node's work dir (LoRA copy, downloads): disks are per node.
        self.local_main = _env_int("LOCAL_RANK", 0) == 0
        self.store: Store = open_store(manifest.spec.output.uri, settings).child(self.job_id)
        # Scratch is per run: two processes of one job (a rerun racing a zombie, a waiting second run)
        # never share files. A rerun resumes from the output store, never from scratch.
        self.run_root = self.work = settings.resolved_work_dir / self.job_id / _run_dir_name(self.world)
        if self.world > _env_int("LOCAL_WORLD_SIZE", self.world):
            # Several nodes: the work dir may be one shared volume (a ReadWriteMany cache PVC), and each
            # node's ranks write their own LoRA copy and checkpoints there. torchrun sets GROUP_RANK.
            self.work = self.work / f"node-{_env_int('GROUP_RANK', 0)}"
        self.status = StatusWriter(self.store if self.main else None, self.job_id, self.digest)
        self.timings: dict[str, float] = {}
        self.retries_before = RETRIES.value  # the process-wide count when this run began (tests run several)
        self.owns_output = False  # set once prepare_output has checked the prefix is ours
        self.claim: OutputClaim | None = None  # rank 0's exclusive claim on the output prefix
        self.scratch_owner: scratch.ScratchOwner | None = None  # this process's record in its scratch directory
        self.allow_cpu = allow_cpu
        # one GPU per rank, as torchrun assigns them
        self.device = pick_device(manifest.spec.device, world=self.world, local_rank=_env_int("LOCAL_RANK", 0))
        self.progress = settings.log_format == "text" or (settings.log_format == "auto" and progress_enabled())
        self.memory_plan: Plan | None = None  # a full-size model on a GPU: the plan check_device made
        self.observers: list[Any] = []
        """Told each validation point (``validation_point(dict)``): a sweep trial's metric lines."""

    # ------------------------------------------------------------------ helpers

    @functools.cached_property
    def dist(self) -> PartialState | None:
        """accelerate's process state under DDP (joins torchrun's process group); None in one process."""
        if self.world == 1:
            return None
        from accelerate import PartialState

        return PartialState(cpu=self.device == "cpu")

    def main_first(self) -> AbstractContextManager[None]:
        """Rank 0 runs the block first, the others after it: they see what it decided and wrote."""
        return self.dist.main_process_first() if self.dist else nullcontext()

    def local_main_first(self) -> AbstractContextManager[None]:
        """One rank per node fills the node's caches first; the others then find them complete."""
        return self.dist.local_main_process_first() if self.dist else nullcontext()

    def barrier(self) -> None:
        if self.dist:
            self.dist.wait_for_everyone()

    @property
    def output_uri(self) -> str:
        return redact_uri(self.store.uri)

    def put_json(self, key: str, data: Any) -> None:
        if self.main:
            self.store.write_bytes(key, json.dumps(data, ensure_ascii=False, indent=2, default=str).encode())

    def get_json(self, key: str) -> Any | None:
        return json.loads(self.store.read_bytes(key)) if self.store.exists(key) else None

    def upload(self, key: str, path: Path) -> None:
        if self.main:
            self.store.upload_file(key, path)

    def upload_dir(self, path: Path, prefix: str) -> None:
        if self.main:
            self.store.upload_dir(path, prefix)

    def check_stop(self) -> None:
        if self.stop():
            raise JobInterruptedError(f"interrupted by {self.stop.signal_name or 'a stop request'}; rerun to resume")

    @contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator[None]:
        self.check_stop()
        log.info("stage %s: started", name, extra={"stage": name})
        self.status.stage_started(name, total)
        t0 = time.perf_counter()
        yield
        seconds = time.perf_counter() - t0
        self.timings[name] = round(seconds, 3)
        self.status.stage_finished(name, seconds)
        log.info("stage %s: done in %.1fs", name, seconds, extra={"stage": name, "seconds": round(seconds, 3)})


# ---------------------------------------------------------------------------------------------- stages


def _already_finished(job: Job) -> bool:
    """Read-only, before any claim: True for ``_SUCCESS`` (written last) beside this very manifest, a
    conflict for another manifest's run. A no-op rerun or a refused one writes nothing at all;
    prepare_output checks again under the claim, where it counts."""
    if job.force:
        return False
    try:
        existing = job.store.read_bytes("manifest.resolved.yaml")
    except StorageNotFoundError:
        return False
    _refuse_other_manifest(job, existing)
    return job.store.exists("_SUCCESS")


def _refuse_other_manifest(job: Job, resolved: bytes) -> None:
    if _resolved_digest(resolved) != job.digest and not job.force:
        raise OutputConflictError(
            f"{job.output_uri}: holds a run of a different manifest; use a new job id "
            "(--job-id or metadata.name) or --force to replace it"
        )


def _resolved_digest(raw: bytes) -> str | None:
    import yaml

    try:
        return Manifest.model_validate(yaml.safe_load(raw)).digest()
    except Exception:  # a foreign or hand-edited file: treated as another manifest's
        return None


def claim_output(job: Job) -> None:
    """Take the exclusive claim on the prefix (see kolors_job.job.claim) and keep it alive while we run."""

    def lost(reason: str) -> None:
        job.stop.signal_name = f"loss of the output claim ({reason})"
        job.stop.event.set()

    claim = OutputClaim(
        job.store,
        job.digest,
        lease_s=job.settings.claim_lease_s,
        wait_s=job.settings.claim_wait_s,
        should_stop=job.stop,
        on_lost=lost,
    )
    claim.acquire()
    job.claim = claim
    # From here on every write and delete under the prefix goes through the claim's fence: the store
    # refuses them once another run has taken the prefix over (a pause past the lease, a frozen node).
    assert claim.fenced is not None
    job.store = job.status.store = claim.fenced
    claim.start_heartbeat()


def prepare_output(job: Job) -> bool:
    """Refuse another manifest's prefix; return True when this exact job already finished."""
    existing = job.store.read_bytes("manifest.resolved.yaml") if job.store.exists("manifest.resolved.yaml") else None
    if existing is not None:
        _refuse_other_manifest(job, existing)
    if job.store.exists("_SUCCESS") and not job.force:
        return True
    if job.force and job.main:
        for key in job.store.list():
            if not key.startswith(f"{CLAIM_DIR}/"):  # our own claim stays
                job.store.delete(key)
    if job.main:
        job.store.write_bytes("manifest.resolved.yaml", job.manifest.to_yaml().encode())
    return False


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


def check_device(job: Job, *, full_size: bool, uri: str) -> None:
    """Stop when the job would land on a device that cannot run it (see :func:`check_device_first`)."""
    from kolors_job.core.device import cuda_problem

    if job.device.startswith("cuda"):
        if problem := cuda_problem():
            raise InputError(f"spec.device is cuda but {problem}")
    elif full_size and job.manifest.spec.device == "auto" and not job.allow_cpu:
        what = "is a full-size Kolors" if _local_model_dir(uri) else "is a hub or bucket model (full-size unless tiny://)"
        raise InputError(
            f"model {redact_uri(uri)!r} {what} and {cuda_problem() or 'no GPU is in use'}; "
            "a CPU would take hours (spec.device: cpu, --allow-cpu or KOLORS_JOB_ALLOW_CPU=1 runs it there anyway)"
        )
    if full_size and job.device.startswith("cuda"):  # the memory plan on this card: exit 4 when it cannot fit
        from kolors_job.plan.runtime import plan_for_device

        job.memory_plan = plan_for_device(job.manifest, job.device, job.settings.cache_dir)


def _local_model_dir(uri: str) -> Path | None:
    """The path a plain-path or ``file://`` model names (looked at without any network); None otherwise."""
    from kolors_job.core.uris import scheme_of

    scheme = scheme_of(uri)
    if scheme == "file":
        uri = uri.removeprefix("file://")
    elif scheme:
        return None
    return Path(uri).expanduser()


def check_device_first(job: Job) -> None:
    """The device check, before any network call (the output store, a hub listing): a job on a machine
    without a usable GPU learns it in its first second, not after minutes of hub retries on a node that
    has no network either. A ``tiny://`` model always runs; a local one is judged by its UNet's bytes; a hub
    or bucket model cannot be sized without the network, so it counts as full-size."""
    from kolors_job.models.weights import is_full_size

    uri = job.manifest.spec.model.base
    local = _local_model_dir(uri)
    full_size = not uri.startswith("tiny://") and (local is None or is_full_size(local))
    check_device(job, full_size=full_size, uri=uri)


def resolve_models(job: Job) -> ResolvedModels:
    """List, check and fetch the models (Kolors, the VAEs the manifest names, the aesthetic predictor); every
    hub source (the dataset too) is sized before the first download, so a cache that cannot hold them all
    stops before any byte travels. The device was checked before this (``check_device_first``)."""
    from kolors_job.sources import check_free_space, fetch_model, plan_dataset, plan_model

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
    random_weights = any(u.startswith("tiny://") for u in (spec.model.base, spec.score.aesthetic_model))
    return ResolvedModels(base, vae, aesthetic, random_weights, [s.to_dict() for s in sources], train_vae)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def run_dataset(job: Job) -> tuple[list[Any], dict[str, Any]]:
    """Fetch + scan each dataset; the kept images of all of them (with their dataset's ``repeats`` and, with
    ``buckets``, their bucket) and the summary. A dataset of which no image survives is an input error (exit
    4), not a crash in training."""
    spec = job.manifest.spec
    items: list[Any] = []
    summaries: list[dict[str, Any]] = []
    for index, dspec in enumerate(spec.datasets):
        where = "dataset" if len(spec.datasets) == 1 else f"dataset[{index}]"
        kept, summary = _scan_one(job, dspec, index, where)
        items += kept
        summaries.append(summary)
    if len(summaries) == 1:
        return items, summaries[0]
    return items, _total(summaries, items, spec.train.resolution)


def _scan_one(job: Job, dspec: Any, index: int, where: str) -> tuple[list[Any], dict[str, Any]]:
    from dataclasses import replace

    from kolors_job.data.buckets import assign_buckets, bucket_counts
    from kolors_job.data.scan import filter_drops, scan_dataset
    from kolors_job.sources import fetch_dataset, source_record

    started = time.time()
    root = fetch_dataset(dspec, job.settings)
    scan = scan_dataset(
        root, dspec, memory_budget=job.settings.scan_memory_mb << 20,
        exif_orientation=job.manifest.spec.train.exif_orientation,
    )
    summary = scan.report(dspec.source).to_dict()
    summary["filters"] = filter_drops(scan.skipped_counts, dspec.filters)
    if (record := source_record(root, since=started)) is not None:
        summary["fetched"] = record  # commit and bytes, as report.json's sources has them for models
    dropped = "; ".join(f"{f['dropped']} by {name} ({f['setting']})" for name, f in summary["filters"].items())
    log.info("%s: %d kept; filters dropped %s; skipped %s", where, scan.kept, dropped, summary["skipped"] or "none",
             extra={"kept": scan.kept})  # fmt: skip
    if not scan.items:
        raise InputError(
            f"{where} {redact_uri(dspec.source)}: no image survived the filters "
            f"(skipped: {summary['skipped'] or 'none'}; min {dspec.filters.min_width}x{dspec.filters.min_height}, "
            f"aspect {dspec.filters.aspect_ratio[0]}-{dspec.filters.aspect_ratio[1]})"
        )
    kept = [replace(it, repeats=dspec.repeats, dataset=index) for it in scan.items]
    if dspec.repeats != 1:
        summary["repeats"] = dspec.repeats
    if dspec.buckets:
        resolution = job.manifest.spec.train.resolution
        kept = assign_buckets(kept, resolution, dspec.filters.aspect_ratio)
        summary["buckets"] = bucket_counts(kept, resolution)
        log.info("%s: buckets %s", where, summary["buckets"], extra={"buckets": summary["buckets"]})
    return kept, summary


def _total(summaries: list[dict[str, Any]], items: list[Any], resolution: int) -> dict[str, Any]:
    """report.json's ``dataset`` for several datasets: the sums, the images per training size, and each
    dataset's own summary under ``datasets``."""
    from collections import Counter

    from kolors_job.data.buckets import bucket_counts

    skipped: Counter[str] = Counter()
    notes: Counter[str] = Counter()
    for summary in summaries:
        skipped.update(summary["skipped"])
        notes.update(summary["notes"])
    total: dict[str, Any] = {
        key: sum(summary[key] for summary in summaries)
        for key in ("kept", "examined", "not_examined", "captions_truncated")
    }
    total.update(skipped=dict(sorted(skipped.items())), notes=dict(sorted(notes.items())))
    if any(it.bucket for it in items):
        total["buckets"] = bucket_counts(items, resolution)
    total["datasets"] = summaries
    return total


def run_train(job: Job, models: ResolvedModels, items: list[Any], scorer: Any = None) -> dict[str, Any]:
    """Train (or resume, or skip when ``lora/`` is already complete) and return the train summary, with the
    validation points and the selected checkpoint (:mod:`kolors_job.train.validation`) under their report keys."""
    from kolors_job.plan.runtime import story_spec, train_kwargs, train_spec
    from kolors_job.train import validation as val
    from kolors_job.train.loop import train_lora
    from kolors_job.train.tracking import LOGS

    lora_local = job.work / "lora"
    done = job.get_json(f"{STATE}/train.json")
    if done is not None:
        log.info("train: already complete in the output; reusing lora/")
        if job.local_main:
            job.store.child("lora").download_dir("", lora_local)
        job.barrier()
        return done

    resume_from = None
    if (newest := checkpoints.newest_complete(job.store, identity=job.digest)) is not None:
        resume_from = checkpoints.step_dir(job.work, newest)
        if job.local_main:
            checkpoints.download(job.store, newest, job.work)
        job.barrier()
        log.info("train: resuming from %s", checkpoints.step_key(newest))
        job.status.progress(newest, force=True)  # not "step 0" until the next step is done

    spec = job.manifest.spec
    choices = job.memory_plan.choices if job.memory_plan else None
    validator = None
    if spec.train.validation_every:
        story = story_spec(spec.story, choices)  # validation draws in the plan's story batch

        def on_point(p: val.ValidationPoint) -> None:
            job.upload_dir(job.work / val.step_prefix(p.step), val.step_prefix(p.step) + "/")
            for observer in job.observers:
                observer.validation_point(p.to_dict())

        validator = val.Validator(spec.train, story, scorer, job.work, on_point=on_point)

    def upload_logs() -> None:  # the event files grow: re-sent with each checkpoint and at the end
        if (job.work / "train" / LOGS).is_dir():
            job.upload_dir(job.work / "train" / LOGS, f"{LOGS}/")

    def on_checkpoint(path: Path, step: int) -> None:
        if job.main:
            checkpoints.upload(job.store, path, step)
            upload_logs()
            job.status.progress(step)
            best = validator.best_step() if validator and spec.train.select == "best_aesthetic" else None
            checkpoints.prune(job.store, keep=spec.output.keep_checkpoints, protect={best} - {None})

    result = train_lora(
        models.base, items, train_spec(spec.train, choices), work_dir=job.work / "train", vae_dir=models.vae,
        train_vae_dir=models.train_vae, device=job.device, resume_from=resume_from, on_checkpoint=on_checkpoint,
        should_stop=job.stop, progress=job.progress, caption_dropout=[d.caption.dropout for d in spec.datasets],
        validator=validator, identity=job.digest, **train_kwargs(choices),
    )
    upload_logs()  # the last events (tracking.end flushed them)
    if result.interrupted:
        raise JobInterruptedError(f"interrupted at step {result.steps}; checkpoint saved; rerun to resume")
    summary = result.summary()
    selected = val.select_checkpoint(result.validation, spec.train.select, result.steps)
    if job.local_main:  # every node draws frames with it; its ranks share one disk
        shutil.rmtree(lora_local, ignore_errors=True)
        shutil.copytree(result.lora_dir, lora_local)
        if selected["step"] != result.steps:  # train.select: best_aesthetic chose an earlier checkpoint
            val.use_checkpoint_lora(lora_local, job.store, job.work / "train", selected["step"])
        summary.update(export_lora(job, {**summary, "steps": selected["step"]}))
    summary.update(validation=result.validation, selected_checkpoint=selected)
    job.barrier()
    job.upload_dir(lora_local, "lora/")  # final formats only: each object is written once
    job.put_json(f"{STATE}/train.json", summary)
    return summary


def lora_info(job: Job, train: dict[str, Any]) -> LoraInfo:
    """What the exports and the model card say about the LoRA."""
    from kolors_job.export import LoraInfo

    spec = job.manifest.spec
    return LoraInfo(
        rank=spec.train.rank,
        alpha=spec.train.alpha,
        target_modules=tuple(spec.train.target_modules),
        base_model=redact_uri(spec.model.base),
        trigger=spec.datasets[0].caption.prefix or spec.datasets[0].caption.fixed or "",
        name=job.job_id,
        steps=train.get("steps"),
        learning_rate=spec.train.learning_rate,
        resolution=spec.train.resolution,
        batch_size=spec.train.batch_size,
        seed=spec.train.seed,
        precision=train.get("precision"),
        extra=_option_notes(spec.train),
    )


def _option_notes(train: Any) -> dict[str, str]:
    """The training options switched on, as the model card and the files' ``kolors_job.extra`` show them."""
    notes = {
        "optimizer": train.optimizer if train.optimizer != "adamw" else "",
        "loss weighting": f"min-SNR, gamma {train.snr_gamma:g}" if train.loss_weighting == "min_snr" else "",
        "noise offset": f"{train.noise_offset:g}" if train.noise_offset else "",
        "DoRA": "yes" if train.dora else "",
        "EMA": f"decay {train.ema_decay:g} (the exported weights)" if train.ema else "",
    }
    return {k: v for k, v in notes.items() if v}


def export_lora(job: Job, train: dict[str, Any]) -> dict[str, Any]:
    """Rewrite ``lora/`` in the manifest's formats (diffusers with α baked in, kohya, DiffSynth) right
    after training, so the story draws with — and the output holds — exactly the published files."""
    from kolors_job.export import applicable_formats, export_all

    lora = job.work / "lora"
    # the registry says which formats can hold this LoRA (DiffSynth 1.1.9: only the full-size Kolors UNet)
    formats, skipped = applicable_formats(job.manifest.spec.output.lora_formats, lora)
    for fmt, why in skipped.items():
        log.warning("lora export: %s skipped: %s", fmt, why)
    files = export_all(lora, lora_info(job, train), lora, formats, write_card=False)
    return {
        "lora_files": {k: Path(v).relative_to(job.work).as_posix() for k, v in files.items()},
        "lora_formats_skipped": skipped,
    }


def load_frames(job: Job, frames: list[dict[str, Any]]) -> list[Any]:
    """The story's frames as RGB images, decoded once for scoring and the report."""
    from PIL import Image

    return [Image.open(job.work / f["image"]).convert("RGB") for f in frames]


def run_score(job: Job, scorer: Any, images: list[Any]) -> Any:
    from kolors_job.score.aesthetic import score_story

    return score_story(images, job.manifest.spec.score, scorer)


def run_report(
    job: Job,
    models: ResolvedModels,
    dataset: dict[str, Any],
    train: dict[str, Any],
    frames: list[dict[str, Any]],
    images: list[Any],
    scores: Any,
) -> dict[str, Any]:
    """story.jpg, the LoRA exports + model card, report.json/html, and the challenge submission."""
    from kolors_job.export import write_model_card
    from kolors_job.manifest.recipe import describe
    from kolors_job.report import model as rm
    from kolors_job.report.html import device_info, package_versions, tile_frames, write_report
    from kolors_job.report.submission import build_submission, check_submission
    from kolors_job.story.pipeline import sampler_record
    from kolors_job.train.validation import fetch_images

    spec = job.manifest.spec
    story_path = job.work / "story.jpg"
    # the reference notebook: 4 rows of 2 frames, resized to 1024 wide x 2048 high (story.tiling says how)
    tile_frames(images, spec.story.tiling).save(story_path, quality=92)

    for f, s in zip(frames, scores.per_image, strict=True):
        f["score"] = s
    score_dict = scores.to_dict()
    lora_files = {k: job.work / v for k, v in train["lora_files"].items()}
    card_data = dict(dataset)
    if parts := card_data.pop("datasets", None):  # several: one line each, not their whole sections
        card_data["datasets"] = "; ".join(f"{d['source']}: {d['kept']} kept" for d in parts)
    card = write_model_card(job.work / "lora", lora_info(job, train), score_dict, card_data, files=lora_files)
    job.upload("lora/README.md", card)

    fetched = [d["fetched"] for d in dataset.get("datasets") or [dataset] if d.get("fetched")]  # hub datasets too
    sources = models.sources + fetched
    # report.json has these at the top level
    lora_summary = ("lora_files", "lora_formats_skipped", "validation", "selected_checkpoint")
    fetch_images(job.store, job.work, train.get("validation") or [])  # drawn by an earlier process of a rerun
    report = rm.Report(
        job_id=job.job_id,
        manifest_digest=job.digest,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        output=job.output_uri,
        model=rm.Model(
            base=redact_uri(spec.model.base),
            vae=redact_uri(spec.model.vae) if spec.model.vae else None,
            train_vae=redact_uri(spec.model.train_vae) if spec.model.train_vae else None,
            random_weights=models.random_weights,
        ),
        sources=[rm.Source.model_validate(s) for s in sources],
        dataset=rm.Dataset.model_validate(dataset),
        train=rm.Train.model_validate({k: v for k, v in train.items() if k not in lora_summary}),
        story=rm.Story(
            frames=[rm.Frame.model_validate(f) for f in frames],
            settings=spec.story.model_dump(mode="json", exclude={"frames"}),
            sampler=rm.Sampler.model_validate(sampler_record(models.base, spec.story, job.device)),
        ),
        score=rm.Score.model_validate(score_dict),
        lora_files={**train["lora_files"], "card": card.relative_to(job.work).as_posix()},
        lora_formats_skipped=train["lora_formats_skipped"],
        validation=[rm.ValidationPoint.model_validate(p) for p in train.get("validation") or []],
        selected_checkpoint=rm.SelectedCheckpoint.model_validate(train["selected_checkpoint"])
        if train.get("selected_checkpoint") else None,
        recipe=rm.Recipe.model_validate(describe(spec)),
        timings=dict(job.timings),
        storage=rm.Storage(retries=RETRIES.value - job.retries_before),
        device=rm.Device.model_validate(device_info()),
        versions=package_versions(),
        manifest=job.manifest.resolved(),
    )
    if job.memory_plan is not None:
        report.memory = job.memory_plan.to_dict()
    sub = build_submission(
        job.work,
        lora_file=list(lora_files.values()),
        model_card=card,
        images=[job.work / f["image"] for f in frames],
        prompts=frames,
        story_jpg=story_path,
        score=score_dict,
    )
    report.submission = rm.Submission(problems=check_submission(sub))
    job.upload_dir(sub, "submission/")
    write_report(job.work, report)
    for name in ("story.jpg", "report.json", "report.html"):
        job.upload(name, job.work / name)
    return report.to_json_dict()


# ---------------------------------------------------------------------------------------------- recipe


def run_job(job: Job) -> JobOutcome:
    """The whole recipe. Exceptions become a failed/interrupted ``status.json`` and an exit code."""
    with stop_on_signals(job.stop):
        try:
            try:
                return _run(job)
            except OSError as e:  # the scratch or cache disk: full, read-only, a file where a dir must be
                if e.errno not in _FILESYSTEM_FAULTS:
                    raise
                raise os_error(e, f"local file {scrub(str(e.filename or job.work))}") from None
        except JobError as e:
            state = "interrupted" if e.exit_code == ExitCode.TEMPORARY else "failed"
            message = scrub(str(e))
            log.error("%s", message, extra={"exit_code": int(e.exit_code)})
            _safe_finish(job, state, e.exit_code, message)
            return JobOutcome(job.job_id, job.output_uri, e.exit_code, state, message)
        except Exception as e:  # a bug: keep the traceback in the log, one line in status.json
            message = scrub(f"{type(e).__name__}: {e}")
            log.exception("internal error: %s", message)
            _safe_finish(job, "failed", ExitCode.INTERNAL, message)
            return JobOutcome(job.job_id, job.output_uri, ExitCode.INTERNAL, "failed", message)
        finally:
            if job.claim is not None:
                job.claim.release()
            if job.scratch_owner is not None:
                job.scratch_owner.close()
            if job.world == 1:  # nothing in scratch is reused by a rerun (it resumes from the output store)
                shutil.rmtree(job.work, ignore_errors=True)
                with contextlib.suppress(OSError):
                    job.work.parent.rmdir()  # the job's directory, when no other run of it is using it


_FILESYSTEM_FAULTS = TEMPORARY_ERRNOS | {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.ENAMETOOLONG}
"""Local faults that are the environment's, not a bug: one line and exit 75 or 5 (see storage.local)."""


def _safe_finish(job: Job, state: str, code: ExitCode, message: str) -> None:
    if not job.owns_output or (job.claim is not None and job.claim.lost.is_set()):
        return  # e.g. a conflict, or a lost claim: that prefix's status.json belongs to another run
    try:
        job.status.finish(state, int(code), message)
    except Exception as e:  # storage may be the thing that failed
        log.warning("could not write status.json: %s", scrub(str(e)))


def _run(job: Job) -> JobOutcome:
    log.info("job %s → %s", job.job_id, job.output_uri, extra={"manifest_digest": job.digest})
    check_device_first(job)  # before the first network call: nothing is read or written on a wrong node
    if job.local_main:  # what killed or preempted runs left on this work volume (never a live run's)
        scratch.sweep(job.settings.resolved_work_dir, keep=job.run_root)
    # Nothing is written before this check: a finished run or another manifest's run stays untouched.
    # A finished run of this manifest is seen without claiming anything: a no-op rerun writes nothing.
    finished = _already_finished(job)
    if not finished:
        with job.main_first():  # rank 0 claims, checks (and with --force clears) the prefix before the others look
            if job.main:
                claim_output(job)
            finished = prepare_output(job)
    if finished:
        msg = f"{job.output_uri}: already complete (_SUCCESS exists); use --force to recompute"
        log.info(msg)
        return JobOutcome(job.job_id, job.output_uri, ExitCode.OK, "skipped", msg)
    job.owns_output = True
    job.work.mkdir(parents=True, exist_ok=True)
    job.scratch_owner = scratch.ScratchOwner(job.run_root)

    with job.local_main_first():  # one download per node; its other ranks then hit the cache
        with job.stage("models"):
            models = resolve_models(job)

        with job.stage("dataset"):
            items, dataset = run_dataset(job)
            job.put_json(f"{STATE}/dataset.json", dataset)

    from kolors_job.score.aesthetic import AestheticScorer

    # Workers need the scorer only to pick best-of candidates; rank 0 validates and scores the story too.
    need_scorer = job.main or job.manifest.spec.story.best_of > 1
    scorer = AestheticScorer.load(models.aesthetic, device=job.device) if need_scorer else None

    with job.stage("train", total=job.manifest.spec.train.steps):
        train = run_train(job, models, items, scorer)
    with job.stage("story", total=len(job.manifest.spec.story.frames)):
        frames = run_story(job, models, scorer)

    if not job.main:  # DDP workers are done once their frames are with rank 0; it scores and reports
        return JobOutcome(job.job_id, job.output_uri, ExitCode.OK, "succeeded", "worker finished")

    with job.stage("score"):
        images = load_frames(job, frames)
        scores = run_score(job, scorer, images)

    with job.stage("report"):
        report = run_report(job, models, dataset, train, frames, images, scores)

    gate = job.manifest.spec.score
    if gate.gate and not scores.passed:
        raise_gate = (
            f"quality gate: mean aesthetic score {scores.mean:.3f} is below the threshold {gate.threshold}"
        )
        log.error(raise_gate)
        job.status.finish("failed", int(ExitCode.QUALITY_GATE), raise_gate)
        return JobOutcome(job.job_id, job.output_uri, ExitCode.QUALITY_GATE, "failed", raise_gate, report)

    job.status.finish("succeeded", int(ExitCode.OK))
    job.store.write_bytes("_SUCCESS", b"")
    log.info("job %s succeeded: mean aesthetic %.3f (threshold %s)", job.job_id, scores.mean, gate.threshold)
    return JobOutcome(job.job_id, job.output_uri, ExitCode.OK, "succeeded", "", report)


