"""Model identity: a fingerprint of what a model directory holds, not of its path.

Index entries and chunk keys are namespaced by a model id. KV is a function of the
weights and the model config, and token ids mean what the tokenizer says they mean, so
the id is a digest of those files: new weights written to the same path get a new id
(stale KV is never reused), and the same model copied elsewhere keeps its id (its KV
stays reusable).

Hashing every weight file at each start would cost seconds per GB, so each file's digest
is cached in ``<home>/model_digests.json`` under its stat signature (resolved path, size,
mtime_ns, ctime_ns, inode); a file whose signature is unchanged is not read again.

What the signature detects: any write through the file system (it moves mtime and
ctime), a new file renamed over the old one (new inode; downloads and ``save_pretrained``
write this way), a size change, and an in-place edit whose mtime was then forced back
(``os.utime``/``touch -d`` set ctime to now, and ctime cannot be set by user code).
What it cannot detect: a change that leaves every field equal, i.e. a file system or
disk image restored from a snapshot under the same inode, or a write landing within one
timestamp tick of the previous hash (Linux stamps files with a coarse clock, a few ms).
Delete ``model_digests.json`` to force a full rehash.

xxh3_128 detects accidental changes, not crafted collisions: the digest trusts whoever
can write the model directory, as vLLM itself does.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import xxhash

from kvshare.config import default_home

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
"""Weight files (top level of the directory, where vLLM's loaders look for them)."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt")
"""Files that define what token ids mean (those present are hashed)."""
DIGEST_CACHE_NAME = "model_digests.json"
DIGEST_HEX_CHARS = 16
"""Hex characters of the directory digest in a model id (64 bits)."""
READ_BLOCK_BYTES = 16 << 20
"""Bytes read per call while hashing: large blocks keep the hash at disk speed."""


@dataclass(frozen=True)
class FileSignature:
    """What the digest cache compares to decide that a file is unchanged since hashing."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> FileSignature:
        stat = path.stat()
        return cls(stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)


def model_fingerprint(model_dir: Path | str, home: Path | str | None = None) -> str:
    """``<directory name>@<16 hex digits>``: the model id of a local HF-style directory.

    The digest covers config.json, every top-level weight file (``WEIGHT_SUFFIXES``) and
    the tokenizer files present, each with its name relative to the directory; so it
    equals for byte-identical copies anywhere and changes when any of those files does.
    File digests are cached under ``home`` (default: ``kvshare.config.default_home()``).
    """
    directory = Path(model_dir).expanduser()
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"model directory {str(directory)!r} has no config.json; a model id needs a local "
            "HF-style model directory (download hub models first and pass their directory)"
        )
    files = model_files(directory)
    cache = _DigestCache(Path(home) if home is not None else default_home())
    with cache:
        digests = {name: cache.digest(path) for name, path in files.items()}
    combined = xxhash.xxh3_128()
    for name, digest in digests.items():
        combined.update(f"{name}\0{digest}\n".encode())
    return f"{_readable_name(directory)}@{combined.hexdigest()[:DIGEST_HEX_CHARS]}"


def local_model_dir(model: str, revision: str | None = None) -> Path:
    """The local directory of vLLM's ``model`` argument: a path, or a hub id whose files
    vLLM has already downloaded (looked up in the Hugging Face cache, never fetched)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, revision=revision, local_files_only=True))
    except Exception as exc:
        raise FileNotFoundError(
            f"model {model!r} is neither a directory nor a hub id with files in the local "
            "Hugging Face cache; kvshare fingerprints the model's files") from exc


def model_files(directory: Path) -> dict[str, Path]:
    """The files a fingerprint covers, by name relative to ``directory``, sorted by name."""
    names = {"config.json", *TOKENIZER_FILES}
    return {
        path.name: path
        for path in sorted(directory.iterdir())
        if path.is_file() and (path.name in names or path.name.endswith(WEIGHT_SUFFIXES))
    }


def file_digest(path: Path) -> str:
    """xxh3_128 of the file's bytes, read in ``READ_BLOCK_BYTES`` blocks (hex)."""
    hasher = xxhash.xxh3_128()
    buffer = bytearray(READ_BLOCK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while read := f.readinto(buffer):
            hasher.update(view[:read])
    return hasher.hexdigest()


def _readable_name(directory: Path) -> str:
    """The directory's name with characters outside ``[A-Za-z0-9._-]`` replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", directory.resolve().name) or "model"


@dataclass(frozen=True)
class _CachedDigest:
    signature: FileSignature
    digest: str


class _DigestCache:
    """``<home>/model_digests.json``: file digests by resolved path, valid while the
    file's signature is unchanged.

    Used as a context manager that holds an exclusive lock on ``<file>.lock``, so the
    scheduler and worker processes starting together hash each file once (the second
    waits, then finds the digests) and never lose each other's updates. Entries of files
    that no longer exist are dropped whenever the cache is written.
    """

    def __init__(self, home: Path) -> None:
        self.path = home / DIGEST_CACHE_NAME
        self._entries: dict[str, _CachedDigest] = {}
        self._dirty = False
        self._lock_file = None

    def __enter__(self) -> _DigestCache:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.path.with_name(self.path.name + ".lock"), "a")
        fcntl.flock(self._lock_file, fcntl.LOCK_EX)
        self._entries = self._read()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._dirty:
                self._write()
        finally:
            self._lock_file.close()  # releases the lock

    def digest(self, path: Path) -> str:
        key = str(path.resolve())
        before = FileSignature.of(path)
        cached = self._entries.get(key)
        if cached is not None and cached.signature == before:
            return cached.digest
        digest = file_digest(path)
        if FileSignature.of(path) == before:  # not written to while we read it
            self._entries[key] = _CachedDigest(before, digest)
            self._dirty = True
        else:
            logger.warning("%s changed while it was hashed; its digest is not cached", path)
        return digest

    def _read(self) -> dict[str, _CachedDigest]:
        try:
            raw = json.loads(self.path.read_text())
            return {key: _CachedDigest(FileSignature(**value["signature"]), value["digest"])
                    for key, value in raw["files"].items()}
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring unreadable digest cache %s (%s); files are rehashed",
                           self.path, exc)
            return {}

    def _write(self) -> None:
        files = {key: {"signature": asdict(value.signature), "digest": value.digest}
                 for key, value in self._entries.items() if os.path.exists(key)}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"files": files}, indent=1))
        os.replace(tmp, self.path)
