"""A loopback emulator of the ModelScope hub API, as the pinned ``modelscope`` 1.40.2 client uses it.

``modelscope`` 1.40 delegates to ``modelscope_hub`` (0.5.x); the routes below are the ones that client
sends (read from ``modelscope_hub/_legacy_api.py``, ``_download.py``, ``compat/hub_api.py`` and
``modelscope/msdatasets/utils/hf_datasets_util.py``), answered in the hub's envelope
``{"Code": 200, "Data": ..., "Message": "success", "RequestId": ..., "Success": true}``:

- ``GET /api/v1/{models|datasets}/{owner}/{name}``: repo info (datasets: ``Id`` and ``Type`` 4 =
  "general", which routes ``MsDataset.load`` through the ``datasets`` library).
- ``GET /api/v1/{models|datasets}/{owner}/{name}/revisions``: ``RevisionMap`` with branch ``master``
  (``Revision``, ``CreatedAt``: the fields ``compat/hub_api.get_valid_revision_detail`` reads).
- ``GET /api/v1/models/{owner}/{name}/repo/files?Revision=&Recursive=&Root=``: the model listing.
  **Each file's ``Revision`` is the last commit that touched it, not the repo's head** — the shape of a
  recorded real response (a public client's test fixture of ``GET https://modelscope.cn/api/v1/models/
  qwen/Qwen2.5-0.5B-Instruct-GGUF/repo/files?Recursive=true``: ``.gitattributes`` at ``cbee0850…`` "merge
  main", committed 1726842501, the ``.gguf`` at ``2e50b77b…`` "upload weights", 1726665606; and the client's
  own docstring in ``modelscope/hub/utils/caching.py``: ``[{'Path': 'configuration.json', 'Revision':
  'f01dxxx'}, {'Path': 'model.bin', 'Revision': '1159xxx'}]``). Fields per file: ``Path``, ``Name``,
  ``Size``, ``Sha256``, ``Type`` blob/tree, ``IsLFS``, ``Mode``, ``InCheck``, ``Revision``,
  ``CommitMessage``, ``CommittedDate``, ``CommitterName``. The repo's head commit is ``Data.LatestCommitter``
  (``Id``, ``ShortId``, ``Title``, ``Message``, ``CommitterName``, ``CommittedDate``), which public tools
  read from real responses (one compares ``LatestCommitter.ShortId`` with its pinned commit; another notes
  that a saved response left ``LatestCommitter.Id`` empty: :attr:`ModelScopeHub.blank_commit_id`).
- ``GET /api/v1/datasets/{owner}/{name}|{Id}/repo/tree?Revision=&Root=&Recursive=&PageNumber=&PageSize=``:
  the same entries, paged, with ``Data.TotalCount`` and ``Data.LatestCommitter`` (a public pinned-dataset
  tool reads both from ``modelscope.cn``'s ``repo/tree``).
- A commit id as ``Revision`` is accepted for listings and downloads of models and datasets, as the same
  public tools use it against ``modelscope.cn`` (``repo/files?Revision=<sha>``, ``repo?Revision=<sha>&
  FilePath=``, ``datasets/{id}/resolve/{sha}/{path}``); :attr:`ModelScopeHub.refuse_commit_revisions` makes
  the hub refuse them instead (older clients refused SHAs, modelscope issue #1386).
- ``GET|HEAD /api/v1/{models|datasets}/{owner}/{name}/repo?Revision=&FilePath=``: a small file's bytes
  (Range honoured); an LFS file (``IsLFS``) answers **302 to a presigned OSS URL on a second loopback host**
  (:class:`~tests.hub_servers.common.CdnServer`), fresh for every request, which expires: a resume always
  comes back here for a new one, as ``_download_with_resume`` does.
- ``GET|HEAD /{models|datasets}/{owner}/{name}/resolve/{revision}/{path}``: the HF-style file route
  ``datasets``' file system uses when ``modelscope`` points its ``HF_ENDPOINT`` at this hub.
- ``GET /api/v1/repos/internalAccelerationInfo``: the region-acceleration probe ``DownloadManager.
  _detect_region_uncached`` sends (0.2 s timeout) before the first download. Answered with the shape that
  code reads, ``Data.InternalRegionQueryAddress``: an address that answers the caller's region as text. On
  Alibaba Cloud that is the ECS metadata service; here the CDN host's ``/latest/meta-data/region-id``
  stands in for it and, like the metadata service seen from anywhere else, does not answer (404) unless a
  test sets :attr:`~tests.hub_servers.common.HubServer.region` — then the client sends
  ``x-aliyun-region-id`` with its downloads (recorded in :attr:`ModelScopeHub.region_headers`). (The
  real body could not be observed from outside Alibaba Cloud; the two public emulators found answer
  ``{}``, which the client treats the same as a probe that fails.)
- Unknown repo, revision or file: HTTP 404 with the hub's error body, which the client raises as
  ``NotExistError`` (``requests.HTTPError`` from ``snapshot_download``). Injected failures
  (:meth:`~tests.hub_servers.common.HubServer.failing`) answer in the same envelope with ``Code`` = the
  status: ``modelscope_hub.errors.raise_for_status`` maps 401 → ``AuthenticationError``, 403 →
  ``PermissionDeniedError``, 404 → ``NotExistError``, 429 → ``RateLimitError`` (``Retry-After`` read),
  5xx → ``ServerError``.

``GET /`` answers 200 (readiness probe).

Run it: ``python tests/hub_servers/modelscope_hub.py --port 8765 [--root DIR]``, then
``MODELSCOPE_ENDPOINT=http://127.0.0.1:8765`` (read when each ``HubApi``/config is built, not at import).
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

try:
    from .artifacts import KOLORS_BOTH_ID, KOLORS_ID, PREDICTOR_CUSTOM_ID  # noqa: F401 - tests import the ids per hub
    from .common import HEAD_COMMITTED_AT, Fault, HubHandler, HubServer, Repo, RepoFile, add_default_repos, serve_main
except ImportError:  # run as a script
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.hub_servers.common import (
        HEAD_COMMITTED_AT,
        Fault,
        HubHandler,
        HubServer,
        Repo,
        RepoFile,
        add_default_repos,
        serve_main,
    )

PREDICTOR_ID = "AI-ModelScope/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE"
ANIME_ID = "AI-ModelScope/lowres_anime"
VAE_FP16_FIX_ID = "AI-ModelScope/sdxl-vae-fp16-fix"
"""What the reference's ``download_models(["SDXL-vae-fp16-fix"])`` fetches (DiffSynth's model_config.py)."""
DATASET_TYPE_GENERAL = 4
COMMITTED_AT = 1720500000  # the repos' creation (a fixed epoch second, July 2024), so listings are reproducible


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

    def send_fault(self, fault: Fault) -> None:
        messages = {401: "用户未登录", 403: "没有权限访问该资源", 404: "模型不存在", 429: "请求过于频繁，请稍后再试"}
        body = {"Code": fault.status, "Message": messages.get(fault.status, "服务器内部错误"),
                "RequestId": str(uuid.uuid4()), "Success": False}  # fmt: skip
        headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else None
        self.send_json(fault.status, body, headers)

    def route(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if region := self.headers.get("x-aliyun-region-id"):
            self.owner.note_region(region)
        if url.path == "/":
            return self.send_bytes(200, b"modelscope hub emulator ready\n")
        if url.path == "/api/v1/repos/internalAccelerationInfo":
            return self.ok({"InternalRegionQueryAddress": f"{self.owner.cdn.url}/latest/meta-data/region-id"})
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
        if tail == ["repo"]:
            return self.file(repo, query.get("Revision", "master"), query.get("FilePath", ""))
        if self.failed("listing" if tail else "info"):
            return None
        if not tail:
            return self.ok(self.owner.info(repo))
        if tail == ["revisions"]:
            branch = {"Revision": "master", "CreatedAt": COMMITTED_AT}
            return self.ok({"RevisionMap": {"Branches": [branch], "Tags": []}})
        revision = query.get("Revision", "master")
        if tail in (["repo", "files"], ["repo", "tree"]):
            if not self.owner.known_revision(repo, revision):
                return self.not_found(f"revision {revision}")
            recursive = query.get("Recursive", "False").lower() == "true"
            entries = self.owner.listing(repo, query.get("Root"), recursive)
            data: dict = {"Files": entries, "LatestCommitter": self.owner.committer(repo)}
            if tail[1] == "tree":
                size = int(query.get("PageSize", 100) or 100)
                page = int(query.get("PageNumber", 1) or 1)
                data["TotalCount"] = len(entries)
                data["Files"] = entries[(page - 1) * size : page * size]
            return self.ok(data)
        if self.command == "POST":
            return self.ok(None)
        self.not_found("/".join(tail))

    def file(self, repo: Repo | None, revision: str, path: str) -> None:
        path = (path[2:] if path.startswith("./") else path).lstrip("/")
        if self.failed("file", path):
            return None
        if repo is None or not self.owner.known_revision(repo, revision):
            return self.not_found(f"revision {revision}")
        f = repo.files.get(path)
        if f is None:
            return self.not_found(f"file {path}")
        if f.lfs:  # the storage host serves LFS objects: a fresh presigned URL per request
            self.send_response(302)
            self.send_header("Location", self.owner.cdn.sign(repo, f))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        self.send_file(repo, f, {"ETag": f'"{f.sha256}"'})


class ModelScopeHub(HubServer):
    """ModelScope API emulator; repos are added with :meth:`add_model` / :meth:`add_dataset`."""

    handler = ModelScopeHandler
    name = "modelscope-hub"
    blank_commit_id = False
    """Answer ``LatestCommitter.Id`` as ``""`` (seen in a saved real response): no repo commit to pin to."""
    refuse_commit_revisions = False
    """Refuse a commit id as ``Revision`` (404), as a hub that pins only branches and tags would."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.region_headers: list[str] = []
        """Every ``x-aliyun-region-id`` the client sent (it sends one once the probe found a region)."""
        self._region_lock = threading.Lock()

    def note_region(self, region: str) -> None:
        with self._region_lock:
            self.region_headers.append(region)

    @property
    def env(self) -> dict[str, str]:
        return {"MODELSCOPE_ENDPOINT": self.url}

    def add_model(self, repo_id: str, root: Path) -> Repo:
        return self.add(Repo.from_dir(repo_id, root, "model", numeric_id=len(self.repos) + 1))

    def add_dataset(self, repo_id: str, root: Path) -> Repo:
        return self.add(Repo.from_dir(repo_id, root, "dataset", numeric_id=len(self.repos) + 1))

    def by_numeric_id(self, numeric_id: int) -> Repo | None:
        return next((r for r in self.repos.values() if r.numeric_id == numeric_id), None)

    def known_revision(self, repo: Repo, revision: str) -> bool:
        return revision == "master" or (revision == repo.commit and not self.refuse_commit_revisions)

    def committer(self, repo: Repo) -> dict:
        return {
            "Id": "" if self.blank_commit_id else repo.commit,
            "ShortId": repo.commit[:8],
            "Title": "merge main",
            "Message": "merge main",
            "CommitterName": "kolors-job-tests",
            "CommittedDate": HEAD_COMMITTED_AT,
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
        out = [
            {
                "Revision": repo.commit,
                "CommitMessage": "merge main",
                "CommittedDate": HEAD_COMMITTED_AT,
                "CommitterName": "kolors-job-tests",
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
        out += [self.entry(repo, f) for f in files]
        return out

    @staticmethod
    def entry(repo: Repo, f: RepoFile) -> dict:
        commit, message, when = repo.file_commit(f.path)
        return {
            "CommitMessage": message,
            "CommittedDate": when,
            "CommitterName": "kolors-job-tests",
            "Revision": commit,
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
