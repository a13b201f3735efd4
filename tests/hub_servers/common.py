"""What both hub emulators share: repos as file tables, byte-range file serving, download records,
a second loopback "CDN" host with signed expiring URLs, and injected failures.

A repo is a directory on disk plus a stable fake commit id (sha1 of its listing), so the same
artifacts always resolve to the same "revision" and a test can check the product recorded it. Like a
real git-backed hub, each file also has the commit that last touched it (:meth:`Repo.file_commit`):
the repo's head commit only for the files its last commit changed. Every byte of file content sent is
recorded per repo and path: a test compares that with the files the loader actually opens.

Large (LFS) files are not served by the hub host itself: both real hubs answer a 302 to a storage host
with a presigned, expiring URL (ModelScope: an OSS object URL — ``modelscope_hub._download`` parses those
hosts, ``<bucket>.oss-<region>[-internal].aliyuncs.com``, and treats their query as "presigned ... per file
and request"; Hugging Face: ``cdn-lfs.hf.co`` / ``cas-bridge.xethub.hf.co``, signed with ``Expires`` +
``Signature``). :class:`CdnServer` is that second host, on its own 127.0.0.1 port: it serves only URLs the
hub signed (HMAC over path and expiry, OSS V1's ``Expires``/``OSSAccessKeyId``/``Signature`` query as
``oss2.Bucket.sign_url`` writes it), answers an expired or forged one 403 as OSS does, and shares the hub's
download log, stalls and faults.

Failures (:meth:`HubServer.failing`): a status (401, 403, 404, 429, 5xx) on the hub's info, listing or file
routes or on the CDN, every time or the next N times, in each hub's own error shape.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import hmac
import json
import re
import socket
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

try:
    from tests.storage_servers.http_base import LoopbackServer, ProxyHandler
except ModuleNotFoundError:  # run as a script: tests/ is then not importable as a package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.storage_servers.http_base import LoopbackServer, ProxyHandler

LFS_SUFFIXES = (".safetensors", ".bin", ".parquet", ".png", ".model", ".pt", ".pth", ".ckpt")
"""Suffixes the hubs store through LFS (their default .gitattributes rules)."""

CHUNK = 1024 * 1024

HEAD_COMMITTED_AT = 1726842501
"""The head commit's time (the recorded ModelScope listing's "merge main" commit); older commits a day earlier."""


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

    HEAD_FILES = (".gitattributes", "README.md")
    """The files the head commit touched (a card edit, like the real listings' "merge main" commit on
    ``.gitattributes``); every other file was last changed by an older commit of its top-level folder."""

    def file_commit(self, path: str) -> tuple[str, str, int]:
        """(commit id, message, epoch second) of the last commit that changed ``path``."""
        if path in self.HEAD_FILES or path not in self.files:
            return self.commit, "merge main", HEAD_COMMITTED_AT
        group = path.split("/", 1)[0] if "/" in path else "weights"
        members = json.dumps([[p, f.sha256] for p, f in self.files.items() if p.startswith(f"{group}/") or (
            group == "weights" and "/" not in p)]).encode()
        sha = hashlib.sha1(self.repo_id.encode() + b"\0" + group.encode() + b"\0" + members).hexdigest()
        return sha, f"upload {group}", HEAD_COMMITTED_AT - 86_400

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

    def failed(self, where: str, path: str = "") -> bool:
        """Answer with an injected failure for this route (and repo path) if one is active."""
        fault = self.owner.take_fault(where, path)
        if fault is None:
            return False
        self.send_fault(fault)
        return True

    def send_fault(self, fault: Fault) -> None:
        """The hub's error shape for ``fault`` (subclasses: each hub's envelope)."""
        self.send_bytes(fault.status, f"{fault.status} injected\n".encode())

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

    def send_bytes(
        self, status: int, data: bytes, content_type: str = "text/plain", headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
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
                    self.close_connection = True  # released: drop the body here, the client resumes
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                chunk = fh.read(min(CHUNK, left if stall_at is None else min(left, stall_at - offset)))
                if not chunk:
                    break
                self.wfile.write(chunk)
                self.owner.log.add(repo.repo_id, f.path, len(chunk))
                left -= len(chunk)


class QuietServer(ThreadingHTTPServer):
    """A client that gives up (a read timeout, a killed job) resets its connection: not worth a traceback."""

    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


@dataclass
class Fault:
    """An injected failure: ``status`` on requests to ``where`` (``info``, ``listing``, ``file``, ``cdn``
    or ``any``), for repo path ``path`` (None: any), the next ``times`` requests (None: all of them)."""

    status: int
    where: str = "any"
    path: str | None = None
    times: int | None = None
    retry_after: int | None = None
    error_code: str | None = None
    """Hugging Face's ``X-Error-Code`` (``GatedRepo``, ``RepoNotFound``...); ModelScope ignores it."""
    hits: int = 0

    def matches(self, where: str, path: str) -> bool:
        return (self.where in ("any", where)) and (self.path is None or self.path == path) and (
            self.times is None or self.hits < self.times
        )


class CdnHandler(HubHandler):
    """``GET|HEAD /{bucket}/{models|datasets}/{owner}/{name}/{sha256}?<signed query>`` on the CDN host."""

    owner: CdnServer

    def route(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if url.path == "/latest/meta-data/region-id":  # the ECS metadata service the region probe asks
            region = self.owner.hub.region
            return self.send_bytes(200, region.encode()) if region else self.send_bytes(404, b"not on ECS\n")
        if len(parts) != 5 or parts[1] not in ("models", "datasets"):
            return self.oss_error(404, "NoSuchKey", "The specified key does not exist.")
        hub = self.owner.hub
        repo = hub.repo(parts[1][:-1], f"{parts[2]}/{parts[3]}")
        f = next((f for f in repo.files.values() if f.sha256 == parts[4]), None) if repo else None
        if repo is None or f is None:
            return self.oss_error(404, "NoSuchKey", "The specified key does not exist.")
        problem = self.owner.check(url.path, query)
        if problem is not None:
            return self.oss_error(403, *problem)
        if self.failed("cdn", f.path):
            return None
        self.send_file(repo, f, {"ETag": f'"{f.sha256.upper()[:32]}"', "x-oss-request-id": uuid.uuid4().hex[:24]})

    def oss_error(self, status: int, code: str, message: str) -> None:
        """OSS's XML error body (what oss2 and a browser get for a bad presigned URL)."""
        request_id = uuid.uuid4().hex[:24].upper()
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<RequestId>{request_id}</RequestId><HostId>127.0.0.1</HostId></Error>"
        ).encode()
        self.send_bytes(status, body, "application/xml", {"x-oss-request-id": request_id})

    def send_fault(self, fault: Fault) -> None:
        code = {403: "AccessDenied", 404: "NoSuchKey", 429: "SlowDown"}.get(fault.status, "InternalError")
        self.oss_error(fault.status, code, f"injected {fault.status}")


class CdnServer:
    """The storage host LFS downloads are redirected to: 127.0.0.1 on its own port, signed expiring URLs."""

    def __init__(self, hub: HubServer, *, ttl_s: float = 3600) -> None:
        self.hub = hub
        self.ttl_s = ttl_s
        """How long a signed URL stays valid (tests shorten it to see expiry)."""
        self.secret = uuid.uuid4().bytes
        self.access_key_id = "LTAI5tKolorsJobHubCdn"
        handler_cls = type("CdnHandler", (CdnHandler,), {"owner": self})
        self.server = QuietServer(("127.0.0.1", 0), handler_cls)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True, name=f"{hub.name}-cdn")
        self.signed = 0
        """URLs signed so far (each redirect signs a fresh one)."""

    # the hub's log, stalls and faults apply to bytes served from here too
    @property
    def log(self) -> DownloadLog:
        return self.hub.log

    @property
    def stalls(self) -> dict[str, int]:
        return self.hub.stalls

    @property
    def unstalled(self) -> threading.Event:
        return self.hub.unstalled

    def take_fault(self, where: str, path: str) -> Fault | None:
        return self.hub.take_fault(where, path)

    def _signature(self, path: str, expires: int) -> str:
        to_sign = f"GET\n\n\n{expires}\n{path}".encode()  # OSS V1: verb, MD5, type, expiry, resource
        return base64.b64encode(hmac.new(self.secret, to_sign, hashlib.sha1).digest()).decode()

    def sign(self, repo: Repo, f: RepoFile, extra: dict[str, str] | None = None) -> str:
        """A presigned URL for ``f`` valid for :attr:`ttl_s` from now."""
        path = f"/hub-lfs/{repo.repo_type}s/{quote(repo.repo_id)}/{f.sha256}"
        expires = int(time.time() + self.ttl_s)
        query = {"Expires": str(expires), "OSSAccessKeyId": self.access_key_id,
                 "Signature": self._signature(path, expires), **(extra or {})}  # fmt: skip
        self.signed += 1
        return f"{self.url}{path}?{urlencode(query)}"

    def check(self, path: str, query: dict[str, str]) -> tuple[str, str] | None:
        """None when ``query`` signs ``path`` and has not expired, else OSS's (code, message)."""
        try:
            expires = int(query["Expires"])
            given = query["Signature"]
        except (KeyError, ValueError):
            return "AccessDenied", "Anonymous access is forbidden for this operation."
        if not hmac.compare_digest(given, self._signature(path, expires)):
            return "SignatureDoesNotMatch", "The request signature we calculated does not match the signature you provided."
        if time.time() > expires:
            return "AccessDenied", "Request has expired."
        return None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


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
        self.faults: list[Fault] = []
        self._fault_lock = threading.Lock()
        self.region: str | None = None
        """What the CDN host's stand-in for the ECS metadata service answers as this machine's region
        (None: 404, as off Alibaba Cloud)."""
        self.cdn = CdnServer(self)
        handler_cls = type("Handler", (self.handler,), {"owner": self})
        self.server = QuietServer(("127.0.0.1", port), handler_cls)
        self.url = self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True, name=self.name)

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point a client process at this emulator."""
        raise NotImplementedError

    def start(self):  # type: ignore[override]
        self.cdn.start()
        return super().start()

    def stop(self) -> None:
        super().stop()
        self.cdn.stop()

    @contextmanager
    def failing(self, status: int, where: str = "any", **kwargs: object) -> Iterator[Fault]:
        """Requests to ``where`` answer ``status`` (see :class:`Fault`) while the block runs."""
        fault = Fault(status, where, **kwargs)  # type: ignore[arg-type]
        with self._fault_lock:
            self.faults.append(fault)
        try:
            yield fault
        finally:
            with self._fault_lock:
                self.faults.remove(fault)

    def take_fault(self, where: str, path: str = "") -> Fault | None:
        """The first active fault for this request, counted as hit; None when none applies."""
        with self._fault_lock:
            for fault in self.faults:
                if fault.matches(where, path):
                    fault.hits += 1
                    return fault
        return None

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
    from .artifacts import (
        ANIME_FOLDER_ID,
        ANIME_NATIVE_ID,
        KOLORS_BOTH_ID,
        KOLORS_ID,
        PREDICTOR_CUSTOM_ID,
        build_default_artifacts,
    )

    art = build_default_artifacts(root)
    hub.add_model(KOLORS_ID, art["kolors"])
    hub.add_model(predictor_id, art["predictor"])
    hub.add_dataset(anime_id, art["anime"])
    if vae_fp16_fix_id:
        hub.add_model(vae_fp16_fix_id, art["vae_fp16_fix"])
    hub.add_model(KOLORS_BOTH_ID, art["kolors_both"])
    hub.add_model(PREDICTOR_CUSTOM_ID, art["predictor_custom"])
    hub.add_dataset(ANIME_NATIVE_ID, art["anime_native"])
    hub.add_dataset(ANIME_FOLDER_ID, art["anime_folder"])
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
