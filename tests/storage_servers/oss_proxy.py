"""An OSS-protocol front for an S3 server (moto), for testing oss2 code offline.

No OSS server exists in any reachable registry (docs/design.md §6). This threaded proxy on 127.0.0.1
speaks enough of OSS for oss2: it verifies OSS V1 and V4 signatures against known keys (403
SignatureDoesNotMatch / InvalidAccessKeyId / AccessDenied in OSS XML, details included like the
real service, so tests can check we never echo them), translates ``x-oss-*`` <-> ``x-amz-*``
headers (meta, copy source, ``x-oss-forbid-overwrite`` -> ``If-None-Match: *`` -> 409
FileAlreadyExists), strips the S3 XML namespace, adds ``<Type>`` and ``.000Z`` timestamps to
listings, drops oss2's empty ``continuation-token=``, answers HEAD errors in ``x-oss-err`` and
returns ``x-oss-hash-crc64ecma`` computed from the data so oss2's CRC checks really run.

Fault injection for tests (counters, decremented per affected request): ``fail_next`` (503),
``corrupt_gets`` (flip a byte of a GET body, keep the true CRC), ``corrupt_puts`` (flip a byte
before storing: the returned CRC is of the corrupted data, as if corrupted in transit).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import re
import threading
import uuid
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit
from xml.sax.saxutils import escape

import crcmod

from .http_base import LoopbackServer, ProxyHandler

crc64 = crcmod.mkCrcFun(0x142F0E1EBA9EA3693, initCrc=0, xorOut=0xFFFFFFFFFFFFFFFF, rev=True)

# Query parameters that are part of the V1 string to sign (OSS "sub-resources").
V1_SUBRESOURCES = frozenset(
    [
        "acl",
        "uploads",
        "location",
        "cors",
        "logging",
        "website",
        "referer",
        "lifecycle",
        "delete",
        "append",
        "tagging",
        "objectMeta",
        "uploadId",
        "partNumber",
        "security-token",
        "position",
        "img",
        "style",
        "styleName",
        "replication",
        "replicationProgress",
        "replicationLocation",
        "cname",
        "bucketInfo",
        "comp",
        "qos",
        "live",
        "status",
        "vod",
        "startTime",
        "endTime",
        "symlink",
        "x-oss-process",
        "response-content-type",
        "response-content-language",
        "response-expires",
        "response-cache-control",
        "response-content-disposition",
        "response-content-encoding",
        "udf",
        "udfName",
        "udfImage",
        "udfId",
        "udfImageDesc",
        "udfApplication",
        "udfApplicationLog",
        "restore",
        "callback",
        "callback-var",
        "qosInfo",
        "policy",
        "stat",
        "encryption",
        "versions",
        "versioning",
        "versionId",
        "requestPayment",
        "x-oss-request-payer",
        "sequential",
        "inventory",
        "inventoryId",
        "continuation-token",
        "asyncFetch",
        "worm",
        "wormId",
        "wormExtend",
        "x-oss-traffic-limit",
        "objectInfo",
        "link",
        "group",
        "transferAcceleration",
        "metaQuery",
        "resourceGroup",
        "regionList",
        "httpsConfig",
    ]
)
UPSTREAM_AUTH = "AWS4-HMAC-SHA256 Credential=kolorsproxy/20240101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0"
HEADER_MAP = {  # OSS request header -> S3 header
    "x-oss-copy-source": "x-amz-copy-source",
    "x-oss-metadata-directive": "x-amz-metadata-directive",
    "x-oss-tagging": "x-amz-tagging",
    "x-oss-copy-source-if-match": "x-amz-copy-source-if-match",
    "x-oss-copy-source-if-none-match": "x-amz-copy-source-if-none-match",
}
PASS_HEADERS = {
    "content-type",
    "content-md5",
    "range",
    "if-match",
    "if-none-match",
    "if-modified-since",
    "if-unmodified-since",
    "cache-control",
    "content-disposition",
    "content-encoding",
    "expires",
}


def v4_encode(text: str, keep_slash: bool) -> str:
    return quote(text, safe="-_.~" + ("/" if keep_slash else ""))


def error_xml(code: str, message: str, request_id: str, **details: str) -> bytes:
    extra = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in details.items())
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{escape(message)}</Message>'
        f"<RequestId>{request_id}</RequestId><HostId>127.0.0.1</HostId>{extra}</Error>"
    ).encode()


class OSSProxy(LoopbackServer):
    def __init__(self, upstream: str, credentials: dict[str, tuple[str, str]]) -> None:
        """``credentials``: access key id -> (secret, security token or "")."""
        self.upstream = urlsplit(upstream)
        self.credentials = dict(credentials)
        self.fail_next = self.corrupt_gets = self.corrupt_puts = 0
        self.requests: list[tuple[str, str]] = []  # (method, path?query) seen, for assertions
        self.lock = threading.Lock()
        self._listen(_Handler, "oss-proxy")

    def take(self, counter: str) -> bool:
        with self.lock:
            if getattr(self, counter) > 0:
                setattr(self, counter, getattr(self, counter) - 1)
                return True
        return False

    def upstream_request(self, method: str, target: str, body: bytes = b"", headers: dict | None = None):
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            # moto checks no signature but wants one to route/authorise some requests (conditional puts)
            conn.request(
                method, target, body=body, headers={**(headers or {}), "Authorization": UPSTREAM_AUTH}
            )
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), resp.read()
        finally:
            conn.close()


class _Handler(ProxyHandler):
    owner: OSSProxy

    def reply(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def fail(self, status: int, code: str, message: str, **details: str) -> None:
        rid = uuid.uuid4().hex.upper()[:24]
        body = error_xml(code, message, rid, **details)
        hdrs = {"Content-Type": "application/xml", "x-oss-request-id": rid}
        if self.command == "HEAD":  # OSS puts HEAD errors in a header; oss2 reads it
            hdrs["x-oss-err"] = base64.b64encode(body).decode()
        self.reply(status, body, hdrs)

    # -- signatures -----------------------------------------------------------------------------
    def check_auth(self, bucket: str, key: str, params: list[tuple[str, str]]) -> bool:
        auth = self.headers.get("Authorization", "")
        hdrs = {k.lower(): v for k, v in self.headers.items()}
        if not auth:
            self.fail(403, "AccessDenied", "You have no right to access this object because of bucket acl.")
            return False
        if auth.startswith("OSS4-HMAC-SHA256 "):
            fields = dict(p.strip().split("=", 1) for p in auth[len("OSS4-HMAC-SHA256 ") :].split(","))
            ak, date, region, product, _ = fields["Credential"].split("/")
            additional = [h for h in fields.get("AdditionalHeaders", "").split(";") if h]
            provided = fields.get("Signature", "")
        elif auth.startswith("OSS "):
            ak, _, provided = auth[4:].partition(":")
        else:
            self.fail(400, "InvalidArgument", "Authorization header is invalid.")
            return False
        if ak not in self.owner.credentials:
            self.fail(
                403,
                "InvalidAccessKeyId",
                "The OSS Access Key Id you provided does not exist in our records.",
                OSSAccessKeyId=ak,
            )
            return False
        secret, token = self.owner.credentials[ak]
        if token and hdrs.get("x-oss-security-token") != token:
            self.fail(403, "InvalidSecurityToken", "The security token you provided is invalid.")
            return False
        resource = f"/{bucket}/{key}" if bucket else "/"
        if auth.startswith("OSS4"):
            signed = {
                k: v
                for k, v in hdrs.items()
                if k.startswith("x-oss-") or k in ("content-type", "content-md5") or k in additional
            }
            query = "&".join(
                f"{k}={v}" if v else k
                for k, v in sorted((v4_encode(k, False), v4_encode(v, False)) for k, v in params)
            )
            canonical = "\n".join(
                [
                    self.command,
                    v4_encode(resource, True),
                    query,
                    "".join(f"{k}:{v}\n" for k, v in sorted(signed.items())),
                    ";".join(additional),
                    hdrs.get("x-oss-content-sha256", "UNSIGNED-PAYLOAD"),
                ]
            )
            scope = f"{date}/{region}/{product}/aliyun_v4_request"
            string_to_sign = "\n".join(
                [
                    "OSS4-HMAC-SHA256",
                    hdrs.get("x-oss-date", ""),
                    scope,
                    hashlib.sha256(canonical.encode()).hexdigest(),
                ]
            )
            key_bytes = ("aliyun_v4" + secret).encode()
            for part in (date, region, product, "aliyun_v4_request"):
                key_bytes = hmac.new(key_bytes, part.encode(), hashlib.sha256).digest()
            expected = hmac.new(key_bytes, string_to_sign.encode(), hashlib.sha256).hexdigest()
        else:
            oss_headers = "".join(
                f"{k}:{v.strip()}\n" for k, v in sorted(hdrs.items()) if k.startswith("x-oss-")
            )
            sub = sorted((k, v) for k, v in params if k in V1_SUBRESOURCES)
            sub_str = ("?" + "&".join(f"{k}={v}" if v else k for k, v in sub)) if sub else ""
            string_to_sign = "\n".join(
                [
                    self.command,
                    hdrs.get("content-md5", ""),
                    hdrs.get("content-type", ""),
                    hdrs.get("x-oss-date") or hdrs.get("date", ""),
                    oss_headers + resource + sub_str,
                ]
            )
            digest = hmac.new(secret.encode(), string_to_sign.encode(), hashlib.sha1).digest()
            expected = base64.b64encode(digest).decode()
        if not hmac.compare_digest(expected, provided):
            self.fail(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the "
                "signature you provided. Check your key and signing method.",
                OSSAccessKeyId=ak,
                SignatureProvided=provided,
                StringToSign=string_to_sign,
            )
            return False
        return True

    # -- translation ----------------------------------------------------------------------------
    def handle_any(self) -> None:
        url = urlsplit(self.path)
        bucket, _, raw_key = url.path.lstrip("/").partition("/")
        key = unquote(raw_key)
        params = parse_qsl(url.query, keep_blank_values=True)
        body = self.read_body()
        self.owner.requests.append((self.command, self.path))
        if not self.check_auth(bucket, key, params):
            return
        if self.owner.take("fail_next"):
            return self.fail(503, "ServiceUnavailable", "Please reduce your request rate (injected).")

        q = dict(params)
        fwd_params = [
            (k, v) for k, v in params if not (k == "continuation-token" and not v) and k != "objectMeta"
        ]
        fwd_headers = {}
        for k, v in self.headers.items():
            lk = k.lower()
            if lk.startswith("x-oss-meta-"):
                fwd_headers["x-amz-meta-" + lk[len("x-oss-meta-") :]] = v
            elif lk in HEADER_MAP:
                fwd_headers[HEADER_MAP[lk]] = v
            elif lk in PASS_HEADERS:
                fwd_headers[k] = v
        forbid = self.headers.get("x-oss-forbid-overwrite", "").lower() == "true"
        if forbid:
            fwd_headers["If-None-Match"] = "*"
        is_object_put = (
            self.command == "PUT" and key and "x-oss-copy-source" not in {k.lower() for k in self.headers}
        )
        if is_object_put and body and self.owner.take("corrupt_puts"):
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        target = url.path + ("?" + urlencode(fwd_params, quote_via=quote) if fwd_params else "")
        status, up_headers, up_body = self.owner.upstream_request(self.command, target, body, fwd_headers)
        up = {k.lower(): v for k, v in up_headers}
        rid = up.get("x-amz-request-id") or uuid.uuid4().hex.upper()[:24]

        if status >= 300:
            m = re.search(rb"<Code>([^<]+)</Code>", up_body)
            code = m.group(1).decode() if m else {403: "AccessDenied", 304: "NotModified"}.get(status, "")
            msg = re.search(rb"<Message>([^<]*)</Message>", up_body)
            message = msg.group(1).decode() if msg else ""
            if forbid and status == 412:
                return self.fail(
                    409,
                    "FileAlreadyExists",
                    "The object you specified already exists and can not be overwritten.",
                )
            if status == 404 and not code:  # HEAD: no body; tell a missing bucket from a missing key
                code = (
                    "NoSuchKey"
                    if self.owner.upstream_request("HEAD", f"/{bucket}")[0] == 200
                    else "NoSuchBucket"
                )
            return self.fail(status, code or "InternalError", message or code)

        headers = {"x-oss-request-id": rid}
        for k, v in up_headers:
            lk = k.lower()
            if lk.startswith("x-amz-meta-"):
                headers["x-oss-meta-" + lk[len("x-amz-meta-") :]] = v
            elif lk in ("etag", "last-modified", "content-type", "content-range", "accept-ranges"):
                headers[k] = v
        if "etag" in up:
            headers["x-oss-object-type"] = "Multipart" if "-" in up["etag"] else "Normal"

        if up.get("content-type", "").endswith("xml") and up_body and self.command != "HEAD":
            up_body = re.sub(rb'\sxmlns="[^"]*"', b"", up_body, count=1)
            up_body = re.sub(
                rb"(<LastModified>[0-9T:-]+)(?:\.\d+)?(?:Z|\+00:00)(</LastModified>)", rb"\1.000Z\2", up_body
            )
            up_body = (
                re.sub(
                    rb"(<ETag>([^<]*)</ETag>)",
                    lambda m: (
                        m.group(1)
                        + (b"<Type>Multipart</Type>" if b"-" in m.group(2) else b"<Type>Normal</Type>")
                    ),
                    up_body,
                )
                if b"<ListBucketResult" in up_body
                else up_body
            )

        # CRC64 of what the server holds, so oss2's end-to-end check means something.
        crc = None
        if is_object_put:
            crc = crc64(body)
        elif self.command == "POST" and "uploadId" in q:  # completed multipart: CRC of the whole object
            crc = crc64(self.owner.upstream_request("GET", url.path)[2])
        elif key and self.command == "GET" and status == 200 and not q:
            crc = crc64(up_body)
            if up_body and self.owner.take("corrupt_gets"):
                up_body = bytes([up_body[0] ^ 0xFF]) + up_body[1:]
        elif key and self.command == "HEAD":
            crc = crc64(self.owner.upstream_request("GET", url.path)[2])
        if crc is not None:
            headers["x-oss-hash-crc64ecma"] = str(crc)
        if self.command == "HEAD" and "content-length" in up:
            # HEAD: advertise the object's length, send no body
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", up["content-length"])
            self.end_headers()
            return
        self.reply(status, up_body, headers)
