"""Shared fixtures: a real redis-server per test and a thread-pooled codec."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvshare.storage.codec import ChunkCodec
from kvshare.storage.redis_server import RedisServer


@pytest.fixture
def codec() -> Iterator[ChunkCodec]:
    # parallel_min_bytes=0 exercises the thread pool even on these small chunks.
    c = ChunkCodec("zstd-byteplane", level=1, threads=2, block_bytes=1024, parallel_min_bytes=0)
    yield c
    c.close()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server on a free port; tests may ``kill()`` and ``start()`` it."""
    with RedisServer() as server:
        yield server
