"""Storage prefixes as sources: any registered backend's URI (``oss://``, ``s3://``, ``file://`` …) copied
once into the cache, published all or nothing, so later jobs reuse it and a torn copy is redone."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from kolors_job.core.errors import InputError, JobError
from kolors_job.core.redact import one_line, redact_uri, scrub
from kolors_job.core.settings import Settings
from kolors_job.storage import open_store, redact
from kolors_job.storage.atomic import atomic_dir

from .layout import SKIPPED_KEYS_FILE

__all__ = ["cache_key", "copy_dataset_prefix", "copy_model_prefix"]

log = logging.getLogger(__name__)



def cache_key(*parts: str) -> str:
    """The cache directory name of a dataset identified by ``parts``."""
    return hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:24]


def copy_model_prefix(uri: str, settings: Settings) -> tuple[Path, int]:
    """Copy a model's prefix into ``<cache>/models/<sha256(uri)[:16]>/`` once (concurrent jobs share one
    copy): (dir, bytes fetched)."""
    uri = uri.rstrip("/")  # "s3://b/m/" and "s3://b/m" are the same model: one cache entry
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = settings.cache_dir / "models" / key
    try:
        store = open_store(uri, settings)
    except ValueError as exc:
        raise InputError(f"bad model uri {redact(uri)!r}: {one_line(exc)}") from None

    fetched = 0

    def download(tmp: Path) -> None:
        nonlocal fetched
        files = store.download_dir("", tmp)
        if not files:
            raise InputError(f"model {redact(uri)!r}: no files under that prefix")
        fetched = sum(f.stat().st_size for f in files)
        log.info("downloaded %d files of %s into %s", len(files), redact(uri), target)

    return atomic_dir(target, {"uri": redact(uri)}, download, replace_stale=True), fetched


def copy_dataset_prefix(source: str, settings: Settings) -> Path:
    """Copy a dataset's prefix into ``<cache>/datasets/<hash>/``; keys no local directory can hold are
    left out and listed in ``SKIPPED_KEYS_FILE`` (one odd key must not fail the rest)."""
    try:
        store = open_store(source, settings)
        keys = store.list("")
    except JobError:
        raise
    except ValueError as e:
        raise InputError(f"dataset source {redact_uri(source)!r}: {scrub(str(e))}") from None
    keys = [k for k in keys if not any(part.startswith(".") for part in k.split("/"))]
    if not keys:
        raise InputError(f"dataset source {redact_uri(source)!r}: no files under this prefix")
    # The key list is part of the identity, so adding/removing files fetches a fresh copy
    # (changing a file's bytes under the same key does not: version your dataset prefixes).
    final = Path(settings.cache_dir) / "datasets" / cache_key("store", redact_uri(source), *keys)

    def fill(staging: Path) -> None:
        skipped: dict[str, list[str]] = {}
        store.download_dir("", staging, skipped=skipped)
        if skipped:
            (staging / SKIPPED_KEYS_FILE).write_text(json.dumps(skipped, ensure_ascii=False))

    return atomic_dir(final, None, fill, replace_stale=True)
