"""URI schemes → storage backends, and the one parser of storage URIs.

A backend registers its scheme once (``register("gs", "kolors_job.storage.gcs.store:GCSStore", ...)``):
with its own settings class, the check of its bucket names and the optional extra that installs its SDK.
The manifest's checks, ``open_store``, model and dataset sources and ``kolors-job validate`` all ask this
registry, so a new backend is one package plus one registration line (docs/adding-a-storage-backend.md). A
backend given as a ``"module:Class"`` string is imported on first use: a job writing to local paths never
imports boto3.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from pydantic_settings import BaseSettings

from kolors_job.core.errors import ExitCode, JobError
from kolors_job.core.settings import Settings
from kolors_job.core.uris import scheme_of

from .base import Store, redact

__all__ = [
    "Backend",
    "backend",
    "check_bucket_uri",
    "check_uri",
    "is_bucket_uri",
    "listed_schemes",
    "open_store",
    "register",
    "schemes",
    "setup_problem",
    "split_uri",
    "unregister",
]

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


@dataclass(frozen=True)
class Backend:
    scheme: str
    store: str | type[Store]
    """The Store class, or ``"module:Class"`` to import when first opened. ``Class.open(bucket, prefix,
    settings)`` builds a store (``Store.open``'s default: ``Class(bucket, prefix, settings)``)."""
    check_bucket: Callable[[str], None] | None = None
    """Raises ValueError for a bucket name the service refuses (checked at manifest validation)."""
    local: bool = False
    """Local paths (``file://``): no bucket, the prefix is an absolute directory."""
    settings: type[BaseSettings] | None = None
    """The backend's own settings class (pydantic-settings, its own ``KOLORS_JOB_<SCHEME>_*`` env); the store
    reads it with ``settings.backend(scheme, cls)``. A ``missing()`` method on it, if any, says what this
    environment lacks for the backend (``kolors-job validate`` prints it)."""
    extra: str | None = None
    """The optional dependency set (``pip install 'kolors-job[<extra>]'``) that installs the backend's SDK."""

    def store_class(self) -> type[Store]:
        if isinstance(self.store, str):
            module, _, name = self.store.partition(":")
            try:
                return getattr(importlib.import_module(module), name)
            except ModuleNotFoundError as exc:
                if self.extra is None or (exc.name or "").split(".")[0] == "kolors_job":
                    raise
                raise JobError(
                    f"{self.scheme}:// needs {exc.name}, which is not installed here: "
                    f"pip install 'kolors-job[{self.extra}]'",
                    exit_code=ExitCode.INVALID_INPUT,
                ) from None
        return self.store


_BACKENDS: dict[str, Backend] = {}


def register(
    scheme: str,
    store: str | type[Store],
    *,
    check_bucket: Callable[[str], None] | None = None,
    local: bool = False,
    settings: type[BaseSettings] | None = None,
    extra: str | None = None,
) -> None:
    """Make ``<scheme>://`` a storage URI everywhere: manifest outputs, model and dataset sources."""
    scheme = scheme.lower()
    if not _SCHEME.match(f"{scheme}://"):
        raise ValueError(f"invalid URI scheme {scheme!r}")
    _BACKENDS[scheme] = Backend(scheme, store, check_bucket, local, settings, extra)


def unregister(scheme: str) -> None:
    _BACKENDS.pop(scheme.lower(), None)


def schemes() -> tuple[str, ...]:
    """The registered storage schemes, in registration order."""
    return tuple(_BACKENDS)


def listed_schemes() -> str:
    """The registered schemes as messages and help texts list them: ``oss://, s3:// or file://``."""
    names = [f"{s}://" for s in _BACKENDS]
    return " or ".join([", ".join(names[:-1]), names[-1]]) if len(names) > 1 else "".join(names)


def backend(scheme: str) -> Backend | None:
    return _BACKENDS.get(scheme.lower())


def is_bucket_uri(uri: str) -> bool:
    """Whether ``uri`` names a prefix in a registered object store (not a local path)."""
    b = backend(scheme_of(uri))
    return b is not None and not b.local


def check_bucket_uri(scheme: str, rest: str) -> None:
    """Raise ValueError unless ``rest`` (what follows ``s3://``/``oss://``) is ``bucket[/path]`` with a
    bucket name the service accepts, no credentials and no ``.``/``..`` segments.

    Caught here, at validation, because later they go wrong in worse ways: ``user:pass@bucket`` reaches
    the SDK's error text (and from there logs and status.json), an invalid bucket name fails as a
    retryable connection error (S3) or an SDK traceback (OSS), and ``..`` names another prefix.
    The problem is described, never echoed: the text may hold a password or a signature.
    """
    _no_query(scheme, rest)
    bucket, _, path = rest.partition("/")
    if "@" in bucket:
        raise ValueError(
            f"{scheme}:// URI must not carry credentials (user:password@): they come from the environment's "
            "credential chain"
        )
    if not bucket:
        raise ValueError(f"{scheme}:// URI needs a bucket name")
    b = backend(scheme)
    if b is not None and b.check_bucket is not None:
        b.check_bucket(bucket)
    if any(seg in (".", "..") for seg in path.split("/")):
        raise ValueError(f"{scheme}:// URI must not contain '.' or '..' path segments")
    if "\\" in path or any(ord(c) < 32 for c in path):
        raise ValueError(f"{scheme}:// URI path must not contain backslashes or control characters")


def _no_query(scheme: str, rest: str) -> None:
    """A storage URI names a prefix or an object: a query (``?X-Amz-Signature=…``: a signed URL) or a fragment
    has no use there, and kept it would become part of every key written (and of every error printed)."""
    if "?" in rest or "#" in rest:
        raise ValueError(
            f"{scheme}:// URI must not carry a query or fragment ('?…', '#…'): storage URIs name a bucket "
            "prefix or a path (a signed URL is not one)"
        )


def check_uri(scheme: str, rest: str) -> None:
    """Raise ValueError unless ``<scheme>://<rest>`` is a well-formed URI of the registered ``scheme``:
    a local one names no host, a bucket one passes ``check_bucket_uri``."""
    b = backend(scheme)
    if b is None:
        raise ValueError(f"unsupported storage URI scheme {scheme!r}")
    if b.local:
        _no_query(scheme, rest)
        if rest.split("/", 1)[0] not in ("", "localhost"):
            raise ValueError(f"{scheme}:// URI must not name a host (use {scheme}:///absolute/path)")
    else:
        check_bucket_uri(scheme, rest)


def split_uri(uri: str) -> tuple[str, str, str]:
    """``(scheme, bucket, prefix)``; prefix has a trailing '/' unless empty.

    Local paths (plain or ``file://``) give ``("file", "", "/absolute/dir/")``.
    """
    m = _SCHEME.match(uri)
    scheme = m.group(1).lower() if m else "file"
    b = backend(scheme)
    if b is None:
        raise ValueError(
            f"unsupported storage URI scheme {scheme!r} in {redact(uri)!r}: "
            f"use {', '.join(s + '://' for s in schemes())} or a local path"
        )
    if b.local:
        if m:
            check_uri(scheme, uri[m.end() :])
            _host, sep, path = uri[m.end() :].partition("/")
            rest = "/" + unquote(path) if sep else "/"
        else:
            rest = uri
        local = Path(rest).expanduser().absolute().as_posix()
        return scheme, "", local.rstrip("/") + "/"
    check_bucket_uri(scheme, uri[m.end() :])
    bucket, _, prefix = uri[m.end() :].partition("/")
    prefix = prefix.lstrip("/")
    return scheme, bucket, prefix if not prefix or prefix.endswith("/") else prefix + "/"


def setup_problem(uri: str) -> str | None:
    """What this environment lacks before ``uri`` can be opened, as its backend's settings say (the OSS
    endpoint, say); None when nothing is missing or the backend does not tell."""
    b = backend(scheme_of(uri))
    if b is None or b.settings is None or not hasattr(b.settings, "missing"):
        return None
    return b.settings().missing()


def open_store(uri: str, settings: Settings | None = None) -> Store:
    """A store rooted at ``uri``. Unknown schemes raise ValueError; clients are built here, once."""
    scheme, bucket, prefix = split_uri(uri)
    return _BACKENDS[scheme].store_class().open(bucket, prefix, settings or Settings())
