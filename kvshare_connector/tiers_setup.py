"""Build the chunk store that a ``KVShareConfig`` describes.

The only place where config keys meet storage classes: ``kvshare.storage`` takes plain
constructor arguments and never reads the config itself.
"""

from __future__ import annotations

import logging

import torch

from kvshare.config import KVShareConfig
from kvshare.storage.codec import ChunkCodec
from kvshare.storage.disk_tier import DiskTier
from kvshare.storage.memory_tier import MemoryTier, SharedMemoryTier
from kvshare.storage.redis_tier import RedisTier
from kvshare.storage.shm_arena import ShmArena, owner_tag, remove_stale_arenas
from kvshare.storage.tier import Tier
from kvshare.storage.tiered_store import ChunkStore, TieredStore

logger = logging.getLogger(__name__)


def build_store(config: KVShareConfig, *, serving: bool = True,
                shared_memory: bool = False) -> TieredStore:
    """Tiers fastest first: GPU, CPU, disk, Redis; a zero capacity or empty URL skips one.

    Disk and Redis each get the codec of their own ``disk_compression`` /
    ``redis_compression`` (empty: ``compression``): compression pays on slow links and
    for capacity, not on a local disk or a localhost Redis (see the config keys).

    ``serving=False`` builds the view of a process that inspects a home beside the
    process serving it (``kvshare inspect``): no GPU or CPU tier (they live inside the
    serving process; here they would be empty) and a disk tier that never evicts at open
    (a smaller ``disk_bytes`` in this config must not delete the server's chunks).

    ``shared_memory=True`` puts the CPU tier in a shared-memory arena
    (:class:`~kvshare.storage.memory_tier.SharedMemoryTier`) that clients on this host
    read in place; only for the one process that owns the home (the daemon, holding its
    lock), since it removes the arenas an earlier owner of the home left behind. Where
    the arena cannot be made (no room under ``/dev/shm``) the CPU tier is a plain one.
    """
    tiers: list[Tier] = []
    if config.gpu_bytes and serving:
        if torch.cuda.is_available():
            tiers.append(MemoryTier.gpu(config.gpu_bytes))
        else:
            logger.warning("kvshare: gpu_bytes=%d but CUDA is not available; no GPU tier",
                           config.gpu_bytes)
    if config.cpu_bytes and serving:
        tiers.append(_shared_cpu_tier(config) if shared_memory
                     else MemoryTier.cpu(config.cpu_bytes))
    if config.disk_path is not None and config.disk_bytes:
        tiers.append(DiskTier(config.disk_path, config.disk_bytes,
                              _codec(config, config.disk_compression), evict_at_open=serving))
    if config.redis_url:
        tiers.append(RedisTier(config.redis_url, _codec(config, config.redis_compression),
                               ttl_s=config.redis_ttl_s))
    if not tiers and serving:
        logger.warning("kvshare: every storage tier is disabled; nothing will be reused")
    return TieredStore(tiers)


def _shared_cpu_tier(config: KVShareConfig) -> MemoryTier:
    tag = owner_tag(config.home_dir.resolve())
    for path in remove_stale_arenas(tag):
        logger.info("kvshare: removed %s, the shared-memory arena of an earlier daemon", path)
    try:
        return SharedMemoryTier(ShmArena(config.cpu_bytes, tag=tag))
    except (OSError, ValueError) as exc:
        logger.warning("kvshare: no shared-memory CPU tier (%s); clients receive chunks "
                       "through the socket", exc)
        return MemoryTier.cpu(config.cpu_bytes)


def _codec(config: KVShareConfig, compression: str) -> ChunkCodec:
    """A tier's codec: ``compression`` ("" means the config's ``compression``), tuned by
    ``zstd_level`` and ``codec_threads``."""
    return ChunkCodec(compression or config.compression, level=config.zstd_level,
                      threads=config.codec_threads)


def open_store(config: KVShareConfig) -> ChunkStore:
    """The chunk store ``config.mode`` names: tiers in this process, or the daemon's."""
    if config.mode == "remote":
        from kvshare.remote.client import RemoteStore

        return RemoteStore.connect(config)
    return build_store(config)
