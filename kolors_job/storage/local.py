"""``file://`` and plain-path stores: a directory, with atomic writes so readers never see partial files."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kolors_job.core.errors import StorageDeniedError, StorageError, StorageNotFoundError, StorageTemporaryError
from kolors_job.core.settings import Settings

from .atomic import TMP_MARKER, atomic_target, file_mode
from .base import Store, check_key, child_prefix

TEMPORARY_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN, errno.ESTALE, errno.ETIMEDOUT})
"""Faults that may pass (space freed, a network filesystem back): exit 75, a rerun resumes."""


def os_error(exc: OSError, where: str) -> StorageError:
    """One line for a local filesystem fault: 75 when it may pass, else 5 (unusable or denied)."""
    reason = exc.strerror or type(exc).__name__
    if exc.errno in TEMPORARY_ERRNOS:
        return StorageTemporaryError(f"{where}: {reason} (errno {exc.errno}); rerun to resume")
    # EACCES/EPERM/EROFS, ENOTDIR/EEXIST (a regular file where a directory must be), ENAMETOOLONG …
    return StorageDeniedError(f"{where}: {reason} (errno {exc.errno})")


@contextmanager
def mapped(where: str) -> Iterator[None]:
    """Local OSError → the StorageError of :func:`os_error` (not-found and our own errors pass through)."""
    try:
        yield
    except (StorageError, FileNotFoundError):
        raise
    except OSError as e:
        raise os_error(e, where) from None


class LocalStore(Store):
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().absolute()
        self.uri = self.root.as_uri().rstrip("/") + "/"

    @classmethod
    def open(cls, bucket: str, prefix: str, settings: Settings) -> LocalStore:
        """``file://`` URIs have no bucket: the prefix is the absolute directory."""
        return cls(prefix)

    def path_of(self, key: str) -> Path:
        """The file ``key`` names (checked: it never leaves the root)."""
        return self.root.joinpath(*check_key(key).split("/"))

    def child(self, *parts: str) -> LocalStore:
        sub = child_prefix(*parts)
        return LocalStore(self.root.joinpath(*sub.split("/")) if sub else self.root)

    def local_path(self) -> Path:
        return self.root

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.path_of(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise StorageNotFoundError(f"not found: {self.uri}{key}") from None

    def write_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        with mapped(f"write {self.uri}{key}"):
            return self._write_bytes(key, data, if_absent=if_absent)

    def _write_bytes(self, key: str, data: bytes, *, if_absent: bool) -> bool:
        path = self.path_of(key)
        if not if_absent:
            with atomic_target(path) as tmp:
                tmp.write_bytes(data)
            return True
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:60]}{TMP_MARKER}", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, file_mode())
            # link() fails if the name exists: an atomic create of a *complete* file, where
            # O_EXCL alone would briefly expose a half-written one. O_EXCL is the fallback for
            # filesystems without hard links (some FUSE mounts).
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError:
                try:
                    with open(path, "xb") as f:
                        f.write(data)
                except FileExistsError:
                    return False
            return True
        finally:
            os.unlink(tmp)

    def upload_file(self, key: str, path: Path) -> None:
        with mapped(f"upload {self.uri}{key}"), atomic_target(self.path_of(key)) as tmp:
            shutil.copyfile(path, tmp)

    def download_file(self, key: str, path: Path) -> None:
        src = self.path_of(key)
        if not src.is_file():
            raise StorageNotFoundError(f"not found: {self.uri}{key}")
        with mapped(f"download {self.uri}{key} to {path}"), atomic_target(Path(path)) as tmp:
            shutil.copyfile(src, tmp)

    def size(self, key: str) -> int:
        path = self.path_of(key)
        if not path.is_file():
            raise StorageNotFoundError(f"not found: {self.uri}{key}")
        return path.stat().st_size

    def exists(self, key: str) -> bool:
        return self.path_of(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        # Walk only the deepest directory the prefix names, then filter by plain string prefix
        # (same semantics as an object-store prefix: "a/b" matches "a/b.txt" and "a/b/c").
        dirs = prefix.split("/")[:-1]
        if prefix.startswith("/") or any(d in ("..", ".") for d in dirs):
            raise StorageError(f"refusing to list {prefix!r}: it would leave {self.uri}")
        base = self.root.joinpath(*dirs)
        if not base.is_dir():
            return []
        keys = []
        for dirpath, _dirs, files in os.walk(base):
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in files:
                if TMP_MARKER in name:
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self.path_of(key)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            raise StorageError(f"cannot delete {self.uri}{key}: it is a directory") from None
        except OSError as e:
            raise os_error(e, f"delete {self.uri}{key}") from None
        self.remove_empty_parents(path)

    def remove_empty_parents(self, path: Path) -> None:
        """Like an object store, no empty "folders" stay behind (pruned checkpoints/step-N/)."""
        parent = path.parent
        while parent != self.root and parent.is_relative_to(self.root):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent
