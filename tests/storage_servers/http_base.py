"""The request plumbing both loopback proxies share: every verb to one handler, bodies read whole."""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler

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
