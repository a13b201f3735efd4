"""Keep credentials out of logs, errors and every file the job writes.

Two layers: URIs lose their userinfo and signed query strings (``redact_uri``), and any text we
emit is scrubbed of the *values* of secret-looking environment variables (``scrub``) — so a key
that leaks into an SDK's exception message is still caught.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
_SECRET_NAME = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|ACCESS_KEY_ID|CREDENTIAL|API_KEY|PRIVATE)", re.I)
_SECRET_QUERY = re.compile(r"(signature|token|secret|credential|password|key)", re.I)
_MIN_SECRET_LEN = 6  # shorter values ("1", "true") would mask ordinary words
_SHORT_SECRET_LEN = 16
"""Values shorter than this are masked only as whole tokens: ``AWS_ACCESS_KEY_ID=hostile`` must not
turn ``test_hostile_inputs`` into ``test_***_inputs``. Real keys and secrets are longer (AWS key ids
are 20 characters, OSS ones 24, secrets 30-40) and are masked wherever they appear."""
_WORD_CHARS = "A-Za-z0-9_.-"


def redact_uri(uri: str) -> str:
    """``s3://AK:SK@bucket/p?X-Amz-Signature=..`` → ``s3://***@bucket/p?X-Amz-Signature=***``."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    netloc = parts.netloc
    if "@" in netloc:
        netloc = MASK + "@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, MASK if _SECRET_QUERY.search(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of environment variables whose names look like credentials, longest first."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if _SECRET_NAME.search(k) and len(v) >= _MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


_URI_IN_TEXT = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")


def scrub(text: str, environ: Mapping[str, str] | None = None) -> str:
    """Remove secret env values and URI credentials from arbitrary text."""
    for value in secret_values(environ):
        if len(value) >= _SHORT_SECRET_LEN:
            text = text.replace(value, MASK)
        elif value in text:
            text = re.sub(rf"(?<![{_WORD_CHARS}]){re.escape(value)}(?![{_WORD_CHARS}])", MASK, text)
    return _URI_IN_TEXT.sub(lambda m: redact_uri(m.group(0)), text)


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one scrubbed line of at most ``limit`` characters, for error messages and logs:
    SDK and loader texts span lines and may quote a secret or a signed URL."""
    text = scrub(" ".join(str(exc).split())) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
