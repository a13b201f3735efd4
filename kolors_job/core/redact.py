"""Keep credentials out of logs, errors and every file the job writes.

Three things are masked wherever text leaves the process (``scrub``): the userinfo of a URI
(``s3://AK:SK@…``), the value of a signed-URL or token parameter (``X-Amz-Signature=…``, ``token=…``),
also percent-encoded once or twice as SDKs print a key (``%3FX-Amz-Signature%3D…``), and the values of
secret-looking environment variables — so a key that leaks into an SDK's exception message is still
caught. Masking replaces those values and nothing else: every other byte of the text stays as it was.
The manifest itself is never rewritten: one holding a credential is refused (``holds_secret``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from urllib.parse import unquote

MASK = "***"
_SECRET_NAME = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|ACCESS_KEY_ID|CREDENTIAL|API_KEY|PRIVATE)", re.I)
_SECRET_QUERY = re.compile(
    r"x-(amz|goog|oss)-(signature|credential|security-token)|signature|sig|security[-_]?token"
    r"|((access|id|refresh|session|auth|api)[-_]?)?token|(aws|oss)accesskeyid|googleaccessid|x-api-key"
    r"|api[-_]?key|key|password|passwd|pwd|secret|client[-_]?secret|credentials?|auth|authorization",
    re.I,
)
"""Query parameter names (whole) whose values are credentials: signed URLs of S3, OSS, GCS and Azure,
API keys and tokens. Only these are masked: ``?keyword=…`` or ``?sale`` stay as they are."""
_SEP = r"(?:[?&;]|%3[fF]|%26|%3[bB]|%253[fF]|%2526)"
_EQ = r"(?:=|%3[dD]|%253[dD])"
_PARAM = re.compile(
    rf"(?P<head>{_SEP}(?P<name>[A-Za-z0-9_.~%-]{{1,64}}?){_EQ})(?P<value>(?:(?!%26|%2526|%3[bB])[^&;\s'\"<>#])+)"
)
"""A query parameter in text, raw or percent-encoded (once or twice) the way SDK errors print keys."""
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s'\"<>]+@")
_MIN_SECRET_LEN = 6  # shorter values ("1", "true") would mask ordinary words
_SHORT_SECRET_LEN = 16
"""Values shorter than this are masked only as whole tokens: ``AWS_ACCESS_KEY_ID=hostile`` must not
turn ``test_hostile_inputs`` into ``test_***_inputs``. Real keys and secrets are longer (AWS key ids
are 20 characters, OSS ones 24, secrets 30-40) and are masked wherever they appear."""
_WORD_CHARS = "A-Za-z0-9_.-"


def _mask_param(m: re.Match[str]) -> str:
    name = unquote(unquote(m.group("name")))
    return m.group("head") + MASK if _SECRET_QUERY.fullmatch(name) else m.group(0)


def mask_credentials(text: str) -> str:
    """``text`` with URI userinfo and secret parameter values replaced by ``***``; every other byte kept."""
    return _PARAM.sub(_mask_param, _USERINFO.sub(rf"\g<scheme>{MASK}@", text))


def redact_uri(uri: str) -> str:
    """``S3://AK:SK@bucket/p?X-Amz-Signature=..&a`` → ``S3://***@bucket/p?X-Amz-Signature=***&a``: the
    credentials masked, the rest byte for byte (scheme case, parameter order and blanks included)."""
    return mask_credentials(uri)


def without_query(uri: str) -> str:
    """``uri`` to show in an error about its query: credentials masked, the query itself left out."""
    head = mask_credentials(uri.split("#", 1)[0])
    return head.split("?", 1)[0] + ("?…" if "?" in head else "")


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of environment variables whose names look like credentials, longest first."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if _SECRET_NAME.search(k) and len(v) >= _MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def scrub(text: str, environ: Mapping[str, str] | None = None) -> str:
    """Remove secret env values (raw and percent-encoded), URI userinfo and secret parameters from any text."""
    return _masked(text, secret_values(environ))


def scrubber(environ: Mapping[str, str] | None = None) -> Callable[[str], str]:
    """:func:`scrub` with the environment's secret values read once, for many texts at a time (every string of a
    report): reading ``os.environ`` again for each of ~1,000 strings was most of the work."""
    values = secret_values(environ)
    return lambda text: _masked(text, values)


def _masked(text: str, values: list[str]) -> str:
    for value in values:
        for form in {value, quote_value(value)}:
            if len(value) >= _SHORT_SECRET_LEN:
                text = text.replace(form, MASK)
            elif form in text:
                text = re.sub(rf"(?<![{_WORD_CHARS}]){re.escape(form)}(?![{_WORD_CHARS}])", MASK, text)
    return mask_credentials(text)


def quote_value(value: str) -> str:
    """``value`` percent-encoded the way a URL (an SDK's error text) carries it."""
    from urllib.parse import quote

    return quote(value, safe="")


def holds_secret(text: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``text`` holds something :func:`scrub` would mask: it must not reach a file unmasked."""
    return scrub(text, environ) != text


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one scrubbed line of at most ``limit`` characters, for error messages and logs:
    SDK and loader texts span lines and may quote a secret or a signed URL."""
    text = scrub(" ".join(str(exc).split())) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
