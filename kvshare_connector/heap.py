"""Hand the C heap's free memory back to the operating system now and then (glibc only).

Why: kvshare's buffers are large and short-lived: a prompt's KV is about 23 kB per token
for SmolLM2-135M (5-50 MB per request), copied for a save, split into chunks, framed for
the daemon, decoded, and freed, on several threads. glibc's malloc raises its mmap
threshold to the largest block freed (up to 32 MiB), after which such blocks come from
per-thread arenas, and it returns an arena's free memory to the system only from the
arena's top. Free memory in the middle of an arena stays counted in the process's RSS:
hours of traffic make a worker or the daemon look like it leaks while it holds nothing.
``malloc_trim(0)`` releases the free pages inside every arena (``madvise``), without
moving live data. It takes milliseconds, so :class:`HeapTrimmer` runs it at most once
per interval, on a thread that serves no request (the connector's save thread, the
daemon's workers between messages).

On a C library without ``malloc_trim`` (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from collections.abc import Callable

TRIM_INTERVAL_S = 10.0
"""At most one trim per this many seconds per process."""


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _load_malloc_trim()


class HeapTrimmer:
    """Calls ``malloc_trim(0)`` from :meth:`maybe_trim` at most every ``interval_s``.

    Thread-safe: of several threads calling at once, one trims and the others return at
    once. ``clock`` (seconds, monotonic) and ``trim`` are for tests.
    """

    def __init__(self, interval_s: float = TRIM_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic,
                 trim: Callable[[int], int] | None = _MALLOC_TRIM) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._trim = trim
        self._lock = threading.Lock()
        self._next = clock() + interval_s
        self.trims = 0
        """Trims run so far."""

    def maybe_trim(self) -> bool:
        """Trim if the interval has passed since the last trim; whether it trimmed."""
        if self._trim is None or self._clock() < self._next:
            return False
        if not self._lock.acquire(blocking=False):
            return False  # another thread is trimming
        try:
            if self._clock() < self._next:
                return False
            self._trim(0)
            self.trims += 1
            self._next = self._clock() + self.interval_s
            return True
        finally:
            self._lock.release()
