"""CacheAdmin on a real cache: stats per tenant, eviction that keeps shared chunks, a scrub
that finds damaged chunk files and drops what depended on them."""

from __future__ import annotations

import msgspec
import pytest
from real_cache import (
    CHUNK_TOKENS,
    INVOICE,
    SMOLLM2_LAYOUT,
    add_sample_entries,
    open_real_cache,
    reopen_without_memory,
)

from kvshare.admin import CacheAdmin


@pytest.fixture
def cache(tmp_path, wordllama, tokenizer):
    """acme: the invoice and its edit (sharing their leading chunks); globex: the same
    invoice (its own keys); public: the trip."""
    cache = open_real_cache(tmp_path, wordllama)
    yield cache, add_sample_entries(cache, tokenizer)
    cache.close()


def shared_prefix_chunks(entries) -> int:
    acme, edit = entries["acme"][1], entries["acme_edit"][1]
    return sum(a.key == b.key for a, b in zip(acme, edit))


def held(cache, chunks) -> list[bool]:
    return [cache.chunk_file(c).exists() for c in chunks]


def test_stats_count_per_tenant_depth_and_tier(cache):
    cache, entries = cache
    stats = CacheAdmin(cache.catalog, cache.store).stats()
    shared = shared_prefix_chunks(entries)
    assert shared >= 1  # the edit is past the first chunk: they share a prefix
    acme_tokens = entries["acme"][0].num_tokens + entries["acme_edit"][0].num_tokens
    acme_chunks = len(entries["acme"][1]) + len(entries["acme_edit"][1]) - shared
    assert stats["tenants"]["acme"] == {
        "entries": 2, "tokens": acme_tokens, "hits": 0, "chunks": acme_chunks,
        "stored_tokens": acme_tokens - shared * CHUNK_TOKENS,
        "kv_bytes": acme_tokens * SMOLLM2_LAYOUT.bytes_per_token()}
    assert stats["tenant_quota_bytes"] == 0
    assert stats["tenants"][""]["entries"] == stats["tenants"]["globex"]["entries"] == 1
    assert stats["entries"] == 4
    assert stats["by_depth"]["0"]["entries"] == 4
    distinct = acme_chunks + len(entries["globex"][1]) + len(entries["public"][1])
    assert stats["tiers"]["cpu"]["chunks"] == stats["tiers"]["disk"]["chunks"] == distinct
    # Hits recorded by the catalog show per tenant.
    cache.catalog.record_hits([entries["globex"][0].entry_id] * 3)
    assert CacheAdmin(cache.catalog, cache.store).stats()["tenants"]["globex"]["hits"] == 3


def test_every_remote_method_answers_plain_data(cache):
    """What the daemon sends back must survive msgpack unchanged."""
    cache, entries = cache
    admin = CacheAdmin(cache.catalog, cache.store)
    entry = entries["acme"][0]
    answers = [admin.stats(), admin.list_entries(scope="acme", limit=5),
               admin.show(entry.entry_id),
               admin.plan(cache.model_id, INVOICE, entry.token_ids.tolist(), "acme"),
               admin.verify_page(None, 4)]
    for answer in answers:
        assert msgspec.msgpack.decode(msgspec.msgpack.encode(answer)) == answer
    assert {"stats", "list_entries", "show", "plan", "evict", "purge",
            "verify_page"} == CacheAdmin.REMOTE_METHODS
    assert all(callable(getattr(admin, name)) for name in CacheAdmin.REMOTE_METHODS)


def test_evict_keeps_chunks_another_entry_references(cache):
    cache, entries = cache
    admin = CacheAdmin(cache.catalog, cache.store)
    (acme, acme_chunks), (_, edit_chunks) = entries["acme"], entries["acme_edit"]
    shared = shared_prefix_chunks(entries)
    result = admin.evict([acme.entry_id, "no-such-entry"])
    assert result["evicted"] == [acme.entry_id] and result["missing"] == ["no-such-entry"]
    assert result["chunks_shared"] == shared
    assert result["chunks_deleted"] == len(acme_chunks) - shared
    assert result["deleted_by_tier"] == {"cpu": len(acme_chunks) - shared,
                                         "disk": len(acme_chunks) - shared}
    assert held(cache, acme_chunks) == [True] * shared + [False] * (len(acme_chunks) - shared)
    assert all(held(cache, edit_chunks))
    assert cache.store.contains([c.key for c in acme_chunks[shared:]]) == [False] * (
        len(acme_chunks) - shared)
    assert acme.entry_id not in cache.catalog.index
    # The last reference goes: now the shared prefix goes too.
    result = admin.evict([entries["acme_edit"][0].entry_id])
    assert result["chunks_shared"] == 0 and not any(held(cache, edit_chunks))


def test_purge_removes_one_tenant_only(cache):
    cache, entries = cache
    admin = CacheAdmin(cache.catalog, cache.store)
    result = admin.purge("acme")
    assert sorted(result["evicted"]) == sorted(
        entries[name][0].entry_id for name in ("acme", "acme_edit"))
    assert result["chunks_shared"] == 0
    assert result["chunks_deleted"] == len({c.key for name in ("acme", "acme_edit")
                                            for c in entries[name][1]})
    assert not any(held(cache, entries["acme"][1] + entries["acme_edit"][1]))
    assert all(held(cache, entries["globex"][1] + entries["public"][1]))
    assert set(admin.stats()["tenants"]) == {"", "globex"}
    assert admin.purge("nobody")["evicted"] == []


def damage(cache, entries):
    """Flip one bit of an acme chunk both acme entries share; truncate globex's first."""
    flipped = entries["acme"][1][0]
    path = cache.chunk_file(flipped)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    truncated = entries["globex"][1][0]
    path = cache.chunk_file(truncated)
    path.write_bytes(path.read_bytes()[:-100])
    return flipped, truncated


def verify_all(admin, limit):
    pages, cursor = [], None
    while True:
        pages.append(admin.verify_page(cursor, limit))
        cursor = pages[-1]["next_cursor"]
        if cursor is None:
            return pages


def test_verify_drops_damaged_files_and_the_entries_that_lost_a_chunk(cache):
    cache, entries = cache
    flipped, truncated = damage(cache, entries)
    cache = reopen_without_memory(cache)  # no sound copy left in memory
    admin = CacheAdmin(cache.catalog, cache.store)
    disk_chunks = cache.disk().stats().chunks
    pages = verify_all(admin, limit=3)
    assert pages[0]["total"] == disk_chunks
    assert [p["checked"] for p in pages[:-1]] == [3] * (len(pages) - 1)
    # Chunks of removed entries go with them, so later pages may see fewer keys.
    assert 0 < pages[-1]["checked"] <= 3 and sum(p["checked"] for p in pages) <= disk_chunks
    damaged = [d for p in pages for d in p["damaged"]]
    assert {(d["tier"], d["key"]) for d in damaged} == {
        ("disk", flipped.key.hex()), ("disk", truncated.key.hex())}
    reasons = {d["key"]: d["reason"] for d in damaged}
    assert "checksum mismatch" in reasons[flipped.key.hex()]
    assert "its header says" in reasons[truncated.key.hex()]
    removed = sorted(i for p in pages for i in p["removed"])
    assert removed == sorted(entries[name][0].entry_id for name in ("acme", "acme_edit",
                                                                   "globex"))
    assert [e.entry_id for e in cache.catalog.index.entries()] == [
        entries["public"][0].entry_id]
    assert all(held(cache, entries["public"][1]))
    assert not cache.chunk_file(flipped).exists() and not cache.chunk_file(truncated).exists()
    # The removed entries' other chunks went with them; a second scrub finds nothing.
    assert not any(held(cache, entries["globex"][1]))
    again = verify_all(admin, limit=64)
    assert again[0]["damaged"] == [] and again[0]["total"] == len(entries["public"][1])


def test_verify_keeps_entries_a_sound_copy_still_serves(cache):
    cache, entries = cache
    flipped, _ = damage(cache, entries)
    admin = CacheAdmin(cache.catalog, cache.store)  # the CPU tier still holds every chunk
    pages = verify_all(admin, limit=1000)
    assert len(pages) == 1
    distinct = len({c.key for _, chunks in entries.values() for c in chunks})
    assert pages[0]["checked_by_tier"] == {"cpu": distinct, "disk": distinct}
    assert pages[0]["total"] == 2 * distinct
    assert len(pages[0]["damaged"]) == 2 and pages[0]["removed"] == []
    assert cache.store.get([flipped.key])[0] is not None  # from the CPU tier


def test_bad_arguments_are_named(cache):
    cache, _ = cache
    admin = CacheAdmin(cache.catalog, cache.store)
    with pytest.raises(KeyError, match="no entry 'nope'"):
        admin.show("nope")
    with pytest.raises(ValueError, match="cursor='mars:00'"):
        admin.verify_page("mars:00", 4)
    with pytest.raises(ValueError, match="limit=0"):
        admin.verify_page(None, 0)
