"""The start-up check of the index against the tiers while a tier is down.

Every start (the connector's worker, the daemon) asks the tiers for the chunks of every
durable entry and drops the entries some of whose chunks are gone. A Redis that is down
at that moment answers nothing, and its chunks come back with it: the check must drop
nothing then, rather than every entry whose chunks live in Redis.
"""

from __future__ import annotations

import logging

import numpy as np
from fault_checks import assert_one_line_names

from kvshare.storage.codec import ChunkCodec
from kvshare.storage.commit import lost_entries
from kvshare.storage.index import EntryIndex, IndexEntry, new_entry_id
from kvshare.storage.redis_server import RedisServer
from kvshare.storage.redis_tier import RedisTier
from kvshare.storage.tiered_store import TieredStore


def test_a_tier_down_during_the_start_up_check_drops_nothing(tmp_path, caplog):
    entry = IndexEntry(new_entry_id(), "model", "tenant", np.full(8, 8 ** -0.5),
                       np.arange(16), chunk_keys=["ab" * 16])  # a chunk no tier holds
    with EntryIndex(tmp_path / "index", 8) as index:
        index.add([entry])
    with RedisServer() as redis:
        store = TieredStore([RedisTier(redis.url, ChunkCodec("raw"))])
        try:
            redis.kill()
            assert lost_entries(store, tmp_path / "index") == set()
            assert_one_line_names(caplog.records, "keeping the 1 entries it did not find")
            redis.start()
            assert lost_entries(store, tmp_path / "index") == {entry.entry_id}
            assert_one_line_names(caplog.records, "1 index entries lost their chunks",
                                  logging.WARNING)
        finally:
            store.close()
