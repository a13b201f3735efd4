"""The memory the dataset scan's image decodes may hold at once, all threads together: a weighted semaphore over
bytes, and freed heap handed back to the OS after a big image."""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["DEFAULT_SCAN_MEMORY", "SCAN_BYTES_PER_PIXEL", "MemoryBudget"]


SCAN_BYTES_PER_PIXEL = 24
"""Peak bytes per pixel while one image is decoded and test-converted (the float64 path of 16-bit
and float images; 8-bit RGBA → composite → RGB is about 16)."""


DEFAULT_SCAN_MEMORY = 1 << 30
"""What the scan's decodes may hold at once, all threads together (Settings.scan_memory_mb)."""


class MemoryBudget:
    """A weighted semaphore over bytes: threads decode small images side by side, while images near
    ``max_pixels`` (a GB each) take turns, so the scan's peak stays under the budget whatever the
    thread count. An image bigger than the whole budget runs alone."""

    def __init__(self, total: int) -> None:
        self.total, self.used = max(1, total), 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        nbytes = min(nbytes, self.total)
        with self._cond:
            self._cond.wait_for(lambda: self.used + nbytes <= self.total)
            self.used += nbytes
        try:
            yield
        finally:
            if nbytes >= _TRIM_ABOVE:
                _malloc_trim()
            with self._cond:
                self.used -= nbytes
                self._cond.notify_all()


_TRIM_ABOVE = 64 << 20


def _malloc_trim() -> None:
    """Hand freed heap back to the OS. Pillow allocates in 16 MB blocks, under glibc's mmap threshold,
    and every thread's malloc arena keeps what it freed: without this, threads that decoded big images
    one after another would still each keep one image's worth of memory."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - glibc only
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None
