"""A fault-injecting HTTP proxy on 127.0.0.1, for putting in front of moto (S3) or the OSS proxy.

Every request is forwarded to the upstream server unless a scheduled fault matches it first:

- ``reset``: close the connection with a TCP RST before answering (no response at all);
- ``drop``: close the connection cleanly (FIN) without answering;
- ``reset_mid_body``: send the status line, headers and half of the body, then RST;
- ``truncate``: send the headers (Content-Length = the full size) and half of the body, then close;
- ``status``: answer ``status`` with an S3- or OSS-style XML error body (``code``: ``SlowDown``,
  ``ServiceUnavailable``, ``InternalError``, ``AccessDenied`` …) instead of forwarding;
- ``delay``: wait ``seconds``, then forward normally.

Faults are scheduled as rules (:meth:`FaultProxy.add`): which requests they match (method, a
regex on the path+query, and/or a predicate), when (``skip`` the first N matches, then hit
``every`` k-th one — or a random ``share`` of them, drawn from a seeded generator — at most ``times``
times — ``None`` means forever). :meth:`FaultProxy.throttle` is a throttling storm: a share of all
requests answered 503 ``SlowDown`` (S3) / ``ServerBusy`` (OSS), 500 ``InternalError`` or reset. Rules are tried in order;
the first one that fires wins. Every injected fault is counted (``injected``, ``by_kind``) and
logged in ``events``; every request seen is in ``requests``. Module-wide totals live in
:data:`LEDGER`, which the test session prints at its end.

Bounded by design: one upstream connection per request (60 s timeout), request bodies read by
Content-Length or chunked framing only, the server bound to loopback only.
"""

from __future__ import annotations

import base64
import http.client
import random
import re
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

from .http_base import LoopbackServer, ProxyHandler

KINDS = ("reset", "drop", "reset_mid_body", "truncate", "status", "delay")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade", "expect"}


@dataclass
class Ledger:
    """Session-wide fault accounting, filled by proxies (injected) and by tests (survived, lost)."""

    injected: int = 0
    survived: int = 0
    bytes_checked: int = 0
    bytes_lost: int = 0
    by_kind: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_injection(self, kind: str) -> None:
        with self.lock:
            self.injected += 1
            self.by_kind[kind] += 1

    def record_survived(self, n: int) -> None:
        with self.lock:
            self.survived += n

    def record_bytes(self, expected: bytes, actual: bytes | None) -> None:
        """Count bytes that did not come back identical (missing, extra or different)."""
        with self.lock:
            self.bytes_checked += len(expected)
            if actual is None:
                self.bytes_lost += len(expected)
            elif actual != expected:
                n = min(len(expected), len(actual))
                diff = sum(1 for a, b in zip(expected[:n], actual[:n], strict=True) if a != b)
                self.bytes_lost += diff + abs(len(expected) - len(actual))

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.by_kind.items()))
        return (
            f"faults: {self.injected} injected, {self.survived} survived, {self.bytes_lost} bytes lost"
            f" ({self.bytes_checked} bytes checked; {kinds or 'none'})"
        )


LEDGER = Ledger()


@dataclass
class Fault:
    kind: str
    status: int = 503
    code: str = "SlowDown"
    message: str = "Please reduce your request rate."
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {KINDS}")


@dataclass
class Rule:
    """When a fault fires. A request matches if ``method``, ``path`` (regex on path?query) and
    ``when(method, target)`` all agree; of the matching requests the first ``skip`` pass, then every
    ``every``-th one gets the fault, at most ``times`` times in all (``None``: no limit) and at most
    ``per_request`` times per distinct request (method, target, Range) — so with
    ``per_request=n`` a client that retries more than ``n`` times always gets through. ``faults``
    are used in rotation."""

    faults: list[Fault]
    method: str | None = None
    path: re.Pattern | None = None
    when: Callable[[str, str], bool] | None = None
    skip: int = 0
    every: int = 1
    times: int | None = 1
    per_request: int | None = None
    share: float | None = None
    """Instead of ``every``: each matching request is hit with this probability (``rng``)."""
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    seen: int = 0
    fired: int = 0
    fired_for: Counter = field(default_factory=Counter)

    def matches(self, method: str, target: str) -> bool:
        if self.method and method != self.method:
            return False
        if self.path and not self.path.search(target):
            return False
        return not (self.when and not self.when(method, target))

    def take(self, identity: tuple) -> Fault | None:
        """Called for a matching request (under the proxy lock): the fault to inject now, if any."""
        self.seen += 1
        if self.times is not None and self.fired >= self.times:
            return None
        if self.per_request is not None and self.fired_for[identity] >= self.per_request:
            return None
        n = self.seen - self.skip
        if n <= 0 or (n - 1) % self.every:
            return None
        if self.share is not None and self.rng.random() >= self.share:
            return None
        fault = self.faults[self.fired % len(self.faults)]
        self.fired += 1
        self.fired_for[identity] += 1
        return fault


class FaultProxy(LoopbackServer):
    """``FaultProxy(upstream, flavour="s3"|"oss").start()``; ``endpoint`` is its http://127.0.0.1:port."""

    def __init__(self, upstream: str, flavour: str = "s3", ledger: Ledger | None = None) -> None:
        if flavour not in ("s3", "oss"):
            raise ValueError(flavour)
        self.upstream = urlsplit(upstream)
        if self.upstream.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the fault proxy only forwards to loopback servers")
        self.flavour = flavour
        self.ledger = LEDGER if ledger is None else ledger
        self.rules: list[Rule] = []
        self.requests: list[tuple[str, str]] = []
        self.events: list[tuple[str, str, str]] = []  # (fault kind, method, target)
        self.fault_at: list[int] = []  # for each event, the index of its request in ``requests``
        self.responses: list[tuple[str, str, int]] = []  # (method, target, upstream status) forwarded
        self.by_kind: Counter = Counter()
        self.lock = threading.Lock()
        self._listen(_Handler, "fault-proxy")

    # -- schedule ---------------------------------------------------------------------------------
    def add(
        self,
        fault: Fault | str | list[Fault],
        *,
        method: str | None = None,
        path: str | None = None,
        when: Callable[[str, str], bool] | None = None,
        skip: int = 0,
        every: int = 1,
        times: int | None = 1,
        per_request: int | None = None,
        share: float | None = None,
        seed: int = 0,
        **fault_args,
    ) -> Rule:
        """Schedule a fault (or a rotation of faults); see :class:`Rule` for when it fires."""
        if isinstance(fault, str):
            fault = Fault(fault, **fault_args)
        faults = list(fault) if isinstance(fault, list) else [fault]
        rule = Rule(faults, method, re.compile(path) if path else None, when, skip, max(1, every), times, per_request,
                    share, random.Random(seed))  # fmt: skip
        with self.lock:
            self.rules.append(rule)
        return rule

    def throttle(self, share: float, *, seed: int = 0, per_request: int | None = None) -> Rule:
        """A throttling storm: ``share`` of all requests (seeded) get the service's throttling answer — 503
        ``SlowDown`` (S3) or ``ServerBusy`` (OSS) — a 500 or a connection reset, in rotation; with
        ``per_request``, no one request more often than that."""
        busy = "SlowDown" if self.flavour == "s3" else "ServerBusy"
        faults = [
            Fault("status", status=503, code=busy, message="Please reduce your request rate (injected)"),
            Fault("status", status=500, code="InternalError", message="We encountered an internal error (injected)"),
            Fault("reset"),
        ]
        return self.add(faults, times=None, share=share, seed=seed, per_request=per_request)

    def fail_all(self, fault: Fault | str = "status", **kwargs) -> Rule:
        """From now on every request fails (an outage)."""
        return self.add(fault, times=None, **kwargs)

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()

    @property
    def injected(self) -> int:
        return sum(self.by_kind.values())

    def pick(self, method: str, target: str, range_header: str | None = None) -> Fault | None:
        with self.lock:
            self.requests.append((method, target))
            for rule in self.rules:
                if rule.matches(method, target) and (fault := rule.take((method, target, range_header))):
                    self.by_kind[fault.kind] += 1
                    self.events.append((fault.kind, method, target))
                    self.fault_at.append(len(self.requests) - 1)
                    self.ledger.record_injection(fault.kind)
                    return fault
        return None

    # -- upstream ---------------------------------------------------------------------------------
    def forward(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes):
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for k, v in headers:
                conn.putheader(k, v)
            if body or method in ("PUT", "POST"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.reason, resp.getheaders(), data
        finally:
            conn.close()


def error_body(flavour: str, code: str, message: str, request_id: str) -> bytes:
    host = "<HostId>127.0.0.1</HostId>"
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{escape(code)}</Code>'
        f"<Message>{escape(message)}</Message><RequestId>{request_id}</RequestId>{host}"
        + ("<EC>0000-00000000</EC>" if flavour == "oss" else "")
        + "</Error>"
    ).encode()


class _Handler(ProxyHandler):
    owner: FaultProxy

    def _rst(self) -> None:
        """Abort the TCP connection: SO_LINGER(on, 0) makes close() send a RST."""
        self.close_connection = True
        try:
            self.wfile.flush()
        except OSError:
            pass
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()

    def _fin(self) -> None:
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def handle_any(self) -> None:
        owner = self.owner
        body = self.read_body()
        fault = owner.pick(self.command, self.path, self.headers.get("Range"))
        kind = fault.kind if fault else None
        if kind == "reset":
            return self._rst()
        if kind == "drop":
            return self._fin()
        if kind == "status":
            return self._error(fault)
        if kind == "delay":
            time.sleep(fault.seconds)

        headers = [
            (k, v)
            for k, v in self.headers.items()
            if k.lower() not in HOP_BY_HOP and k.lower() not in ("content-length", "host")
        ]
        headers.append(("Host", owner.upstream.netloc))
        try:
            status, reason, up_headers, data = owner.forward(self.command, self.path, headers, body)
        except OSError:
            return self._fin()  # upstream gone: look like a dead server, not a proxy bug
        with owner.lock:
            owner.responses.append((self.command, self.path, status))

        self.send_response(status, reason)
        length = None
        for k, v in up_headers:
            lk = k.lower()
            if lk in HOP_BY_HOP or lk in ("date", "server"):
                continue
            if lk == "content-length":
                length = v
                continue
            self.send_header(k, v)
        if self.command == "HEAD":
            self.send_header("Content-Length", length or "0")
            self.end_headers()
            if kind in ("truncate", "reset_mid_body"):  # no body to cut: cut the connection instead
                return self._rst() if kind == "reset_mid_body" else self._fin()
            return
        # a cut response always promises more than it sends (an empty body promises one byte)
        cut = kind in ("truncate", "reset_mid_body")
        self.send_header("Content-Length", str(len(data) if data or not cut else 1))
        self.end_headers()
        if cut:
            self.wfile.write(data[: len(data) // 2])
            return self._rst() if kind == "reset_mid_body" else self._fin()
        self.wfile.write(data)

    def _error(self, fault: Fault) -> None:
        rid = uuid.uuid4().hex.upper()[:24]
        body = error_body(self.owner.flavour, fault.code, fault.message, rid)
        self.send_response(fault.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-oss-request-id" if self.owner.flavour == "oss" else "x-amz-request-id", rid)
        if self.command == "HEAD":
            if self.owner.flavour == "oss":  # OSS puts HEAD errors in a header; oss2 reads it
                self.send_header("x-oss-err", base64.b64encode(body).decode())
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
