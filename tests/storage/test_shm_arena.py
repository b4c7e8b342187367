"""The shared-memory arena: a private file, first-fit ranges that coalesce, quarantine."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from kvshare.storage.shm_arena import (
    ALIGN,
    ArenaMapping,
    ShmArena,
    owner_tag,
    remove_stale_arenas,
)


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def arena(tmp_path, clock):
    a = ShmArena(4 * ALIGN, tag="t", directory=tmp_path, clock=clock)
    yield a
    a.close()


def test_the_file_is_private_fully_sized_and_removed_on_close(tmp_path):
    arena = ShmArena(3 * ALIGN + 5, tag=owner_tag(tmp_path), directory=tmp_path)
    info = arena.path.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == os.geteuid()
    assert info.st_size == arena.capacity_bytes == 3 * ALIGN  # whole pages only
    assert info.st_blocks * 512 >= arena.capacity_bytes  # reserved up front, not sparse
    other = ShmArena(ALIGN, tag=owner_tag(tmp_path), directory=tmp_path)
    assert other.path != arena.path  # each arena a file of its own
    arena.close()
    assert not arena.path.exists()
    other.close()


def test_first_fit_fragmentation_and_coalescing(arena):
    a, b, c, d = (arena.allocate(ALIGN) for _ in range(4))
    assert (a, b, c, d) == (0, ALIGN, 2 * ALIGN, 3 * ALIGN)
    assert arena.allocate(1) is None  # exhausted
    arena.release(b, ALIGN)
    arena.release(d, ALIGN)
    assert arena.free_ranges() == [(ALIGN, ALIGN), (3 * ALIGN, ALIGN)]
    assert arena.allocate(2 * ALIGN) is None  # two pages free, but not in one piece
    arena.release(c, ALIGN)  # joins both neighbours
    assert arena.free_ranges() == [(ALIGN, 3 * ALIGN)]
    assert arena.free_bytes == 3 * ALIGN
    assert arena.allocate(ALIGN + 1) == ALIGN  # rounded up to two pages, first fit
    assert arena.free_ranges() == [(3 * ALIGN, ALIGN)]
    arena.release(a, 10)
    assert arena.free_ranges() == [(0, ALIGN), (3 * ALIGN, ALIGN)]


def test_a_quarantined_range_is_reused_only_after_its_time(arena, clock):
    offsets = [arena.allocate(ALIGN) for _ in range(4)]
    arena.release(offsets[2], ALIGN, reusable_at=clock.now + 5.0)
    assert arena.quarantined_bytes == ALIGN and arena.free_bytes == 0
    assert arena.allocate(ALIGN) is None
    clock.now += 4.9
    assert arena.allocate(ALIGN) is None
    clock.now += 0.1
    assert arena.allocate(ALIGN) == offsets[2]
    assert arena.quarantined_bytes == 0


def test_release_checks_the_range(arena):
    with pytest.raises(ValueError, match="not one of this arena's"):
        arena.release(ALIGN + 1, 10)
    with pytest.raises(ValueError, match="not one of this arena's"):
        arena.release(3 * ALIGN, 2 * ALIGN)
    with pytest.raises(ValueError, match="expected >= 1"):
        arena.allocate(0)


def test_views_and_offsets(arena):
    offset = arena.allocate(100)
    view = arena.view(offset, 100)
    view.copy_(torch.arange(100, dtype=torch.uint8))
    assert arena.offset_of(view) == offset
    assert arena.offset_of(torch.zeros(4)) is None


def test_a_reader_maps_the_bytes_and_its_writes_stay_its_own(arena):
    offset = arena.allocate(64)
    arena.view(offset, 64).copy_(torch.arange(64, dtype=torch.uint8))
    reader = ArenaMapping(arena.path)
    seen = reader.bytes_at(offset, 64)
    assert bytes(seen) == bytes(range(64))
    arena.view(offset, 1).fill_(200)  # the owner's later writes show through
    assert seen[0] == 200
    seen[1] = 7  # a stray write by the reader: copy on write, the arena is untouched
    assert int(arena.view(offset + 1, 1)) == 1
    with pytest.raises(ValueError, match="lies outside"):
        reader.bytes_at(arena.capacity_bytes - 10, 11)


def test_a_reader_refuses_a_file_others_can_read(tmp_path):
    path = tmp_path / "kvshare-arena-x"
    path.write_bytes(b"\0" * ALIGN)
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="not a private file of this user"):
        ArenaMapping(path)


def test_stale_arenas_of_the_tag_or_of_dead_owners_are_removed(tmp_path):
    left = ShmArena(ALIGN, tag="mine", directory=tmp_path)  # a killed owner's, never closed
    live = ShmArena(ALIGN, tag="theirs", directory=tmp_path)  # this process: running
    dead = tmp_path / "kvshare-arena-gone-999999999-abcd"  # no such pid
    dead.write_bytes(b"")
    assert sorted(remove_stale_arenas("mine", tmp_path)) == sorted([left.path, dead])
    assert live.path.exists()
    live.close()
