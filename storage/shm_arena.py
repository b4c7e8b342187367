"""A shared-memory arena: one file under ``/dev/shm``, mapped, carved into byte ranges.

Why: the daemon's CPU tier keeps chunk KV here, so that a client on the same host (same
user) maps the file once and reads a chunk where it lies, instead of receiving ~10 MB per
fetch through a socket (two copies through the kernel).

The file is created ``0600`` with ``O_EXCL`` (no other user can open it, no one can plant
it in advance), named ``kvshare-arena-<tag>-<pid>-<random>`` (``tag`` names the owner,
e.g. a hash of the daemon's home; :func:`remove_stale_arenas` clears what a killed owner
left), fully reserved at creation (``posix_fallocate``: a full ``/dev/shm`` fails at start
with a clear error instead of a SIGBUS on a later write), and unlinked on :meth:`close`.

Allocator: first fit over an address-ordered free list; a freed range merges with free
neighbours. Ranges are page aligned (:data:`ALIGN`), so views start on a page.

Quarantine: a released range is not reused before its ``reusable_at`` time. A reader that
got a view (another process included) can read it unchanged until then; the tier that
owns the arena sets ``reusable_at`` to the last read of the chunk + :data:`GRACE_S`.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import mmap
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

GRACE_S = 5.0
"""Seconds a range handed to a reader stays unchanged after the read (the quarantine).

Readers copy out of a view within milliseconds (the connector's worker copies a fetched
chunk's rows into the fill at once; a remote client verifies the checksum on the view
before returning it). Five seconds covers a reader descheduled on a busy host many times
over while keeping recently read memory out of reuse only briefly."""
ALIGN = 4096
"""Ranges start on page boundaries (and no two chunks share a page)."""
SHM_DIR = Path("/dev/shm")
ARENA_PREFIX = "kvshare-arena-"
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0)


class ShmArena:
    """A mapped ``/dev/shm`` file of ``capacity_bytes`` and its range allocator.

    Thread-safe. ``clock`` (seconds, monotonic) is what quarantine deadlines are read
    against; tests pass a fake one. Invariant: free, quarantined and allocated ranges
    tile ``[0, capacity_bytes)`` without overlap.
    """

    def __init__(self, capacity_bytes: int, *, tag: str, directory: Path = SHM_DIR,
                 clock: Callable[[], float] = time.monotonic) -> None:
        capacity_bytes -= capacity_bytes % ALIGN
        if capacity_bytes < ALIGN:
            raise ValueError(f"shared-memory arena of {capacity_bytes} bytes; expected at "
                             f"least {ALIGN}")
        self.capacity_bytes = capacity_bytes
        self.clock = clock
        self.path = Path(directory) / f"{ARENA_PREFIX}{tag}-{os.getpid()}-{secrets.token_hex(4)}"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # the umask can only narrow it; be explicit anyway
            try:
                os.posix_fallocate(fd, 0, capacity_bytes)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot reserve {capacity_bytes} bytes of shared "
                              f"memory at {self.path} ({exc.strerror}); lower cpu_bytes or "
                              f"free space under {directory}") from exc
            self._map = mmap.mmap(fd, capacity_bytes, flags=mmap.MAP_SHARED,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        os.close(fd)
        self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        self._lock = threading.Lock()
        self._free_offsets: list[int] = [0]
        """Start of each free range, ascending (coalesced: no two free ranges touch)."""
        self._free_lengths: dict[int, int] = {0: capacity_bytes}
        self._quarantine: list[tuple[float, int, int]] = []
        """Heap of (reusable_at, offset, length)."""
        self.free_bytes = capacity_bytes
        self.quarantined_bytes = 0

    @staticmethod
    def span(nbytes: int) -> int:
        """Bytes a range of ``nbytes`` takes (rounded up to :data:`ALIGN`)."""
        return -(-nbytes // ALIGN) * ALIGN

    def allocate(self, nbytes: int) -> int | None:
        """Offset of a fresh range of ``span(nbytes)`` bytes (first fit), or None when no
        free range is large enough (after taking back quarantined ranges now due)."""
        if nbytes < 1:
            raise ValueError(f"cannot allocate {nbytes} bytes; expected >= 1")
        length = self.span(nbytes)
        with self._lock:
            self._reclaim_due()
            for i, offset in enumerate(self._free_offsets):
                free = self._free_lengths[offset]
                if free < length:
                    continue
                del self._free_lengths[offset]
                if free == length:
                    del self._free_offsets[i]
                else:
                    self._free_offsets[i] = offset + length
                    self._free_lengths[offset + length] = free - length
                self.free_bytes -= length
                return offset
        return None

    def release(self, offset: int, nbytes: int, reusable_at: float = float("-inf")) -> None:
        """Give back the range ``allocate`` returned for ``nbytes``; it is reused only once
        ``clock() >= reusable_at`` (at once by default: nobody read it)."""
        length = self.span(nbytes)
        if offset % ALIGN or not 0 <= offset <= self.capacity_bytes - length:
            raise ValueError(f"range ({offset}, {nbytes}) is not one of this arena's")
        with self._lock:
            if reusable_at <= self.clock():
                self._insert_free(offset, length)
            else:
                heapq.heappush(self._quarantine, (reusable_at, offset, length))
                self.quarantined_bytes += length

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        """The bytes ``[offset, offset + nbytes)`` as a uint8 tensor (no copy)."""
        return self._bytes[offset:offset + nbytes]

    def offset_of(self, tensor: torch.Tensor) -> int | None:
        """Where ``tensor``'s memory starts in the arena; None when it lies elsewhere."""
        offset = tensor.data_ptr() - self._bytes.data_ptr()
        return offset if 0 <= offset < self.capacity_bytes else None

    def free_ranges(self) -> list[tuple[int, int]]:
        """(offset, length) of every free range, ascending (for stats and tests)."""
        with self._lock:
            return [(offset, self._free_lengths[offset]) for offset in self._free_offsets]

    def close(self) -> None:
        """Remove the file. Its memory is returned once the last view (here or in a
        reader's process) is gone; readers that still hold a mapping keep reading it."""
        self.path.unlink(missing_ok=True)

    # -- free list (lock held) ----------------------------------------------------------
    def _reclaim_due(self) -> None:
        now = self.clock()
        while self._quarantine and self._quarantine[0][0] <= now:
            _, offset, length = heapq.heappop(self._quarantine)
            self.quarantined_bytes -= length
            self._insert_free(offset, length)

    def _insert_free(self, offset: int, length: int) -> None:
        self.free_bytes += length
        i = bisect.bisect_left(self._free_offsets, offset)
        if i < len(self._free_offsets) and offset + length == self._free_offsets[i]:
            length += self._free_lengths.pop(self._free_offsets.pop(i))
        if i > 0:
            before = self._free_offsets[i - 1]
            if before + self._free_lengths[before] == offset:
                self._free_lengths[before] += length
                return
        self._free_offsets.insert(i, offset)
        self._free_lengths[offset] = length


def owner_tag(owner: str | os.PathLike) -> str:
    """A short file-name-safe tag for an owner (a daemon's home directory)."""
    return hashlib.sha256(os.fsencode(os.fspath(owner))).hexdigest()[:12]


def remove_stale_arenas(tag: str, directory: Path = SHM_DIR) -> list[Path]:
    """Unlink the arenas that owners killed before ``close`` left behind.

    For a caller that is the one owner of ``tag`` now (the daemon, holding its home's
    lock): every arena of ``tag`` is stale, and so is every arena of this user whose
    creator (the pid in its name) is no longer running, whatever its tag (a killed daemon
    whose home is never served again). Returns the paths removed.
    """
    removed = []
    for path in Path(directory).glob(f"{ARENA_PREFIX}*"):
        owner, _, rest = path.name[len(ARENA_PREFIX):].partition("-")
        pid = rest.partition("-")[0]
        try:
            stale = owner == tag or (path.stat().st_uid == os.geteuid() and pid.isdigit()
                                     and not _running(int(pid)))
            if stale:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:
            continue  # its owner closed it meanwhile
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


class ArenaMapping:
    """A reader's map of an arena file another process of this user created.

    The file is opened read-only and mapped private and writable: tensors over it are
    writable by type (``torch.frombuffer`` needs that to avoid a copy), yet a stray write
    stays in this process (copy on write) and never reaches the arena or other readers.
    Pages not written here show the arena's current bytes.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() \
                    or info.st_mode & 0o077:
                raise PermissionError(f"{self.path} is not a private file of this user "
                                      f"(mode {stat.filemode(info.st_mode)}, uid "
                                      f"{info.st_uid}); refusing to map it")
            self.size = info.st_size
            self._map = mmap.mmap(fd, self.size, flags=mmap.MAP_PRIVATE | _MAP_NORESERVE,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._view = memoryview(self._map)

    def bytes_at(self, offset: int, nbytes: int) -> memoryview:
        """``[offset, offset + nbytes)`` of the file (no copy); ValueError when out of it."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise ValueError(f"range ({offset}, {nbytes}) lies outside {self.path} "
                             f"({self.size} bytes)")
        return self._view[offset:offset + nbytes]
