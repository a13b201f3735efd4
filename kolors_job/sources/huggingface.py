"""Hugging Face as a hub: its listing (``huggingface_hub.HfApi``) and its download client (``snapshot_download``,
over plain HTTP: Xet off, see ``transport``), each call through ``hub_errors.call_hub``."""

from __future__ import annotations

from pathlib import Path

from kolors_job.core.settings import Settings
from kolors_job.core.uris import HUBS, HubRef

from .hub_errors import call_hub
from .listing import Listing, RemoteFile, RepoType, read_timeout

__all__ = ["listing", "snapshot"]


def listing(ref: HubRef, settings: Settings, repo_type: RepoType = "model") -> Listing:
    """The repo's files at the commit the hub names (``sha``), with their sizes and digests."""
    return call_hub(ref, "listing", lambda: _listing(ref, settings, repo_type), settings)


def _listing(ref: HubRef, settings: Settings, repo_type: RepoType) -> Listing:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=settings.hf_endpoint)
    info_of = api.dataset_info if repo_type == "dataset" else api.model_info
    info = info_of(ref.repo_id, revision=ref.revision, files_metadata=True, timeout=read_timeout(settings))
    files = [
        RemoteFile(s.rfilename, int(s.size or 0), s.lfs.sha256 if s.lfs else None, None if s.lfs else s.blob_id)
        for s in info.siblings or []
    ]
    return Listing(files, info.sha, bool(info.sha), ref.revision or HUBS[ref.hub].default_branch)


def snapshot(ref: HubRef, repo_type: RepoType, dest: Path, patterns: list[str] | None, revision: str | None,
             settings: Settings) -> None:
    """``huggingface_hub``'s snapshot client: exactly ``patterns`` (None: everything) at ``revision`` into ``dest``."""
    from huggingface_hub import constants, snapshot_download

    constants.HF_HUB_DISABLE_XET = True  # read at call time: the one transport tested (see transport)
    snapshot_download(
        ref.repo_id, repo_type=repo_type, revision=revision, local_dir=str(dest), allow_patterns=patterns,
        endpoint=settings.hf_endpoint, max_workers=settings.download_workers, etag_timeout=read_timeout(settings),
    )
