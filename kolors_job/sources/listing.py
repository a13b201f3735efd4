"""Listing a hub repo: its files (path, size, digest) and the one commit they were listed at.

ModelScope and Hugging Face each through their own client (``modelscope_hub.HubApi``, ``huggingface_hub.HfApi``),
every call through ``hub_errors.call_hub`` (one line and an exit code per failure, 429/5xx retried).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from kolors_job.core.errors import InputError
from kolors_job.core.settings import Settings
from kolors_job.core.uris import HubRef

from .hub_errors import call_hub

__all__ = ["DEFAULT_BRANCH", "Listing", "RemoteFile", "RepoType", "list_dataset_repo", "list_repo", "read_timeout"]

log = logging.getLogger(__name__)

RepoType = Literal["model", "dataset"]
DEFAULT_BRANCH: dict[str, str] = {"modelscope": "master", "hf": "main"}
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None = None
    """The content's sha256, when the listing gives it (ModelScope: every file; Hugging Face: LFS files)."""
    oid: str | None = None
    """Hugging Face's git blob id of a file not in LFS (sha1 of ``blob <size>\\0`` + the bytes)."""


@dataclass
class Listing:
    """A hub repo's files as listed, and the one commit they were listed at."""

    files: list[RemoteFile]
    commit: str | None
    pinned: bool
    """Downloads can be pinned to ``commit`` (the hub listed the repo at it)."""
    branch: str
    """The branch/tag listed (the requested revision, else the hub's default branch)."""
    file_revisions: dict[str, str] = field(default_factory=dict)


def list_repo(ref: HubRef, settings: Settings, repo_type: RepoType) -> Listing:
    """``ref``'s files (path, size, digest) and the commit they were listed at (see the module docstring)."""
    if ref.hub == "modelscope":
        return _modelscope_listing(ref, settings, repo_type)
    return call_hub(ref, "listing", lambda: _hf_listing(ref, settings, repo_type), settings)


def _modelscope_listing(ref: HubRef, settings: Settings, repo_type: RepoType = "model") -> Listing:
    """The repo's files at its head commit, and that commit.

    ModelScope gives no repo commit per file: each file's ``Revision`` is the last commit that changed it.
    The repo's head is the listing's ``LatestCommitter.Id``. The files are then listed *at* that commit —
    which both confirms the hub accepts it as a revision and keeps the file table and the commit from
    disagreeing if the branch moves in between. No commit, or a commit the hub will not list at: the
    branch's listing, unpinned.
    """
    from modelscope_hub import HubApi

    api = HubApi(endpoint=settings.modelscope_endpoint)
    branch = ref.revision or DEFAULT_BRANCH["modelscope"]
    asked_commit = ref.revision if ref.revision and _COMMIT.match(ref.revision) else None
    commit = asked_commit or call_hub(ref, "listing", lambda: _modelscope_head(api, ref, repo_type, branch), settings)
    raw = None
    if commit:
        try:
            raw = call_hub(ref, "listing", lambda: api.legacy.list_repo_files(ref.repo_id, repo_type, commit), settings)
        except InputError as err:
            if asked_commit:
                raise
            log.warning("ModelScope will not list %s at its commit %s (%s): downloading from %s, unpinned",
                        ref.uri, commit, err, branch)  # fmt: skip
    pinned = raw is not None
    if raw is None:
        raw = call_hub(ref, "listing", lambda: api.legacy.list_repo_files(ref.repo_id, repo_type, branch), settings)
    blobs = [f for f in raw if f.get("Path") and (f.get("Type") or "blob") != "tree"]
    files = [RemoteFile(str(f["Path"]), int(f.get("Size") or 0), str(f.get("Sha256") or "").lower() or None)
             for f in blobs]  # fmt: skip
    revisions = {str(f["Path"]): str(f.get("Revision") or "") for f in blobs if f.get("Revision")}
    return Listing(files, commit, pinned, branch, revisions)


def _modelscope_head(api: Any, ref: HubRef, repo_type: RepoType, branch: str) -> str | None:
    """The repo's head commit at ``branch``: the listing's ``Data.LatestCommitter.Id`` (one page, one level).

    ``modelscope_hub``'s public listing keeps only ``Data.Files``, so this one request goes through the
    client's transport (its auth, timeouts and typed errors) and reads the envelope itself."""
    segment, route = ("datasets", "tree") if repo_type == "dataset" else ("models", "files")
    params = {"Revision": branch, "Recursive": "False"}
    if repo_type == "dataset":
        params.update(PageNumber="1", PageSize="1")
    resp = api.legacy._request("GET", f"{segment}/{ref.repo_id}/repo/{route}", params=params, single_attempt=True)
    data = resp.json().get("Data") or {}
    latest = data.get("LatestCommitter") if isinstance(data, dict) else None
    commit = str((latest or {}).get("Id") or "").lower()
    return commit if _COMMIT.match(commit) else None


def list_dataset_repo(ref: HubRef, settings: Settings) -> tuple[list[RemoteFile], str | None]:
    """A hub dataset repo's files (path, size) and the commit they were listed at (see :func:`list_repo`)."""
    listing = list_repo(ref, settings, "dataset")
    return listing.files, listing.commit


def read_timeout(settings: Settings) -> int:
    return max(1, math.ceil(settings.storage_read_timeout_s))


def _hf_listing(ref: HubRef, settings: Settings, repo_type: RepoType = "model") -> Listing:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=settings.hf_endpoint)
    info_of = api.dataset_info if repo_type == "dataset" else api.model_info
    info = info_of(ref.repo_id, revision=ref.revision, files_metadata=True, timeout=read_timeout(settings))
    files = [
        RemoteFile(s.rfilename, int(s.size or 0), s.lfs.sha256 if s.lfs else None, None if s.lfs else s.blob_id)
        for s in info.siblings or []
    ]
    return Listing(files, info.sha, bool(info.sha), ref.revision or DEFAULT_BRANCH["hf"])
