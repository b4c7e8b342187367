"""HeapTrimmer: at most one malloc_trim per interval, one thread at a time."""

from __future__ import annotations

import threading

from kvshare.heap import _MALLOC_TRIM, HeapTrimmer


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_trims_at_most_once_per_interval():
    clock, calls = Clock(), []
    heap = HeapTrimmer(10.0, clock, trim=lambda pad: calls.append(pad) or 1)
    assert not heap.maybe_trim()  # the first interval starts at creation
    clock.now = 10.0
    assert heap.maybe_trim() and calls == [0]
    clock.now = 19.9
    assert not heap.maybe_trim()
    clock.now = 20.0
    assert heap.maybe_trim() and heap.trims == 2


def test_a_thread_finding_another_trimming_does_not_wait():
    clock, inside, release = Clock(), threading.Event(), threading.Event()

    def slow_trim(pad: int) -> int:
        inside.set()
        release.wait()
        return 1

    heap = HeapTrimmer(1.0, clock, trim=slow_trim)
    clock.now = 5.0
    trimming = threading.Thread(target=heap.maybe_trim)
    trimming.start()
    inside.wait()
    assert not heap.maybe_trim()  # returns at once: the lock is held
    release.set()
    trimming.join()
    assert heap.trims == 1


def test_without_malloc_trim_nothing_happens():
    clock = Clock()
    heap = HeapTrimmer(1.0, clock, trim=None)
    clock.now = 5.0
    assert not heap.maybe_trim() and heap.trims == 0


def test_glibc_trim_runs_here():
    # This project's machines run glibc: the real function must load and return.
    assert _MALLOC_TRIM is not None
    assert _MALLOC_TRIM(0) in (0, 1)
