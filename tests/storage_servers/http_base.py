"""The request plumbing both loopback proxies share: every verb to one handler, bodies read whole."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

MAX_BODY = 256 * 1024 * 1024  # refuse absurd requests rather than buffering them


class ProxyHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive, quiet, GET/PUT/POST/DELETE/HEAD all go to :meth:`handle_any`."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # quiet
        pass

    def handle_any(self) -> None:
        raise NotImplementedError

    def do_GET(self) -> None:
        self.handle_any()

    def do_PUT(self) -> None:
        self.handle_any()

    def do_POST(self) -> None:
        self.handle_any()

    def do_DELETE(self) -> None:
        self.handle_any()

    def do_HEAD(self) -> None:
        self.handle_any()

    def read_body(self) -> bytes:
        """The whole request body, ``Content-Length`` or chunked (boto3 streams aws-chunked uploads)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                if len(out) + size > MAX_BODY:
                    raise ValueError("request body too large")
                out += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return bytes(out)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("request body too large")
        return self.rfile.read(length)


class LoopbackServer:
    """A threading HTTP server on 127.0.0.1 (a free port) whose handler sees this object as ``owner``."""

    def _listen(self, handler: type[ProxyHandler], name: str) -> None:
        handler_cls = type("Handler", (handler,), {"owner": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True, name=name)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
