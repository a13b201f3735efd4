"""A hub repo as listed: its files (path, size, digest) and the one commit they were listed at. Each hub's client
(``modelscope``, ``huggingface``) lists its own, every call through ``hub_errors.call_hub`` (one line and an exit
code per failure, 429/5xx retried)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from kolors_job.core.settings import Settings

__all__ = ["Listing", "RemoteFile", "RepoType", "read_timeout"]

RepoType = Literal["model", "dataset"]


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None = None
    """The content's sha256, when the listing gives it (ModelScope: every file; Hugging Face: LFS files)."""
    oid: str | None = None
    """Hugging Face's git blob id of a file not in LFS (sha1 of ``blob <size>\\0`` + the bytes)."""


@dataclass
class Listing:
    """A hub repo's files as listed, and the one commit they were listed at."""

    files: list[RemoteFile]
    commit: str | None
    pinned: bool
    """Downloads can be pinned to ``commit`` (the hub listed the repo at it)."""
    branch: str
    """The branch/tag listed (the requested revision, else the hub's default branch)."""
    file_revisions: dict[str, str] = field(default_factory=dict)


def read_timeout(settings: Settings) -> int:
    return max(1, math.ceil(settings.storage_read_timeout_s))


