"""A loopback emulator of the Hugging Face Hub API, as ``huggingface_hub`` 0.36.2 and ``datasets`` use it.

Routes (read from ``huggingface_hub/hf_api.py``, ``file_download.py``, ``_snapshot_download.py``,
``hf_file_system.py``; ``{t}`` is ``models`` or ``datasets``, model repos have no prefix in file URLs):

- ``GET /api/{t}/{owner}/{name}[/revision/{rev}]``: repo info with ``sha`` (the commit id) and
  ``siblings``; with ``?blobs=true`` (``files_metadata=True``) each sibling has ``size``, ``blobId``
  and, for LFS files, ``lfs: {sha256, size, pointerSize}``.
- ``GET /api/{t}/{owner}/{name}/tree/{rev}[/{path}]?recursive=``: ``list_repo_tree`` entries
  (``type`` file/directory, ``path``, ``size``, ``oid``, ``lfs``); one page, no ``Link`` header.
- ``POST /api/{t}/{owner}/{name}/paths-info/{rev}``: ``get_paths_info`` (form field ``paths``).
- ``HEAD|GET /[datasets/]{owner}/{name}/resolve/{rev}/{path}``: like the real hub, a small (non-LFS)
  file answers 200 with ``ETag`` (git blob sha1) and ``X-Repo-Commit``; an LFS file answers 302 to a
  presigned URL on a **second loopback host** (:class:`~tests.hub_servers.common.CdnServer`, standing in
  for ``cdn-lfs.hf.co`` / ``cas-bridge.xethub.hf.co``) with ``X-Linked-Etag`` (its sha256),
  ``X-Linked-Size`` and ``X-Repo-Commit``, which is what ``hf_hub_download`` reads from the HEAD.
- **Xet, as the real repos are now stored**: an LFS file's resolve answer also carries ``X-Xet-Hash``,
  ``X-Xet-Refresh-Route`` and a ``Link: <…/xet-read-token/{commit}>; rel="xet-auth"`` header — the names
  ``huggingface_hub.constants`` declares and ``huggingface_hub.utils._xet.parse_xet_file_data_from_response``
  reads. A client with ``hf_xet`` installed and Xet not disabled then asks the refresh route for a CAS token
  and speaks the Xet protocol, which this emulator does not: the token route answers 404, so such a download
  fails at once. With ``HF_HUB_DISABLE_XET=1`` (what the job sets) the client follows the resolve URL's
  redirect and downloads over plain HTTP, as the real hub also serves Xet-stored files.
- Errors as the hub sends them: 404 with ``X-Error-Code`` ``RepoNotFound`` / ``RevisionNotFound`` /
  ``EntryNotFound`` and ``{"error": ...}``, which ``huggingface_hub`` raises as ``RepositoryNotFoundError``,
  ``RevisionNotFoundError``, ``EntryNotFoundError``. Injected failures (``HubServer.failing``) use the same
  shape: 401/403 with ``X-Error-Code: GatedRepo`` (``GatedRepoError``) or ``RepoNotFound`` (a private repo
  seen without a token: ``RepositoryNotFoundError``), 429 with ``Retry-After``, 5xx (``HfHubHTTPError``),
  as ``huggingface_hub.utils._http.hf_raise_for_status`` tells them apart.

Revisions accepted: ``main`` and the repo's commit id. ``GET /`` answers 200 (readiness probe).

Pointing the clients at it: ``huggingface_hub`` reads ``HF_ENDPOINT`` once, at import
(``huggingface_hub.constants.ENDPOINT``), and ``datasets`` copies it into ``datasets.config.HF_ENDPOINT``
at its import. So either set ``HF_ENDPOINT`` in the environment of a fresh process (what the product
and the ``datasets`` tests do), or pass ``endpoint=`` explicitly where the API takes it
(``snapshot_download``, ``hf_hub_download``, ``HfApi(endpoint=...)``). Also set
``HF_HUB_DISABLE_TELEMETRY=1`` and ``HF_HUB_OFFLINE`` unset.

Run it: ``python tests/hub_servers/hf_hub.py --port 8766 [--root DIR]``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

try:
    from .artifacts import KOLORS_BOTH_ID, KOLORS_ID, PREDICTOR_CUSTOM_ID  # noqa: F401 - tests import the ids per hub
    from .common import Fault, HubHandler, HubServer, Repo, RepoFile, add_default_repos, serve_main
except ImportError:  # run as a script
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.hub_servers.common import Fault, HubHandler, HubServer, Repo, RepoFile, add_default_repos, serve_main

PREDICTOR_ID = "shunk031/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE"
ANIME_ID = "lowres/anime"
VAE_FP16_FIX_ID = "madebyollin/sdxl-vae-fp16-fix"
"""The Hugging Face dataset ``AI-ModelScope/lowres_anime`` mirrors (see ``artifacts.write_lowres_anime``)."""
LAST_MODIFIED = "2024-07-12T08:00:00.000Z"
POINTER_SIZE = 134  # bytes of a git-lfs pointer file for a 64-hex oid and a size of this order


class HFHandler(HubHandler):
    owner: HFHub

    def error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        self.send_json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message, **(headers or {})})

    def send_fault(self, fault: Fault) -> None:
        messages = {
            401: "Access to this repo is restricted. You must be authenticated to access it.",
            403: "Access to this repo is restricted and you are not in the authorized list.",
            404: "Repository not found",
            429: "You have exceeded our rate limit of requests. Please retry later.",
        }
        message = messages.get(fault.status, "Internal Error - We're working hard to fix this as soon as possible!")
        missing = "EntryNotFound" if fault.where in ("file", "cdn") else "RepoNotFound"
        code = fault.error_code or {401: "GatedRepo", 403: "GatedRepo", 404: missing}.get(fault.status, "")
        headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
        if code:
            return self.error(fault.status, code, message, headers)
        self.send_json(fault.status, {"error": message}, headers)

    def route(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if url.path == "/":
            return self.send_bytes(200, b"hugging face hub emulator ready\n")
        if parts[0] == "api" and len(parts) >= 4 and parts[1] in ("models", "datasets"):
            return self.api(parts[1][:-1], parts[2:], query)
        repo_type = "model"
        if parts[0] == "datasets":
            repo_type, parts = "dataset", parts[1:]
        if len(parts) >= 5 and parts[2] == "resolve":
            return self.resolve(repo_type, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        self.error(404, "EntryNotFound", f"no route {url.path}")

    def find(self, repo_type: str, repo_id: str, revision: str) -> Repo | None:
        """The repo at ``revision``, or None after sending the hub's 404."""
        repo = self.owner.repo(repo_type, repo_id)
        if repo is None:
            self.error(404, "RepoNotFound", "Repository not found")
            return None
        if revision not in ("main", repo.commit):
            self.error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo

    def api(self, repo_type: str, rest: list[str], query: dict[str, str]) -> None:
        repo_id, tail = f"{rest[0]}/{rest[1]}", rest[2:]
        if tail and tail[0] == "xet-read-token":  # Xet's CAS token: not emulated (see the module docstring)
            return self.error(404, "EntryNotFound", "Xet storage is not emulated: set HF_HUB_DISABLE_XET=1")
        if self.failed("info" if not tail or tail[0] == "revision" else "listing"):
            return None
        if not tail or tail[0] == "revision":
            revision = "/".join(tail[1:]) if tail else "main"
            if repo := self.find(repo_type, repo_id, revision):
                self.send_json(200, self.owner.info(repo, blobs=query.get("blobs", "").lower() == "true"))
            return None
        if tail[0] == "tree" and len(tail) >= 2:
            if repo := self.find(repo_type, repo_id, tail[1]):
                folders, files = repo.under("/".join(tail[2:]), query.get("recursive", "").lower() == "true")
                self.send_json(
                    200, [self.owner.folder_entry(d) for d in folders] + [self.owner.entry(f) for f in files]
                )
            return None
        if tail[0] == "paths-info" and len(tail) >= 2 and self.command == "POST":
            body = self.read_body().decode()
            ctype = self.headers.get("Content-Type", "")
            paths = json.loads(body)["paths"] if "json" in ctype else parse_qs(body).get("paths", [])
            if repo := self.find(repo_type, repo_id, tail[1]):
                dirs = set(repo.dirs())
                out = [self.owner.entry(repo.files[p.strip("/")]) for p in paths if p.strip("/") in repo.files]
                out += [self.owner.folder_entry(p.strip("/")) for p in paths if p.strip("/") in dirs]
                self.send_json(200, out)
            return None
        self.error(404, "EntryNotFound", f"no route /api/{repo_type}s/{repo_id}/{'/'.join(tail)}")

    def resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        if self.failed("file", path):
            return
        repo = self.find(repo_type, repo_id, revision)
        if repo is None:
            return
        f = repo.files.get(path)
        if f is None:
            return self.error(404, "EntryNotFound", f"{path} does not exist on {revision}")
        headers = {"X-Repo-Commit": repo.commit}
        if f.lfs:
            name = quote(f.path.rsplit("/", 1)[-1])
            location = self.owner.cdn.sign(repo, f, {"response-content-disposition": f"inline; filename*=UTF-8''{name}"})
            token_route = f"/api/{repo_type}s/{repo_id}/xet-read-token/{repo.commit}"
            xet_hash = hashlib.sha256(b"xet\0" + bytes.fromhex(f.sha256)).hexdigest()  # Xet's merkle hash stand-in
            self.send_response(302)
            for k, v in {
                **headers,
                "ETag": f'"{f.git_oid}"',
                "X-Linked-Etag": f'"{f.sha256}"',
                "X-Linked-Size": str(f.size),
                "X-Xet-Hash": xet_hash,
                "X-Xet-Refresh-Route": token_route,
                "Link": f'<{self.owner.url}{token_route}>; rel="xet-auth", '
                f'<{self.owner.cdn.url}/reconstruction/{xet_hash}>; rel="xet-reconstruction-info"',
                "Location": location,
                "Content-Length": "0",
            }.items():
                self.send_header(k, v)
            self.end_headers()
            return
        self.send_file(repo, f, {**headers, "ETag": f'"{f.git_oid}"'})


class HFHub(HubServer):
    """Hugging Face Hub API emulator; repos are added with :meth:`add_model` / :meth:`add_dataset`."""

    handler = HFHandler
    name = "hf-hub"

    @property
    def env(self) -> dict[str, str]:
        return {"HF_ENDPOINT": self.url, "HF_HUB_DISABLE_TELEMETRY": "1"}

    def add_model(self, repo_id: str, root: Path) -> Repo:
        return self.add(Repo.from_dir(repo_id, root, "model"))

    def add_dataset(self, repo_id: str, root: Path) -> Repo:
        return self.add(Repo.from_dir(repo_id, root, "dataset"))

    @staticmethod
    def entry(f: RepoFile) -> dict:
        out: dict = {"type": "file", "oid": f.git_oid, "size": f.size, "path": f.path}
        if f.lfs:
            out["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": POINTER_SIZE}
        return out

    @staticmethod
    def folder_entry(path: str) -> dict:
        return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path}

    def info(self, repo: Repo, *, blobs: bool) -> dict:
        siblings = []
        for f in repo.files.values():
            sib: dict = {"rfilename": f.path}
            if blobs:
                sib.update(size=f.size, blobId=f.git_oid)
                if f.lfs:
                    sib["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": POINTER_SIZE}
            siblings.append(sib)
        owner = repo.repo_id.split("/")[0]
        info = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": owner,
            "sha": repo.commit,
            "lastModified": LAST_MODIFIED,
            "createdAt": LAST_MODIFIED,
            "private": False,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(f.size for f in repo.files.values()),
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        return info


def default_hub(root: Path, *, port: int = 0) -> HFHub:
    """The emulator serving the default artifacts (built under ``root`` if missing) under the real ids."""
    return add_default_repos(HFHub(port=port), root, predictor_id=PREDICTOR_ID, anime_id=ANIME_ID,
                             vae_fp16_fix_id=VAE_FP16_FIX_ID)


if __name__ == "__main__":
    serve_main(default_hub, "Loopback Hugging Face Hub emulator serving tiny models in the real layouts.")
