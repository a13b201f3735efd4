"""Publishing local files and directories all or nothing: readers see the old state or the complete new one.

``atomic_target`` is for one file (a LoRA, status.json, a download); ``atomic_dir`` for a directory
built in one go (a tiny model, a bucket or hub copy in the cache) that concurrent jobs may race to build.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["COMPLETE_MARKER", "TMP_MARKER", "atomic_dir", "atomic_target", "file_mode"]

TMP_MARKER = ".kolors-tmp-"
"""Temp files written next to their destination carry this, so listings can skip half-written files."""

COMPLETE_MARKER = ".kolors_job_complete"
"""Written last inside a published directory; its presence means every other file is complete."""

STALE_STAGING_SECONDS = 24 * 3600
"""A staging dir this old was left by a crashed job (no live one builds for a day): it is removed."""


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import: os.umask can only be read by setting it


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give: 0o666 less the umask."""
    return 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success rename it into place, on failure remove it.

    Readers never see a partial file, and a crash leaves at most a ``.kolors-tmp-*`` file. The file
    gets the umask's mode, not mkstemp's 0600 (nor what the writer chose, e.g. safetensors' 0600):
    a ComfyUI or web container running as another user must be able to read the LoRA on a shared volume.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:60]}{TMP_MARKER}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _marker_matches(path: Path, info: dict[str, Any] | None) -> bool:
    """True if ``path`` holds a complete build made for ``info`` (None: any complete build);
    a build for other inputs is an error."""
    marker = path / COMPLETE_MARKER
    if not marker.is_file():
        return False
    if info is None:
        return True
    found = json.loads(marker.read_text())
    if any(found.get(k) != v for k, v in info.items()):
        raise FileExistsError(f"{path} holds a build of {found}, not of {info}")
    return True


def _remove_stale_staging(path: Path) -> None:
    """Drop staging dirs of ``path`` that a crashed job left behind (``<name>.partial-*``: older layout)."""
    now = time.time()
    for pattern in (f".{path.name}.tmp-*", f"{path.name}.partial-*"):
        for p in path.parent.glob(pattern):
            with contextlib.suppress(OSError):
                if now - p.stat().st_mtime > STALE_STAGING_SECONDS:
                    shutil.rmtree(p, ignore_errors=True)


def atomic_dir(
    path: Path, info: dict[str, Any] | None, write: Callable[[Path], None], *, replace_stale: bool
) -> Path:
    """Create the directory ``path`` with ``write(tmp_dir)``, all or nothing; returns ``path``.

    ``write`` fills a sibling temp dir, a marker is written last (``info`` as JSON, checked on reuse;
    with ``info=None`` the UTC time, and any complete copy is reused), then the dir is renamed into
    place. ``rename`` is atomic and refuses a non-empty target, so concurrent builders race safely (the
    loser discards its copy and uses the winner's), a reader never sees half a model or dataset, and a
    crash leaves only a ``.<name>.tmp-*`` dir (removed a day later). A complete ``path`` returns at once.
    With ``replace_stale`` an existing ``path`` without the marker (a torn copy) is replaced;
    without it, that is an error (never delete a directory we did not make).
    """
    path = Path(path)
    if _marker_matches(path, info):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(path)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        tmp.mkdir()
        write(tmp)
        marker = (
            json.dumps(info, sort_keys=True)
            if info is not None
            else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        )
        (tmp / COMPLETE_MARKER).write_text(marker + "\n")
        for _ in range(3):
            try:
                os.rename(tmp, path)  # replaces an empty dir, fails on a non-empty one
                break
            except OSError:
                if _marker_matches(path, info):
                    break  # a concurrent builder won
                if not replace_stale:
                    raise FileExistsError(f"{path} exists and is not a complete build of {info}") from None
                stale = path.parent / f".{path.name}.stale-{uuid.uuid4().hex[:12]}"
                with contextlib.suppress(FileNotFoundError):
                    os.rename(path, stale)
                shutil.rmtree(stale, ignore_errors=True)
        else:
            raise FileExistsError(f"could not publish {path}: it keeps being replaced concurrently")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
