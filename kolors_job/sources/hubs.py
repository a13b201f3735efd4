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
   ``allow_patterns`` = the chosen files), and writes a completion record last. The clients verify
   sizes and digests per file; the record is what lets a later job reuse the copy offline.

``choose_weights`` is shared with the loader (``models.load_kolors_components``), so the variant
picked from a remote listing and the one read from the local copy are the same decision.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from kolors_job.errors import ExitCode, InputError, JobError, StorageDeniedError
from kolors_job.redact import one_line
from kolors_job.settings import Settings
from kolors_job.storage.atomic import atomic_target

__all__ = [
    "FULL_SIZE_UNET_BYTES",
    "HUB_SCHEMES",
    "HubRef",
    "Plan",
    "RemoteFile",
    "SourceRecord",
    "check_hub_uri",
    "choose_weights",
    "download",
    "download_dataset_files",
    "list_dataset_repo",
    "local_variant",
    "local_weights",
    "parse_hub_uri",
    "plan_hub_model",
    "select_files",
]

log = logging.getLogger(__name__)

Hub = Literal["modelscope", "hf"]
ModelKind = Literal["pipeline", "vae", "aesthetic"]

HUB_SCHEMES: tuple[Hub, ...] = ("modelscope", "hf")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_REVISION = re.compile(r"^[\w.\-/]+$")

RECORD_NAME = ".kolors_job_source.json"
"""Written last into a downloaded copy: the files it holds and the commit they came from."""

FULL_SIZE_UNET_BYTES = 1 << 30
"""A UNet weight file at least this large is a real model (Kolors fp16: 5.16 GB; the tiny one: KB)."""

DIFFUSERS_WEIGHTS = (("diffusion_pytorch_model", "safetensors"), ("diffusion_pytorch_model", "bin"))
TRANSFORMERS_WEIGHTS = (("model", "safetensors"), ("pytorch_model", "bin"))
"""(file stem, extension) in the order ``from_pretrained`` prefers them: safetensors before pickles."""

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


# --------------------------------------------------------------------------------------------- uris


@dataclass(frozen=True)
class HubRef:
    """``modelscope://Owner/Name[@rev]`` or ``hf://Owner/Name[@rev]``."""

    hub: Hub
    repo_id: str
    revision: str | None

    @property
    def uri(self) -> str:
        return f"{self.hub}://{self.repo_id}" + (f"@{self.revision}" if self.revision else "")

    @property
    def hub_name(self) -> str:
        return "ModelScope" if self.hub == "modelscope" else "Hugging Face"


def check_hub_uri(scheme: str, rest: str) -> None:
    """Raise ValueError unless ``rest`` (what follows ``modelscope://``/``hf://``) is ``OWNER/NAME[@REVISION]``."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w./-]+)?", rest):
        raise ValueError(f"{scheme}:// URI must be {scheme}://OWNER/NAME[@REVISION]")


def parse_hub_uri(uri: str) -> HubRef | None:
    """The hub reference in ``uri``, None when it names no hub; a malformed hub URI is an InputError."""
    scheme, sep, rest = uri.strip().partition("://")
    if not sep or scheme.lower() not in HUB_SCHEMES:
        return None
    repo_id, at, revision = rest.strip("/").partition("@")
    if not _REPO_ID.match(repo_id) or (at and not _REVISION.match(revision)):
        raise InputError(f"bad hub uri {uri!r}: expected {scheme.lower()}://OWNER/NAME[@REVISION]")
    return HubRef(scheme.lower(), repo_id, revision or None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int


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


def local_variant(folder: Path, names: Iterable[tuple[str, str]], *, prefer_fp16: bool) -> str | None:
    """The ``variant=`` to pass to ``from_pretrained`` for a local directory (:func:`local_weights`)."""
    return local_weights(folder, names, prefer_fp16=prefer_fp16)[1]


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
    """The requested branch/tag/commit (None: the hub's default branch)."""
    commit: str | None = None
    """The commit the files came from, when the hub names one."""
    files: int = 0
    bytes_total: int = 0
    bytes_downloaded: int = 0
    bytes_reused: int = 0
    variants: dict[str, str | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Plan:
    """One hub model, listed and selected, not yet downloaded."""

    ref: HubRef
    kind: ModelKind
    files: list[RemoteFile]
    variants: dict[str, str | None]
    commit: str | None
    dest: Path

    @property
    def bytes_total(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def full_size(self) -> bool:
        """Whether this is a real (GPU-sized) Kolors: its UNet weights alone pass a gigabyte."""
        return sum(f.size for f in self.files if f.path.startswith("unet/")) >= FULL_SIZE_UNET_BYTES

    def missing(self) -> list[RemoteFile]:
        """Files not yet in ``dest`` at their listed size (the hub clients re-check digests too)."""
        out = []
        for f in self.files:
            local = self.dest / f.path
            if not (local.is_file() and local.stat().st_size == f.size):
                out.append(f)
        return out


def _dest(ref: HubRef, settings: Settings) -> Path:
    owner, name = ref.repo_id.split("/", 1)
    return Path(settings.cache_dir) / "hub" / ref.hub / owner / name / (ref.revision or "default").replace("/", "--")


def plan_hub_model(
    ref: HubRef, kind: ModelKind, settings: Settings, *, prefer_fp16: bool, skip: Iterable[str] = ()
) -> Plan:
    """List ``ref`` on its hub and choose the files a ``kind`` model loads (no download yet).

    When the hub cannot be reached but an earlier job completed a copy, that copy is planned
    (nothing to download) so a cached model keeps working offline.
    """
    dest = _dest(ref, settings)
    try:
        listing, commit = (_modelscope_listing if ref.hub == "modelscope" else _hf_listing)(ref, settings)
    except JobError as err:
        cached = _read_record(dest)
        if err.exit_code != ExitCode.TEMPORARY or cached is None:
            raise
        log.warning("%s unreachable; using the copy a previous job downloaded: %s", ref.hub_name, err)
        listing = [RemoteFile(p, s) for p, s in cached["sizes"].items()]
        commit = cached.get("commit")
    sizes = {f.path: f.size for f in listing}
    try:
        paths, variants = select_files(kind, sizes, prefer_fp16=prefer_fp16, skip=skip)
    except InputError as err:
        raise InputError(f"{kind} model {ref.uri!r}: {err}") from None
    return Plan(ref, kind, [RemoteFile(p, sizes[p]) for p in paths], variants, commit, dest)


# --------------------------------------------------------------------------------------------- download


def _free_bytes(path: Path) -> int:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def download(plan: Plan, settings: Settings) -> tuple[Path, SourceRecord]:
    """Fetch what ``plan`` is missing into its directory; the record is written only once all is there."""
    missing = plan.missing()
    need = sum(f.size for f in missing)
    record = SourceRecord(
        uri=plan.ref.uri,
        kind=plan.kind,
        revision=plan.ref.revision,
        commit=plan.commit,
        files=len(plan.files),
        bytes_total=plan.bytes_total,
        bytes_downloaded=need,
        bytes_reused=plan.bytes_total - need,
        variants=plan.variants,
    )
    if not missing:
        log.info("%s: all %d files already in the cache (%s)", plan.ref.uri, len(plan.files), _gb(plan.bytes_total))
        _write_record(plan)
        return plan.dest, record
    reserve = settings.cache_reserve_mb << 20
    free = _free_bytes(plan.dest)
    if free < need + reserve:
        raise InputError(
            f"{plan.kind} model {plan.ref.uri!r} needs {_gb(need)} more in the cache {settings.cache_dir} "
            f"(+{_gb(reserve)} reserve) but only {_gb(free)} is free: mount a larger cache volume "
            "(KOLORS_JOB_CACHE_DIR) or pre-stage the weights in a bucket"
        )
    (plan.dest / RECORD_NAME).unlink(missing_ok=True)  # from here until the end the copy is incomplete
    plan.dest.mkdir(parents=True, exist_ok=True)
    log.info(
        "downloading %d of %d files of %s (%s) into %s",
        len(missing), len(plan.files), plan.ref.uri, _gb(need), plan.dest,
    )
    _snapshot(plan.ref, "model", plan.dest, [f.path for f in plan.files], plan.commit or plan.ref.revision, settings)
    still = plan.missing()
    if still:
        raise JobError(
            f"{plan.ref.uri!r}: the download ended without {still[0].path} at its listed size",
            exit_code=ExitCode.TEMPORARY,
        )
    _write_record(plan)
    return plan.dest, record


def _write_record(plan: Plan) -> None:
    data = {"uri": plan.ref.uri, "commit": plan.commit, "sizes": {f.path: f.size for f in plan.files}}
    with atomic_target(plan.dest / RECORD_NAME) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))


def _read_record(dest: Path) -> dict[str, Any] | None:
    """The completion record, if every file it lists is present at its size."""
    try:
        data = json.loads((dest / RECORD_NAME).read_text())
        sizes = {str(k): int(v) for k, v in data["sizes"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    for path, size in sizes.items():
        local = dest / path
        if not (local.is_file() and local.stat().st_size == size):
            return None
    return {"commit": data.get("commit"), "sizes": sizes}


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 10**8 else f"{n / 1e6:.1f} MB"


# --------------------------------------------------------------------------------------------- hubs


def hub_error(ref: HubRef, exc: BaseException) -> JobError:
    """A hub client failure as one line naming the uri, with the exit code a retry policy needs."""
    if isinstance(exc, JobError):
        return exc
    detail = one_line(exc)
    name = type(exc).__name__
    chain = [exc, exc.__cause__, exc.__context__]
    status = next((getattr(getattr(e, "response", None), "status_code", None) for e in chain if e is not None), None)
    if any(isinstance(e, ConnectionError | TimeoutError) for e in chain if e is not None) or name in (
        "ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout", "ChunkedEncodingError", "OfflineModeIsEnabled",
    ) or getattr(exc, "retryable", False) or (isinstance(status, int) and (status >= 500 or status == 429)):
        return JobError(f"{ref.hub_name} unreachable for {ref.uri!r}: {detail}", exit_code=ExitCode.TEMPORARY)
    if "Gated" in name or "Permission" in name or "Authentication" in name or status in (401, 403):
        return StorageDeniedError(f"{ref.hub_name} denied {ref.uri!r}: {detail}")
    if "NotExist" in name or "NotFound" in name or "InvalidParameter" in name or status == 404:
        return InputError(f"{ref.hub_name} has no {ref.uri!r}: {detail}")
    return JobError(f"{ref.hub_name} request for {ref.uri!r} failed ({name}): {detail}")


def _modelscope_listing(
    ref: HubRef, settings: Settings, repo_type: Literal["model", "dataset"] = "model"
) -> tuple[list[RemoteFile], str | None]:
    """The repo's files with sizes, and the commit they were read at.

    The raw listing (``modelscope_hub``'s ``list_repo_files``, what ``snapshot_download`` walks) is read
    rather than ``HubApi.get_model_files``, which keeps only ``Path``/``Size`` and so loses the file type
    and the per-file ``Revision`` (the commit id)."""
    from modelscope_hub import HubApi

    try:
        api = HubApi(endpoint=settings.modelscope_endpoint)
        raw = api.legacy.list_repo_files(ref.repo_id, repo_type, revision=ref.revision or "master")
    except Exception as exc:  # the client raises many types: classify by what a retry can fix
        raise hub_error(ref, exc) from exc
    blobs = [f for f in raw if f.get("Path") and (f.get("Type") or "blob") != "tree"]
    files = [RemoteFile(str(f["Path"]), int(f.get("Size") or 0)) for f in blobs]
    # one commit for every file is the repo's resolved revision: recorded, and the download is pinned to it
    commits = {str(f.get("Revision") or "") for f in blobs}
    commit = commits.pop() if len(commits) == 1 else None
    return files, commit if commit and re.fullmatch(r"[0-9a-f]{7,64}", commit) else None


def list_dataset_repo(ref: HubRef, settings: Settings) -> tuple[list[RemoteFile], str | None]:
    """A hub dataset repo's files (path, size) and the commit they were listed at."""
    if ref.hub == "modelscope":
        return _modelscope_listing(ref, settings, "dataset")
    try:
        from huggingface_hub import HfApi

        info = HfApi(endpoint=settings.hf_endpoint).dataset_info(
            ref.repo_id, revision=ref.revision, files_metadata=True
        )
        return [RemoteFile(s.rfilename, int(s.size or 0)) for s in info.siblings or []], info.sha
    except Exception as exc:
        raise hub_error(ref, exc) from exc


def download_dataset_files(ref: HubRef, dest: Path, paths: list[str] | None, commit: str | None,
                           settings: Settings) -> None:
    """Fetch ``paths`` (None: the whole repo) of a hub dataset at ``commit`` into ``dest``."""
    _snapshot(ref, "dataset", dest, paths, commit or ref.revision, settings)


def _snapshot(ref: HubRef, repo_type: Literal["model", "dataset"], dest: Path, paths: list[str] | None,
              revision: str | None, settings: Settings) -> None:
    """The hub's own snapshot client: exactly ``paths`` (None: everything) at ``revision`` into ``dest``."""
    patterns = [_literal(p) for p in paths] if paths is not None else None
    try:
        if ref.hub == "modelscope":
            from modelscope import snapshot_download
            from modelscope.hub.snapshot_download import dataset_snapshot_download

            (dataset_snapshot_download if repo_type == "dataset" else snapshot_download)(
                ref.repo_id, revision=revision, local_dir=str(dest), allow_patterns=patterns,
                max_workers=settings.download_workers, endpoint=settings.modelscope_endpoint,
            )
        else:
            from huggingface_hub import snapshot_download

            snapshot_download(
                ref.repo_id, repo_type=repo_type, revision=revision, local_dir=str(dest), allow_patterns=patterns,
                endpoint=settings.hf_endpoint, max_workers=settings.download_workers,
            )
    except Exception as exc:
        raise hub_error(ref, exc) from exc


def _hf_listing(ref: HubRef, settings: Settings) -> tuple[list[RemoteFile], str | None]:
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=settings.hf_endpoint).model_info(ref.repo_id, revision=ref.revision, files_metadata=True)
    except Exception as exc:
        raise hub_error(ref, exc) from exc
    files = [RemoteFile(s.rfilename, int(s.size or 0)) for s in info.siblings or []]
    return files, info.sha


def _literal(path: str) -> str:
    """A glob matching exactly ``path`` (file names may hold ``[``)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in path) if any(c in "*?[" for c in path) else path

