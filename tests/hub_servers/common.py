"""What both hub emulators share: repos as file tables, byte-range file serving, download records.

A repo is a directory on disk plus a stable fake commit id (sha1 of its listing), so the same
artifacts always resolve to the same "revision" and a test can check the product recorded it.
Every byte of file content sent is recorded per repo and path: a test compares that with the
files the loader actually opens.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import TypeVar

try:
    from tests.storage_servers.http_base import LoopbackServer, ProxyHandler
except ModuleNotFoundError:  # run as a script: tests/ is then not importable as a package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.storage_servers.http_base import LoopbackServer, ProxyHandler

LFS_SUFFIXES = (".safetensors", ".bin", ".parquet", ".png", ".model", ".pt", ".pth", ".ckpt")
"""Suffixes the hubs store through LFS (their default .gitattributes rules)."""

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class RepoFile:
    path: str
    local: Path
    size: int
    sha256: str
    git_oid: str  # git blob sha1, what the hub calls the file's oid / ETag for non-LFS files

    @property
    def lfs(self) -> bool:
        return self.path.endswith(LFS_SUFFIXES)


@dataclass
class Repo:
    """One served repository: ``repo_id``, its files keyed by repo path, a fixed commit id."""

    repo_id: str
    root: Path
    repo_type: str = "model"  # "model" | "dataset"
    files: dict[str, RepoFile] = field(default_factory=dict)
    commit: str = ""
    numeric_id: int = 0

    @classmethod
    def from_dir(cls, repo_id: str, root: Path, repo_type: str = "model", numeric_id: int = 0) -> Repo:
        root = Path(root)
        files: dict[str, RepoFile] = {}
        for local in sorted(p for p in root.rglob("*") if p.is_file()):
            data = local.read_bytes()
            rel = local.relative_to(root).as_posix()
            git_oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            files[rel] = RepoFile(rel, local, len(data), hashlib.sha256(data).hexdigest(), git_oid)
        listing = json.dumps([[f.path, f.sha256] for f in files.values()]).encode()
        commit = hashlib.sha1(repo_id.encode() + b"\0" + listing).hexdigest()
        return cls(repo_id, root, repo_type, files, commit, numeric_id)

    def dirs(self) -> list[str]:
        """Every folder that holds a file, parents included (listings show them as ``tree`` entries)."""
        out: set[str] = set()
        for path in self.files:
            parts = path.split("/")[:-1]
            out.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        return sorted(out)

    def under(self, root: str | None, recursive: bool) -> tuple[list[str], list[RepoFile]]:
        """(folders, files) below ``root`` (repo-relative, '' or '/' = top), all levels or one."""
        prefix = (root or "").strip("/")
        prefix = f"{prefix}/" if prefix else ""

        def keep(path: str) -> bool:
            return path.startswith(prefix) and (recursive or "/" not in path[len(prefix) :])

        return [d for d in self.dirs() if keep(d)], [f for p, f in self.files.items() if keep(p)]


class DownloadLog:
    """Thread-safe bytes-sent counters, per repo and path."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._bytes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._sending = 0  # file bodies being written: a client may hold every byte before the last add()
        self.requests: list[tuple[str, str]] = []  # (method, raw path) of every request, for debugging

    @contextmanager
    def sending(self) -> Iterator[None]:
        with self._lock:
            self._sending += 1
        try:
            yield
        finally:
            with self._lock:
                self._sending -= 1
                self._lock.notify_all()

    def add(self, repo_id: str, path: str, n: int) -> None:
        with self._lock:
            self._bytes[repo_id][path] += n

    def note(self, method: str, raw_path: str) -> None:
        with self._lock:
            self.requests.append((method, raw_path))

    def get(self, repo_id: str) -> dict[str, int]:
        """The counts once no file body is still being written (a response the client already read
        may not be recorded yet: its handler thread runs on after the last byte)."""
        with self._lock:
            self._lock.wait_for(lambda: self._sending == 0, timeout=10)
            return dict(self._bytes.get(repo_id, {}))

    def reset(self) -> None:
        with self._lock:
            self._bytes.clear()
            self.requests.clear()


_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class HubHandler(ProxyHandler):
    """JSON replies and Range-aware file bodies; subclasses route in :meth:`route`."""

    owner: HubServer

    def handle_any(self) -> None:
        self.owner.log.note(self.command, self.path)
        try:
            self.route()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def route(self) -> None:
        raise NotImplementedError

    def send_json(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_bytes(self, status: int, data: bytes, content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_file(self, repo: Repo, f: RepoFile, headers: dict[str, str] | None = None) -> None:
        """The file (or the requested ``Range``), recording the body bytes actually written."""
        with self.owner.log.sending():
            self._send_file(repo, f, headers)

    def _send_file(self, repo: Repo, f: RepoFile, headers: dict[str, str] | None) -> None:
        start, end = 0, f.size - 1
        status = 200
        rng = _RANGE.match(self.headers.get("Range", "").strip())
        if rng and f.size:
            first, last = rng.groups()
            if first:
                start, end = int(first), min(int(last), f.size - 1) if last else f.size - 1
            elif last:
                start = max(f.size - int(last), 0)
            if start >= f.size or start > end:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{f.size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        length = end - start + 1 if f.size else 0
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{f.size}")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD" or not length:
            return
        stall_at = self.owner.stalls.get(f.path)
        with f.local.open("rb") as fh:
            fh.seek(start)
            left = length
            while left:
                offset = end - left + 1
                if stall_at is not None and offset >= stall_at:
                    self.wfile.flush()
                    self.owner.unstalled.wait(timeout=600)  # a hub that stops sending, connection open
                    return
                chunk = fh.read(min(CHUNK, left if stall_at is None else min(left, stall_at - offset)))
                if not chunk:
                    break
                self.wfile.write(chunk)
                self.owner.log.add(repo.repo_id, f.path, len(chunk))
                left -= len(chunk)


class HubServer(LoopbackServer):
    """A hub emulator on 127.0.0.1: a repo registry, a download log, ``url`` once started."""

    handler: type[HubHandler]
    name = "hub"

    def __init__(self, repos: list[Repo] | None = None, *, port: int = 0) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        for repo in repos or []:
            self.add(repo)
        self.log = DownloadLog()
        self.artifacts: dict[str, Path] = {}  # artifact name -> directory, set by the default builders
        self.stalls: dict[str, int] = {}
        """Repo path -> byte offset: every body of that file stops there, its connection left open (a hub
        that hangs mid-download), until :meth:`stalled` ends."""
        self.unstalled = threading.Event()
        handler_cls = type("Handler", (self.handler,), {"owner": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", port), handler_cls)
        self.server.daemon_threads = True
        self.url = self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True, name=self.name)

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point a client process at this emulator."""
        raise NotImplementedError

    def add(self, repo: Repo) -> Repo:
        self.repos[(repo.repo_type, repo.repo_id)] = repo
        return repo

    def repo(self, repo_type: str, repo_id: str) -> Repo | None:
        return self.repos.get((repo_type, repo_id))

    def downloads(self, repo_id: str) -> dict[str, int]:
        """Bytes of file content sent for ``repo_id``, by repo path (Range requests add up)."""
        return self.log.get(repo_id)

    def reset_downloads(self) -> None:
        self.log.reset()

    @contextmanager
    def stalled(self, path: str, at: int) -> Iterator[None]:
        """Every download of ``path`` (any repo) hangs at byte ``at`` while the block runs."""
        self.unstalled.clear()
        self.stalls[path] = at
        try:
            yield
        finally:
            del self.stalls[path]
            self.unstalled.set()


H = TypeVar("H", bound=HubServer)


def add_default_repos(
    hub: H, root: Path, *, predictor_id: str, anime_id: str, vae_fp16_fix_id: str | None = None
) -> H:
    """Serve the default artifacts (built under ``root`` if missing) under the real ids on ``hub``;
    the predictor, the dataset and the fp16-fix VAE are named differently on each hub."""
    from .artifacts import KOLORS_BOTH_ID, KOLORS_ID, PREDICTOR_CUSTOM_ID, build_default_artifacts

    art = build_default_artifacts(root)
    hub.add_model(KOLORS_ID, art["kolors"])
    hub.add_model(predictor_id, art["predictor"])
    hub.add_dataset(anime_id, art["anime"])
    if vae_fp16_fix_id:
        hub.add_model(vae_fp16_fix_id, art["vae_fp16_fix"])
    hub.add_model(KOLORS_BOTH_ID, art["kolors_both"])
    hub.add_model(PREDICTOR_CUSTOM_ID, art["predictor_custom"])
    hub.artifacts = art
    return hub


def serve_main(make: Callable[..., HubServer], description: str, argv: list[str] | None = None) -> None:
    """``--port N [--root DIR]``: build the default artifacts under DIR, serve until killed."""
    import tempfile

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--root", type=Path, default=None, help="artifact dir (default: a temp dir)")
    args = parser.parse_args(argv)
    root = args.root or Path(tempfile.mkdtemp(prefix="hub-artifacts-"))
    server = make(root, port=args.port)
    server.start()
    print(f"serving {server.url} (artifacts in {root})", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
