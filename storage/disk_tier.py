"""Local-disk tier: one file per chunk, atomic writes, byte-capped LRU, rebuilt on restart.

Files are ``<root>/<key hex>.kvc`` holding the encoded chunk (header, checksum, payload).
A write goes to a ``.tmp`` file, is fsynced and renamed over the final name, and the
directory is fsynced once per batch, so a crash leaves either the whole chunk or no
chunk, never a torn one; stray ``.tmp`` files are removed at start-up once they are older
than ``STALE_TEMP_S`` (younger ones may be another process's write in flight: ``kvshare
inspect`` opens the tier beside a serving vLLM). A full disk
(ENOSPC) fails only the chunk being written: nothing is ever overwritten in place.

Recency survives restarts: every write and hit stamps the file's mtime with a strictly
increasing clock, and the start-up scan orders files by it. The scan reads only
directory entries (no file contents); a truncated or damaged file is found by its
checksum on first read and deleted then.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

from kvshare.storage.chunk import KVChunk
from kvshare.storage.codec import ChunkCodec, ChunkCorruptError
from kvshare.storage.keys import KEY_BYTES, ChunkKey
from kvshare.storage.tier import ChunkCheck, Tier

logger = logging.getLogger(__name__)

SUFFIX = ".kvc"
_TMP_SUFFIX = ".tmp"
STALE_TEMP_S = 600
"""A temp file lives for one write (milliseconds); one this old was left by a crash."""


class DiskTier(Tier):
    """Chunks as files under ``root``; ``bytes_used`` (file bytes) <= ``capacity_bytes``.

    Args:
        root: directory of the chunk files, created if missing; one tier per directory.
        capacity_bytes: cap on the files' total size; least recently used files go first.
        codec: encodes the files (``build_store``: the config's ``disk_compression``).
        evict_at_open: evict down to the cap right after the start-up scan. False leaves
            the files of a larger cap in place until a put needs room (then the cap holds
            again): for a process that only reads and deletes beside the directory's owner
            (``kvshare inspect``), whose config must not shrink the owner's tier.
    """

    failures = (OSError,)

    def __init__(self, root: str | os.PathLike[str], capacity_bytes: int, codec: ChunkCodec,
                 name: str = "disk", *, evict_at_open: bool = True) -> None:
        super().__init__(name, capacity_bytes)
        self.root = Path(root)
        self.capacity_bytes = capacity_bytes
        self.codec = codec
        self._sizes: OrderedDict[ChunkKey, int] = OrderedDict()  # LRU first
        self._reserved = 0  # bytes of writes in flight, counted against the cap
        self._clock_ns = 0
        self._evict_at_open = evict_at_open
        self._writes_failing = False
        """The latest write failed (full or read-only disk): reads that succeed meanwhile
        do not make the tier healthy, so a tier that keeps failing its writes logs one
        failure, not one per write that follows a read."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._scan()

    # -- start-up -----------------------------------------------------------------------
    def _scan(self) -> None:
        """Rebuild the LRU index from file names, sizes and mtimes; drop stale temp files."""
        found: list[tuple[int, ChunkKey, int]] = []
        stale_before_ns = time.time_ns() - STALE_TEMP_S * 10**9
        with os.scandir(self.root) as entries:
            for entry in entries:
                if entry.name.endswith(_TMP_SUFFIX):
                    if entry.stat().st_mtime_ns < stale_before_ns:
                        _unlink(Path(entry.path))
                    continue
                key = _key_of(entry.name)
                if key is not None and entry.is_file():
                    stat = entry.stat()
                    found.append((stat.st_mtime_ns, key, stat.st_size))
        found.sort()
        with self._lock:
            for mtime_ns, key, size in found:
                self._sizes[key] = size
                self._stats.bytes_used += size
                self._clock_ns = max(self._clock_ns, mtime_ns)
            self._stats.chunks = len(self._sizes)
            if self._evict_at_open:
                self._evict_to_fit(0)  # the cap may have shrunk since the last run
        if found:
            logger.info("kvshare %s tier: %d chunks, %d bytes in %s", self.name,
                        len(found), self._stats.bytes_used, self.root)

    # -- verbs ------------------------------------------------------------------------------
    def _put(self, chunks: Sequence[KVChunk]) -> list[bool]:
        ok: list[bool] = []
        wrote = False
        for chunk in chunks:
            if self._touch_if_held(chunk.key):
                ok.append(True)
                continue
            parts = self.codec.encode_parts(chunk)
            size = sum(len(part) for part in parts)
            if not self._reserve(size):
                ok.append(False)
                continue
            path = self._path(chunk.key)
            try:
                _write_atomic(path, parts, self.root)
            except OSError as exc:  # ENOSPC, EIO...: this chunk only; earlier ones are intact
                with self._lock:
                    self._reserved -= size
                self._writes_failing = True
                self._record_failure("put", exc)
                ok.append(False)
                continue
            self._writes_failing = False
            _set_mtime(path, self._tick())
            with self._lock:
                self._reserved -= size
                if chunk.key not in self._sizes:  # a concurrent writer of the same key may have won
                    self._sizes[chunk.key] = size
                    self._stats.bytes_used += size
                    self._stats.chunks += 1
            wrote = True
            ok.append(True)
        if wrote:
            try:
                _fsync_dir(self.root)  # makes this batch's renames durable
            except OSError as exc:  # the chunks are readable now; only crash-durability is in doubt
                self._record_failure("put", exc)
        return ok

    def _record_success(self) -> None:
        if not self._writes_failing:
            super()._record_success()

    def _get(self, keys: Sequence[ChunkKey]) -> list[KVChunk | None]:
        return [self._get_one(key) for key in keys]

    def _get_one(self, key: ChunkKey) -> KVChunk | None:
        if not self._touch_if_held(key):
            return None
        chunk, _ = self._read_verified(key)
        if chunk is not None:
            _set_mtime(self._path(key), self._tick())
        return chunk

    def _read_verified(self, key: ChunkKey) -> tuple[KVChunk | None, str]:
        """The key's chunk and ""; or None and why its file was damaged (the file is
        dropped); or None and "" when the file is gone or unreadable."""
        path = self._path(key)
        try:
            with open(path, "rb", buffering=0) as f:
                data = f.read()
        except FileNotFoundError:  # deleted behind our back
            self._forget(key)
            return None, ""
        except OSError as exc:
            self._record_failure("get", exc)
            return None, ""
        try:
            chunk = self.codec.decode(data)
            if chunk.key != key:
                raise ChunkCorruptError(f"file holds chunk {chunk.key.hex()}")
        except ChunkCorruptError as exc:
            logger.warning("kvshare %s tier: dropping corrupt chunk %s: %s",
                           self.name, path.name, exc)
            with self._lock:
                self._stats.corrupt += 1
                self._drop(key)
            return None, str(exc)
        return chunk, ""

    def _keys(self) -> Iterator[ChunkKey]:
        with self._lock:
            held = list(self._sizes)
        return iter(held)

    def _check(self, keys: Sequence[ChunkKey]) -> list[ChunkCheck]:
        checks = []
        for key in keys:
            with self._lock:
                held = key in self._sizes
            chunk, damage = self._read_verified(key) if held else (None, "")
            checks.append(ChunkCheck(key, held=chunk is not None or bool(damage), damage=damage))
        return checks

    def _contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with self._lock:
            return [key in self._sizes for key in keys]

    def _delete(self, keys: Sequence[ChunkKey]) -> int:
        with self._lock:
            return sum(self._drop(key) for key in keys)

    # -- bookkeeping (callers of _drop / _evict_to_fit hold the lock) --------------------------
    def _path(self, key: ChunkKey) -> Path:
        return self.root / f"{key.hex()}{SUFFIX}"

    def _touch_if_held(self, key: ChunkKey) -> bool:
        with self._lock:
            if key not in self._sizes:
                return False
            self._sizes.move_to_end(key)
            return True

    def _reserve(self, nbytes: int) -> bool:
        """Evict until ``nbytes`` fit beside held and in-flight bytes; False if they cannot."""
        with self._lock:
            if not self._evict_to_fit(nbytes):
                return False
            self._reserved += nbytes
            return True

    def _evict_to_fit(self, nbytes: int) -> bool:
        while self._stats.bytes_used + self._reserved + nbytes > self.capacity_bytes:
            if not self._sizes:
                return False
            self._drop(next(iter(self._sizes)))
            self._stats.evictions += 1
        return True

    def _drop(self, key: ChunkKey) -> bool:
        # Unlink under the lock: a concurrent re-put of this key must not lose its new file.
        size = self._sizes.pop(key, None)
        if size is None:
            return False
        _unlink(self._path(key))
        self._stats.bytes_used -= size
        self._stats.chunks -= 1
        return True

    def _forget(self, key: ChunkKey) -> None:
        with self._lock:
            self._drop(key)

    def _tick(self) -> int:
        """Strictly increasing ns stamp (file-time granularity can tie successive writes)."""
        with self._lock:
            self._clock_ns = max(time.time_ns(), self._clock_ns + 1)
            return self._clock_ns


def _key_of(name: str) -> ChunkKey | None:
    stem = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else ""
    if len(stem) != 2 * KEY_BYTES:
        return None
    try:
        return bytes.fromhex(stem)
    except ValueError:
        return None


def _write_atomic(path: Path, parts: list[bytes | memoryview], directory: Path) -> None:
    """temp file + write + fsync + rename; the temp file is removed on any failure.

    The pieces are written one after another rather than joined: no copy of the chunk.
    """
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.stem}.", suffix=_TMP_SUFFIX)
    try:
        try:
            for part in parts:
                view = memoryview(part).cast("B")
                while view:
                    view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        _unlink(Path(tmp))
        raise


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _set_mtime(path: Path, stamp_ns: int) -> None:
    """Best effort: recency only orders evictions after a restart. A file deleted
    meanwhile needs none, and a disk that refuses the stamp (remounted read-only) must
    still serve the chunk just read or written."""
    try:
        os.utime(path, ns=(stamp_ns, stamp_ns))
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.debug("kvshare: no recency stamp on %s: %s", path, exc)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
