"""Hubs (ModelScope, Hugging Face) as sources: list a repo, choose exactly the files the loader reads, download.

A hub repo holds more than one job needs: the real ``Kwai-Kolors/Kolors-diffusers`` ships only
fp16-variant weights (``unet/diffusion_pytorch_model.fp16.safetensors``, a ChatGLM sharded as
``text_encoder/model.fp16-0000N-of-00003.safetensors`` + ``model.safetensors.index.fp16.json``),
other repos ship both plain and variant files, and the aesthetic predictor ships a pickled
``pytorch_model.bin`` beside custom-code files the loader never imports. So a hub source is
resolved in two steps:

1. ``plan_hub_model``: one listing call; ``select_files`` picks, per component, one weight variant
   (fp16 when the run computes in half precision or when that is all there is) and the configs and
   tokenizer files ``from_pretrained`` opens — nothing else. The plan knows the sizes, so the runner
   can refuse a full-size model on a machine without a GPU *before* 17 GB travel.
2. ``download``: checks the cache's free space against the bytes still missing, downloads with the
   hub's own client (``modelscope.snapshot_download`` / ``huggingface_hub.snapshot_download`` with
   ``allow_patterns`` = the chosen files) at the listed commit, one job at a time per copy, verifies every
   file against the listing's digests and writes a completion record last (``records``); that record is
   what lets a later job reuse the copy without the hub, offline included.

**One commit per source.** The listing's repo commit (Hugging Face: ``sha``; ModelScope: the listing's
``LatestCommitter.Id`` — each file's own ``Revision`` there is the last commit that touched *it*) is
recorded and every download is pinned to it, so the files of one job all come from one commit even if
the branch moves meanwhile. Where ModelScope names no commit, or refuses to list at it, the job downloads
from the branch and says so: ``pinned: false``, the branch, and the per-file revisions it got.

``choose_weights`` (``models.weights``) is shared with the loader, so the variant picked from a remote listing
and the one read from the local copy are the same decision; listing a repo is ``listing``'s.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from kolors_job.core.errors import ExitCode, InputError, JobError
from kolors_job.core.settings import Settings
from kolors_job.core.uris import HUBS, HubRef
from kolors_job.models.weights import DIFFUSERS_WEIGHTS, FULL_SIZE_UNET_BYTES, TRANSFORMERS_WEIGHTS, choose_weights

from . import huggingface, modelscope, records, transport
from .hub_errors import IncompleteDownload, call_hub, local_error
from .listing import Listing, RemoteFile, RepoType

__all__ = [
    "CLIP_PROCESSOR_FILES",
    "ModelKind",
    "Plan",
    "SourceRecord",
    "check_free_space",
    "download",
    "download_dataset_files",
    "list_dataset_repo",
    "list_repo",
    "plan_from_listing",
    "plan_hub_model",
    "select_files",
]

log = logging.getLogger(__name__)

ModelKind = Literal["pipeline", "vae", "aesthetic"]



CLIP_PROCESSOR_FILES = (
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
)
"""What ``CLIPProcessor.from_pretrained`` opens (missing optional ones are simply not listed)."""


# --------------------------------------------------------------------------------------------- selection




CLIENTS: dict[str, ModuleType] = {"modelscope": modelscope, "hf": huggingface}
"""Each hub's client, by scheme (``core.uris.HUBS`` has the hub's name, token variable and default branch): a module
with ``listing(ref, settings, repo_type) -> Listing`` and ``snapshot(ref, repo_type, dest, patterns, revision,
settings)``. A hub is its facts there, its client module here, and this line."""


def list_repo(ref: HubRef, settings: Settings, repo_type: RepoType) -> Listing:
    """``ref``'s files (path, size, digest) and the commit they were listed at (see the module docstring)."""
    return CLIENTS[ref.hub].listing(ref, settings, repo_type)







def list_dataset_repo(ref: HubRef, settings: Settings) -> tuple[list[RemoteFile], str | None]:
    """A hub dataset repo's files (path, size) and the commit they were listed at (see :func:`list_repo`)."""
    listing = list_repo(ref, settings, "dataset")
    return listing.files, listing.commit



def select_files(
    kind: ModelKind, listing: Iterable[str], *, prefer_fp16: bool, skip: Iterable[str] = ()
) -> tuple[list[str], dict[str, str | None]]:
    """The repo paths a ``kind`` model loads, and the variant chosen per component.

    ``skip`` names pipeline components the job replaces (``vae`` when ``model.vae`` is set): their
    config still comes along (diffusers validates the pipeline layout), their weights do not.
    Raises InputError naming what is missing, so a wrong repo fails before any download.
    """
    paths = sorted(set(listing))
    have = set(paths)
    chosen: list[str] = []
    variants: dict[str, str | None] = {}

    def need(path: str, what: str) -> None:
        if path not in have:
            raise InputError(f"{what}: the repo has no {path}")
        chosen.append(path)

    def weights(folder: str, names: tuple[tuple[str, str], ...], what: str) -> None:
        files, variant = choose_weights(paths, folder, names, prefer_fp16=prefer_fp16)
        if not files:
            where = f"{folder}/" if folder else "the top level"
            raise InputError(f"{what}: no weight file in {where} ({', '.join(s + '*.' + e for s, e in names)})")
        chosen.extend(files)
        variants[folder or "."] = variant

    if kind == "pipeline":
        need("model_index.json", "pipeline")
        need("scheduler/scheduler_config.json", "pipeline")
        tokenizer = [p for p in paths if p.startswith("tokenizer/")]
        if not tokenizer:
            raise InputError("pipeline: the repo has no tokenizer/ files")
        chosen.extend(tokenizer)
        parts = (("unet", DIFFUSERS_WEIGHTS), ("vae", DIFFUSERS_WEIGHTS), ("text_encoder", TRANSFORMERS_WEIGHTS))
        for part, names in parts:
            need(f"{part}/config.json", part)
            if part not in skip:
                weights(part, names, part)
    elif kind == "vae":
        folder = "" if "config.json" in have else "vae"
        need(f"{folder}/config.json".lstrip("/"), "vae")
        weights(folder, DIFFUSERS_WEIGHTS, "vae")
    elif kind == "aesthetic":
        need("config.json", "aesthetic predictor")
        need("preprocessor_config.json", "aesthetic predictor")
        chosen.extend(p for p in CLIP_PROCESSOR_FILES[1:] if p in have)
        weights("", TRANSFORMERS_WEIGHTS, "aesthetic predictor")
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    return sorted(set(chosen)), variants


# --------------------------------------------------------------------------------------------- plan


@dataclass
class SourceRecord:
    """What report.json says about one source: where it came from, which commit, what it cost."""

    uri: str
    kind: str
    revision: str | None = None
    """The requested branch/tag/commit (None: the hub's default branch); the branch downloaded from when
    ``pinned`` is false."""
    commit: str | None = None
    """The repo commit the files came from, when the hub names one."""
    files: int = 0
    bytes_total: int = 0
    bytes_downloaded: int = 0
    """Bytes this job received (a resumed file counts only its remainder)."""
    bytes_reused: int = 0
    """The rest: files already in the cache, and the part of a file an earlier attempt received."""
    variants: dict[str, str | None] = field(default_factory=dict)
    pinned: bool | None = None
    """Every download was pinned to ``commit`` (None: not a hub source)."""
    file_revisions: dict[str, str] | None = None
    """When not pinned: the revision the hub's listing gave for each file (the last commit touching it)."""

    def to_dict(self) -> dict[str, Any]:
        """report.json's entry; ``pinned`` and ``file_revisions`` only where they say something."""
        out = asdict(self)
        for key in ("pinned", "file_revisions"):
            if out[key] is None:
                del out[key]
        return out




@dataclass
class Plan:
    """One hub repo's chosen files, listed and selected, not yet downloaded."""

    ref: HubRef
    kind: ModelKind | Literal["dataset"]
    files: list[RemoteFile]
    variants: dict[str, str | None]
    commit: str | None
    dest: Path
    pinned: bool = True
    branch: str | None = None
    file_revisions: dict[str, str] = field(default_factory=dict)
    export_bytes: int = 0
    """Bytes the job will write beside the download (a dataset's export), counted in the free-space check."""

    @property
    def bytes_total(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def revision(self) -> str | None:
        """What the client downloads at: the commit when pinned, else the branch."""
        return self.commit if self.pinned and self.commit else (self.branch or self.ref.revision)

    @property
    def full_size(self) -> bool:
        """Whether this is a real (GPU-sized) Kolors: its UNet weights alone pass a gigabyte."""
        return sum(f.size for f in self.files if f.path.startswith("unet/")) >= FULL_SIZE_UNET_BYTES

    def missing(self) -> list[RemoteFile]:
        """Files not yet in ``dest`` at their listed size (digests are checked once the download ends)."""
        out = []
        for f in self.files:
            local = self.dest / f.path
            if not (local.is_file() and local.stat().st_size == f.size):
                out.append(f)
        return out

    def needs(self) -> int:
        """Bytes this plan still has to write into the cache: the missing files less what partial files
        already hold (a resume, or another job's download under way: renamed into place, not copied), and
        the export."""
        fetch = 0
        if records.reusable(self.dest, self.files) is None:
            fetch = max(0, sum(f.size for f in self.missing()) - records.partial_bytes(self.dest))
        return fetch + self.export_bytes


def _dest(ref: HubRef, settings: Settings) -> Path:
    owner, name = ref.repo_id.split("/", 1)
    return Path(settings.cache_dir) / "hub" / ref.hub / owner / name / (ref.revision or "default").replace("/", "--")


def plan_from_listing(
    ref: HubRef, kind: ModelKind | Literal["dataset"], listing: Listing, paths: Iterable[str], dest: Path,
    *, variants: dict[str, str | None] | None = None, export_bytes: int = 0,
) -> Plan:
    """A plan for ``paths`` of ``listing`` (shared by models and datasets)."""
    by_path = {f.path: f for f in listing.files}
    chosen = sorted(set(paths))
    revisions = {} if listing.pinned else {p: listing.file_revisions[p] for p in chosen if p in listing.file_revisions}
    return Plan(ref, kind, [by_path[p] for p in chosen], variants or {}, listing.commit, dest, listing.pinned,
                listing.branch, revisions, export_bytes)  # fmt: skip


def plan_hub_model(
    ref: HubRef, kind: ModelKind, settings: Settings, *, prefer_fp16: bool, skip: Iterable[str] = ()
) -> Plan:
    """List ``ref`` on its hub and choose the files a ``kind`` model loads (no download yet).

    When the hub cannot be reached but an earlier job completed a copy, that copy is planned
    (nothing to download) so a cached model keeps working offline.
    """
    dest = _dest(ref, settings)
    try:
        listing = list_repo(ref, settings, "model")
    except JobError as err:
        cached = records.read(dest)
        if err.exit_code != ExitCode.TEMPORARY or cached is None:
            raise
        log.warning("%s unreachable; using the copy a previous job downloaded: %s", ref.hub_name, err)
        listing = _listing_from_record(ref, cached)
    sizes = {f.path: f.size for f in listing.files}
    try:
        paths, variants = select_files(kind, sizes, prefer_fp16=prefer_fp16, skip=skip)
    except InputError as err:
        raise InputError(f"{kind} model {ref.uri!r}: {err}") from None
    return plan_from_listing(ref, kind, listing, paths, dest, variants=variants)


def _listing_from_record(ref: HubRef, data: dict[str, Any]) -> Listing:
    files = [RemoteFile(p, int(e["size"]), e.get("sha256"), e.get("oid")) for p, e in data["files"].items()]
    branch = data.get("branch") or ref.revision or HUBS[ref.hub].default_branch
    return Listing(files, data.get("commit"), bool(data.get("pinned", True)), branch,
                   dict(data.get("file_revisions") or {}))  # fmt: skip


# --------------------------------------------------------------------------------------------- download


def _free_bytes(path: Path) -> int:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_free_space(plans: Sequence[Plan | None], settings: Settings) -> None:
    """Refuse (exit 4, one line) when the cache cannot hold what ``plans`` still need, plus the reserve.

    Called once for every source of a job before the first download, so a job never downloads 17 GB of
    model only to find no room for the dataset; :func:`download` repeats it for its own plan.
    """
    by_dest = {p.dest: p for p in plans if p is not None}
    needs = [(p, p.needs()) for p in by_dest.values()]
    need = sum(n for _, n in needs)
    if not need:
        return
    reserve = settings.cache_reserve_mb << 20
    free = _free_bytes(next(iter(by_dest)))
    if free < need + reserve:
        what = ", ".join(f"{p.kind} {p.ref.uri!r} {_gb(n)}" for p, n in needs if n)
        raise InputError(
            f"the cache {settings.cache_dir} needs {_gb(need)} more ({what}; +{_gb(reserve)} reserve) but only "
            f"{_gb(free)} is free: mount a larger cache volume (KOLORS_JOB_CACHE_DIR) or pre-stage the "
            "weights in a bucket"
        )


def download(plan: Plan, settings: Settings) -> tuple[Path, SourceRecord]:
    """Fetch what ``plan`` is missing into its directory; the record is written only once all is there
    and verified. Jobs sharing the cache take turns per copy (``records.exclusive``). A fault of the
    cache's own disk is one line too (a full disk: 75)."""
    try:
        return _download(plan, settings)
    except OSError as exc:
        if (err := local_error(exc, f"the cache copy of {plan.ref.uri!r}")) is None:
            raise
        raise err from exc


def _download(plan: Plan, settings: Settings) -> tuple[Path, SourceRecord]:
    record = SourceRecord(
        uri=plan.ref.uri, kind=plan.kind, revision=plan.ref.revision if plan.pinned else plan.branch,
        commit=plan.commit, files=len(plan.files), bytes_total=plan.bytes_total, bytes_reused=plan.bytes_total,
        variants=plan.variants, pinned=plan.pinned, file_revisions=None if plan.pinned else plan.file_revisions,
    )  # fmt: skip
    if records.reusable(plan.dest, plan.files) is not None:
        log.info("%s: all %d files already in the cache (%s)", plan.ref.uri, len(plan.files), _gb(plan.bytes_total))
        return plan.dest, record
    with records.exclusive(plan.dest, plan.ref.uri):
        if records.reusable(plan.dest, plan.files) is not None:  # the job we waited for downloaded it
            return plan.dest, record
        check_free_space([plan], settings)
        records.discard(plan.dest)
        plan.dest.mkdir(parents=True, exist_ok=True)
        missing = plan.missing()
        resumed = records.partial_bytes(plan.dest)
        before = records.identities(plan.dest, plan.files)
        log.info(
            "downloading %d of %d files of %s (%s%s) into %s at %s%s", len(missing), len(plan.files), plan.ref.uri,
            _gb(sum(f.size for f in missing)), f", {_gb(resumed)} of it resumed" if resumed else "", plan.dest,
            plan.revision, "" if plan.pinned else " (unpinned: the hub gave no commit to pin to)",
        )  # fmt: skip
        call_hub(plan.ref, "download", lambda: _snapshot_complete(plan, settings), settings)
        bad = records.verify(plan.dest, plan.files)
        if bad:
            for path in bad:
                (plan.dest / path).unlink(missing_ok=True)
            more = f" (and {len(bad) - 1} more files)" if len(bad) > 1 else ""
            raise JobError(
                f"{plan.ref.uri!r}: {bad[0]}{more} did not match the hub's listing and was deleted: rerun to "
                "download it again", exit_code=ExitCode.TEMPORARY,
            )
        records.write(plan.dest, plan.files, {
            "uri": plan.ref.uri, "commit": plan.commit, "pinned": plan.pinned, "branch": plan.branch,
            "file_revisions": plan.file_revisions,
        })  # fmt: skip
        written = records.identities(plan.dest, plan.files)
    # bytes received: the files the client (re)wrote, less what it resumed from earlier partial files
    rewritten = sum(f.size for f in plan.files if written.get(f.path) != before.get(f.path))
    record.bytes_downloaded = max(0, rewritten - resumed)
    record.bytes_reused = plan.bytes_total - record.bytes_downloaded
    return plan.dest, record


def _snapshot_complete(plan: Plan, settings: Settings) -> None:
    repo_type: RepoType = "dataset" if plan.kind == "dataset" else "model"
    _snapshot(plan.ref, repo_type, plan.dest, [f.path for f in plan.files], plan.revision, settings)
    still = plan.missing()
    if still:
        raise IncompleteDownload(
            f"the download of {plan.ref.uri!r} ended without {still[0].path} at its listed size"
        )


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 10**8 else f"{n / 1e6:.1f} MB"










def download_dataset_files(ref: HubRef, dest: Path, paths: list[str] | None, commit: str | None,
                           settings: Settings) -> None:
    """Fetch ``paths`` (None: the whole repo) of a hub dataset at ``commit`` into ``dest``."""
    call_hub(ref, "download", lambda: _snapshot(ref, "dataset", dest, paths, commit or ref.revision, settings),
             settings)  # fmt: skip


def _snapshot(ref: HubRef, repo_type: RepoType, dest: Path, paths: list[str] | None,
              revision: str | None, settings: Settings) -> None:
    """The hub's own snapshot client: exactly ``paths`` (None: everything) at ``revision`` into ``dest``."""
    patterns = [_literal(p) for p in paths] if paths is not None else None
    if wrong := transport.check_in_force(settings):
        log.warning("the hub clients in this process were configured at import with other values than these "
                    "settings want (they read them once): %s", ", ".join(wrong))  # fmt: skip
    CLIENTS[ref.hub].snapshot(ref, repo_type, dest, patterns, revision, settings)






def _literal(path: str) -> str:
    """A glob matching exactly ``path`` (file names may hold ``[``)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in path) if any(c in "*?[" for c in path) else path
