"""ModelScope as a hub: its listing (``modelscope_hub.HubApi``) and its download client (``modelscope``'s
``snapshot_download``), each call through ``hub_errors.call_hub``."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from kolors_job.core.errors import InputError
from kolors_job.core.settings import Settings
from kolors_job.core.uris import HUBS, HubRef

from .hub_errors import call_hub
from .listing import Listing, RemoteFile, RepoType

__all__ = ["listing", "snapshot"]

log = logging.getLogger(__name__)

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def listing(ref: HubRef, settings: Settings, repo_type: RepoType = "model") -> Listing:
    """The repo's files at its head commit, and that commit.

    ModelScope gives no repo commit per file: each file's ``Revision`` is the last commit that changed it.
    The repo's head is the listing's ``LatestCommitter.Id``. The files are then listed *at* that commit —
    which both confirms the hub accepts it as a revision and keeps the file table and the commit from
    disagreeing if the branch moves in between. No commit, or a commit the hub will not list at: the
    branch's listing, unpinned.
    """
    from modelscope_hub import HubApi

    api = HubApi(endpoint=settings.modelscope_endpoint)
    branch = ref.revision or HUBS[ref.hub].default_branch
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


def snapshot(ref: HubRef, repo_type: RepoType, dest: Path, patterns: list[str] | None, revision: str | None,
             settings: Settings) -> None:
    """``modelscope``'s snapshot client: exactly ``patterns`` (None: everything) at ``revision`` into ``dest``."""
    from modelscope import snapshot_download
    from modelscope.hub.snapshot_download import dataset_snapshot_download

    (dataset_snapshot_download if repo_type == "dataset" else snapshot_download)(
        ref.repo_id, revision=revision, local_dir=str(dest), allow_patterns=patterns,
        max_workers=settings.download_workers, endpoint=settings.modelscope_endpoint,
    )
