"""The URI grammar every layer shares: a URI's scheme, and the hub and ``tiny://`` sources.

The manifest checks source URIs when it is validated, long before ``sources`` fetches them, and storage
reads the scheme of every path it opens: so the grammar lives below both. Which storage schemes exist is
the storage registry's (``kolors_job.storage.schemes``); the hub clients are ``kolors_job.sources``'.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kolors_job.core.errors import InputError

__all__ = ["HUBS", "HUB_SCHEMES", "TINY_SCHEME", "Hub", "HubRef", "check_hub_uri", "parse_hub_uri", "scheme_of"]

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


@dataclass(frozen=True)
class Hub:
    """What a hub is, whatever its client: how messages name it, where its client reads a token, its default branch
    (each hub's client is ``kolors_job.sources.hubs.CLIENTS``')."""

    name: str
    token_env: str
    default_branch: str


HUBS: dict[str, Hub] = {
    "modelscope": Hub("ModelScope", "MODELSCOPE_API_TOKEN", "master"),  # modelscope_hub.config
    "hf": Hub("Hugging Face", "HF_TOKEN", "main"),  # huggingface_hub.constants
}
"""The hubs by URI scheme (``<scheme>://OWNER/NAME[@REVISION]``)."""
HUB_SCHEMES: tuple[str, ...] = tuple(HUBS)
TINY_SCHEME = "tiny"
"""``tiny://kolors``, ``tiny://aesthetic``: the tiny random models built into the cache (tests, demo)."""

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_REVISION = re.compile(r"^[\w.\-/]+$")


def scheme_of(uri: str) -> str:
    """The lower-case scheme of ``uri`` (any scheme, registered or not); ``""`` for a plain path."""
    m = _SCHEME.match(uri)
    return m.group(1).lower() if m else ""


@dataclass(frozen=True)
class HubRef:
    """``modelscope://Owner/Name[@rev]`` or ``hf://Owner/Name[@rev]``."""

    hub: str
    """The scheme: a key of ``HUBS``."""
    repo_id: str
    revision: str | None

    @property
    def uri(self) -> str:
        return f"{self.hub}://{self.repo_id}" + (f"@{self.revision}" if self.revision else "")

    @property
    def hub_name(self) -> str:
        return HUBS[self.hub].name


def check_hub_uri(scheme: str, rest: str) -> None:
    """Raise ValueError unless ``rest`` (what follows ``modelscope://``/``hf://``) is ``OWNER/NAME[@REVISION]``."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w./-]+)?", rest):
        raise ValueError(f"{scheme}:// URI must be {scheme}://OWNER/NAME[@REVISION]")


def parse_hub_uri(uri: str) -> HubRef | None:
    """The hub reference in ``uri``, None when it names no hub; a malformed hub URI is an InputError."""
    scheme, sep, rest = uri.strip().partition("://")
    if not sep or scheme.lower() not in HUB_SCHEMES:
        return None
    repo_id, at, revision = rest.strip("/").partition("@")
    if not _REPO_ID.match(repo_id) or (at and not _REVISION.match(revision)):
        raise InputError(f"bad hub uri {uri!r}: expected {scheme.lower()}://OWNER/NAME[@REVISION]")
    return HubRef(scheme.lower(), repo_id, revision or None)
