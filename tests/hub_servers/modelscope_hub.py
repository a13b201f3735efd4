"""A loopback emulator of the ModelScope hub API, as the pinned ``modelscope`` 1.40.2 client uses it.

``modelscope`` 1.40 delegates to ``modelscope_hub`` (0.5.x); the routes below are the ones that client
sends (read from ``modelscope_hub/_legacy_api.py``, ``_download.py``, ``compat/hub_api.py`` and
``modelscope/msdatasets/utils/hf_datasets_util.py``), answered in the hub's envelope
``{"Code": 200, "Data": ..., "Message": "success", "RequestId": ..., "Success": true}``:

- ``GET /api/v1/{models|datasets}/{owner}/{name}``: repo info (datasets: ``Id`` and ``Type`` 4 =
  "general", which routes ``MsDataset.load`` through the ``datasets`` library).
- ``GET /api/v1/{models|datasets}/{owner}/{name}/revisions``: ``RevisionMap`` with branch ``master``.
- ``GET /api/v1/models/{owner}/{name}/repo/files?Revision=&Recursive=&Root=``: the model listing
  (``Path``, ``Name``, ``Size``, ``Sha256``, ``Type`` blob/tree, ``IsLFS``, ``Revision`` = commit id),
  plus ``LatestCommitter.Id`` = commit id.
- ``GET /api/v1/datasets/{owner}/{name}|{Id}/repo/tree?Revision=&Root=&Recursive=&PageNumber=&PageSize=``.
- ``GET|HEAD /api/v1/{models|datasets}/{owner}/{name}/repo?Revision=&FilePath=``: file bytes, Range.
- ``GET|HEAD /{models|datasets}/{owner}/{name}/resolve/{revision}/{path}``: the HF-style file route
  ``datasets``' file system uses when ``modelscope`` points its ``HF_ENDPOINT`` at this hub.
- Unknown repo, revision or file: HTTP 404 with the hub's error body, which the client raises as
  ``NotExistError`` (``requests.HTTPError`` from ``snapshot_download``).

Revisions accepted: ``master`` and the repo's commit id. ``GET /`` answers 200 (readiness probe).
Region probing (``/api/v1/repos/internalAccelerationInfo``) gets a 404, so the client never follows
a query address off loopback.

Run it: ``python tests/hub_servers/modelscope_hub.py --port 8765 [--root DIR]``, then
``MODELSCOPE_ENDPOINT=http://127.0.0.1:8765`` (read when each ``HubApi``/config is built, not at import).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

try:
    from .artifacts import KOLORS_BOTH_ID, KOLORS_ID, PREDICTOR_CUSTOM_ID  # noqa: F401 - tests import the ids per hub
    from .common import HubHandler, HubServer, Repo, RepoFile, add_default_repos, serve_main
except ImportError:  # run as a script
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.hub_servers.common import HubHandler, HubServer, Repo, RepoFile, add_default_repos, serve_main

PREDICTOR_ID = "AI-ModelScope/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE"
ANIME_ID = "AI-ModelScope/lowres_anime"
VAE_FP16_FIX_ID = "AI-ModelScope/sdxl-vae-fp16-fix"
"""What the reference's ``download_models(["SDXL-vae-fp16-fix"])`` fetches (DiffSynth's model_config.py)."""
DATASET_TYPE_GENERAL = 4
COMMITTED_AT = 1720500000  # a fixed epoch second (July 2024), so listings are reproducible


class ModelScopeHandler(HubHandler):
    owner: ModelScopeHub

    def ok(self, data: object) -> None:
        self.send_json(
            200,
            {"Code": 200, "Data": data, "Message": "success", "RequestId": str(uuid.uuid4()), "Success": True},
        )

    def not_found(self, what: str) -> None:
        self.send_json(
            404,
            {"Code": 10010205001, "Message": f"{what} not found", "RequestId": str(uuid.uuid4()), "Success": False},
        )

    def route(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if url.path == "/":
            return self.send_bytes(200, b"modelscope hub emulator ready\n")
        if parts[:2] == ["api", "v1"] and len(parts) >= 5 and parts[2] in ("models", "datasets"):
            return self.api(parts[2][:-1], parts[3:], query)
        if len(parts) >= 6 and parts[0] in ("models", "datasets") and parts[3] == "resolve":
            repo = self.owner.repo(parts[0][:-1], f"{parts[1]}/{parts[2]}")
            return self.file(repo, parts[4], "/".join(parts[5:]))
        if self.command == "POST":  # download statistics and other fire-and-forget posts
            return self.ok(None)
        self.not_found(url.path)

    def api(self, repo_type: str, rest: list[str], query: dict[str, str]) -> None:
        if repo_type == "dataset" and rest[0].isdigit():  # datasets/{Id}/repo/tree
            repo = self.owner.by_numeric_id(int(rest[0]))
            tail = rest[1:]
        else:
            repo = self.owner.repo(repo_type, f"{rest[0]}/{rest[1]}")
            tail = rest[2:]
        if repo is None:
            return self.not_found(f"{repo_type} {'/'.join(rest[:2])}")
        if not tail:
            return self.ok(self.owner.info(repo))
        if tail == ["revisions"]:
            branch = {"Revision": "master", "CommitId": repo.commit, "CreatedAt": COMMITTED_AT}
            return self.ok({"RevisionMap": {"Branches": [branch], "Tags": []}})
        revision = query.get("Revision", "master")
        if tail == ["repo"]:
            return self.file(repo, revision, query.get("FilePath", ""))
        if tail in (["repo", "files"], ["repo", "tree"]):
            if not self.owner.known_revision(repo, revision):
                return self.not_found(f"revision {revision}")
            recursive = query.get("Recursive", "False").lower() == "true"
            entries = self.owner.listing(repo, query.get("Root"), recursive)
            if tail[1] == "tree":
                size = int(query.get("PageSize", 100) or 100)
                page = int(query.get("PageNumber", 1) or 1)
                entries = entries[(page - 1) * size : page * size]
            return self.ok({"Files": entries, "LatestCommitter": self.owner.committer(repo)})
        if self.command == "POST":
            return self.ok(None)
        self.not_found("/".join(tail))

    def file(self, repo: Repo | None, revision: str, path: str) -> None:
        path = (path[2:] if path.startswith("./") else path).lstrip("/")
        if repo is None or not self.owner.known_revision(repo, revision):
            return self.not_found(f"revision {revision}")
        f = repo.files.get(path)
        if f is None:
            return self.not_found(f"file {path}")
        self.send_file(repo, f, {"ETag": f'"{f.sha256}"'})


class ModelScopeHub(HubServer):
    """ModelScope API emulator; repos are added with :meth:`add_model` / :meth:`add_dataset`."""

    handler = ModelScopeHandler
    name = "modelscope-hub"

    @property
    def env(self) -> dict[str, str]:
        return {"MODELSCOPE_ENDPOINT": self.url}

    def add_model(self, repo_id: str, root: Path) -> Repo:
        return self.add(Repo.from_dir(repo_id, root, "model", numeric_id=len(self.repos) + 1))

    def add_dataset(self, repo_id: str, root: Path) -> Repo:
        return self.add(Repo.from_dir(repo_id, root, "dataset", numeric_id=len(self.repos) + 1))

    def by_numeric_id(self, numeric_id: int) -> Repo | None:
        return next((r for r in self.repos.values() if r.numeric_id == numeric_id), None)

    @staticmethod
    def known_revision(repo: Repo, revision: str) -> bool:
        return revision in ("master", repo.commit)

    @staticmethod
    def committer(repo: Repo) -> dict:
        return {
            "Id": repo.commit,
            "ShortId": repo.commit[:8],
            "Title": "Upload folder",
            "Message": "Upload folder",
            "CommitterName": "kolors-job-tests",
            "CommittedDate": COMMITTED_AT,
        }

    def info(self, repo: Repo) -> dict:
        owner, name = repo.repo_id.split("/")
        return {
            "Id": repo.numeric_id,
            "Name": name,
            "Path": owner,
            "ChineseName": name,
            "Type": DATASET_TYPE_GENERAL if repo.repo_type == "dataset" else None,
            "Revision": "master",
            "CreatedTime": COMMITTED_AT,
            "LastUpdatedTime": COMMITTED_AT,
            "IsPublished": 1,
            "Visibility": 5,
            "Private": False,
        }

    def listing(self, repo: Repo, root: str | None, recursive: bool) -> list[dict]:
        folders, files = repo.under(root, recursive)
        common = {"Revision": repo.commit, "CommittedDate": COMMITTED_AT, "CommitterName": "kolors-job-tests"}
        out = [
            {
                **common,
                "Name": d.rsplit("/", 1)[-1],
                "Path": d,
                "Type": "tree",
                "Size": 0,
                "Sha256": "",
                "IsLFS": False,
                "Mode": "40000",
            }
            for d in folders
        ]
        out += [self.entry(f, common) for f in files]
        return out

    @staticmethod
    def entry(f: RepoFile, common: dict) -> dict:
        return {
            **common,
            "Name": f.path.rsplit("/", 1)[-1],
            "Path": f.path,
            "Type": "blob",
            "Size": f.size,
            "Sha256": f.sha256,
            "IsLFS": f.lfs,
            "Mode": "33188",
            "InCheck": False,
        }


def default_hub(root: Path, *, port: int = 0) -> ModelScopeHub:
    """The emulator serving the default artifacts (built under ``root`` if missing) under the real ids."""
    return add_default_repos(ModelScopeHub(port=port), root, predictor_id=PREDICTOR_ID, anime_id=ANIME_ID,
                             vae_fp16_fix_id=VAE_FP16_FIX_ID)


if __name__ == "__main__":
    serve_main(default_hub, "Loopback ModelScope hub emulator serving tiny models in the real layouts.")
