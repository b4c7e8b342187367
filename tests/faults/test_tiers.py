"""Tier faults under a serving engine: Redis down, a full or read-only disk, damaged chunk
files, a chunk evicted between lookup and load, a tier slower than its timeout.

The engine's tiers are a disk and a Redis that both hold every chunk. An edit of a
stored prompt at position 60 has no prefix-cache hit, so kvshare claims its first
``BUDGET`` tokens, the whole first chunk, and vLLM computes the rest: with ``rho=1.0``
the fill still loads the chunk but recomputes every claimed token, which is full compute
under the same split, so answers compare exactly whichever tier the chunk came from.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time

import pytest
from engines import BUDGET
from fault_checks import (
    assert_one_line_names,
    edit_of,
    fault_lines,
    full_compute,
    report,
    stored_base,
)

from kvshare.storage import disk_tier

pytestmark = pytest.mark.engine

EDITED_TOKENS = 3
"""An edit replaces this many tokens; the fill recomputes them and a boundary token."""


def answer(out) -> list[int]:
    return list(out.outputs[0].token_ids)


def loaded_from_the_tiers(out) -> bool:
    """The claim's first chunk was loaded (all of it but the edit and its boundary)."""
    stats = report(out)
    return stats["claimed"] == BUDGET and stats["loaded"] >= BUDGET - EDITED_TOKENS - 1


def reuse_edit(engine, base, tenant, text_tokens, at: int = 60):
    """An edit of ``base`` at rho 1, and the answer full compute gives for it."""
    prompt = edit_of(base, at, text_tokens[1000 + at:1000 + at + EDITED_TOKENS])
    return engine.run(prompt, tenant, rho=1.0), full_compute(engine, prompt)


class _FailingCalls:
    """A module's view of another module (``os``, ``tempfile``) whose named functions
    fail with ``code``, as the kernel answers on a full or read-only file system."""

    def __init__(self, module, code: int, names: set[str]) -> None:
        self._module, self._code, self._names = module, code, names

    def __getattr__(self, name: str):
        if name not in self._names:
            return getattr(self._module, name)

        def fail(*args, **kwargs):
            raise OSError(self._code, os.strerror(self._code))

        return fail


def test_redis_stopped_and_restarted_mid_stream(fault_engine, text_tokens, caplog):
    engine, tenant = fault_engine, "redis-outage"
    base = stored_base(engine, text_tokens, tenant, 0)
    engine.redis.kill()
    during, expected = reuse_edit(engine, base, tenant, text_tokens)
    assert loaded_from_the_tiers(during) and answer(during) == expected  # from the disk
    new = text_tokens[400:400 + len(base)]
    engine.run(new, tenant)
    engine.settle()
    assert any(e.token_ids.tolist() == new for e in engine.entries(tenant)), \
        "the prompt stored while Redis was down was not indexed (the disk holds it)"
    assert not engine.tier("redis").stats().healthy
    engine.redis.start()
    after, expected = reuse_edit(engine, new, tenant, text_tokens, at=70)
    assert loaded_from_the_tiers(after) and answer(after) == expected
    engine.settle()
    redis = engine.tier("redis")
    assert redis.stats().healthy
    latest = max(engine.entries(tenant), key=lambda e: e.created_at)
    assert all(redis.contains([bytes.fromhex(k) for k in latest.chunk_keys]))
    assert_one_line_names(caplog.records, "redis tier failing")
    assert len(fault_lines(caplog.records, "redis tier recovered", logging.INFO)) == 1


def test_disk_full(fault_engine, text_tokens, caplog, monkeypatch):
    engine, tenant = fault_engine, "disk-full"
    base = stored_base(engine, text_tokens, tenant, 20)
    monkeypatch.setattr(disk_tier, "os", _FailingCalls(os, errno.ENOSPC, {"write"}))
    stored, expected = reuse_edit(engine, base, tenant, text_tokens)
    assert loaded_from_the_tiers(stored) and answer(stored) == expected
    new = text_tokens[420:420 + len(base)]
    engine.run(new, tenant)
    engine.settle()
    assert any(e.token_ids.tolist() == new for e in engine.entries(tenant)), \
        "the prompt stored while the disk was full was not indexed (Redis holds it)"
    after_new, expected = reuse_edit(engine, new, tenant, text_tokens, at=80)
    assert loaded_from_the_tiers(after_new) and answer(after_new) == expected  # from Redis
    assert not list(engine.chunk_dir.glob("*.tmp")), "a failed write left its temp file"
    monkeypatch.undo()
    assert_disk_recovers(engine, text_tokens[460:460 + len(base)], tenant, caplog)
    assert_one_line_names(caplog.records, os.strerror(errno.ENOSPC))


def assert_disk_recovers(engine, prompt, tenant, caplog) -> None:
    """The disk has room again: the next prompt's chunks are written to it."""
    engine.run(prompt, tenant)
    engine.settle()
    [entry] = [e for e in engine.entries(tenant) if e.token_ids.tolist() == prompt]
    assert all((engine.chunk_dir / f"{key}.kvc").is_file() for key in entry.chunk_keys)
    assert engine.tier("disk").stats().healthy
    assert len(fault_lines(caplog.records, "disk tier recovered", logging.INFO)) == 1


def test_read_only_disk(fault_engine, text_tokens, caplog, monkeypatch):
    engine, tenant = fault_engine, "read-only"
    base = stored_base(engine, text_tokens, tenant, 40)
    read_only = errno.EROFS
    monkeypatch.setattr(disk_tier, "os", _FailingCalls(
        os, read_only, {"write", "rename", "unlink", "utime", "open"}))
    monkeypatch.setattr(disk_tier, "tempfile", _FailingCalls(
        disk_tier.tempfile, read_only, {"mkstemp"}))
    disk_hits = engine.tier("disk").stats().hits
    stored, expected = reuse_edit(engine, base, tenant, text_tokens)
    assert loaded_from_the_tiers(stored) and answer(stored) == expected
    assert engine.tier("disk").stats().hits > disk_hits, "the read-only disk did not serve"
    new = text_tokens[440:440 + len(base)]
    engine.run(new, tenant)
    engine.settle()
    after_new, expected = reuse_edit(engine, new, tenant, text_tokens, at=90)
    assert loaded_from_the_tiers(after_new) and answer(after_new) == expected  # from Redis
    monkeypatch.undo()
    assert_disk_recovers(engine, text_tokens[480:480 + len(base)], tenant, caplog)
    assert_one_line_names(caplog.records, os.strerror(read_only))


@pytest.mark.parametrize("damage", ["truncated", "bit-flipped"])
def test_damaged_chunk_file(fault_engine, text_tokens, caplog, damage):
    engine, tenant = fault_engine, f"damaged-{damage}"
    base = stored_base(engine, text_tokens, tenant, 60 if damage == "truncated" else 80)
    key = engine.entries(tenant)[0].chunk_keys[0]
    path = engine.chunk_dir / f"{key}.kvc"
    sound = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(sound[:len(sound) // 2])
    else:
        path.write_bytes(sound[:len(sound) // 2] + bytes([sound[len(sound) // 2] ^ 0x10])
                         + sound[len(sound) // 2 + 1:])
    corrupt = engine.tier("disk").stats().corrupt
    out, expected = reuse_edit(engine, base, tenant, text_tokens)
    assert loaded_from_the_tiers(out) and answer(out) == expected  # Redis's copy
    assert engine.tier("disk").stats().corrupt == corrupt + 1
    assert path.read_bytes() == sound, "the disk was not healed from Redis's copy"
    assert len(engine.entries(tenant)) >= 1 and engine.entries(tenant)[0].token_ids.tolist() == base
    assert_one_line_names(caplog.records, f"dropping corrupt chunk {path.name}")


def test_chunk_evicted_between_lookup_and_load(fault_engine, text_tokens, caplog,
                                               monkeypatch):
    engine, tenant = fault_engine, "evicted"
    base = stored_base(engine, text_tokens, tenant, 100)
    keys = [bytes.fromhex(k) for k in engine.entries(tenant)[0].chunk_keys]
    catalog, store = engine.scheduler.catalog, engine.store
    planned = catalog.lookup

    def lookup_then_evict(*args, **kwargs):
        result = planned(*args, **kwargs)
        store.delete(keys)  # every tier evicts the entry's chunks once the plan is made
        return result

    monkeypatch.setattr(catalog, "lookup", lookup_then_evict)
    prompt = edit_of(base, 60, text_tokens[1060:1063])
    out = engine.run(prompt, tenant)
    monkeypatch.undo()
    assert report(out)["claimed"] == BUDGET and report(out)["loaded"] == 0
    assert answer(out) == full_compute(engine, prompt)  # the claim was recomputed in full
    engine.settle()
    assert [e.token_ids.tolist() for e in engine.entries(tenant)] == [prompt]
    assert_one_line_names(caplog.records, "chunks are gone", logging.INFO)


def test_a_tier_slower_than_its_timeout(fault_engine, text_tokens, caplog, monkeypatch):
    """The disk stops answering reads (a hung mount): a fill waits for it at most
    ``get_timeout_s``, then reads Redis; the disk is skipped until its read returns."""
    engine, tenant = fault_engine, "slow-disk"
    base = stored_base(engine, text_tokens, tenant, 120)
    store, disk = engine.store, engine.tier("disk")
    answers, read = threading.Event(), disk._get

    def hung_read(keys):
        answers.wait(timeout=60)
        return read(keys)

    monkeypatch.setattr(store, "get_timeout_s", 0.2)
    monkeypatch.setattr(disk, "_get", hung_read)
    for at in (60, 70):  # the second fill skips the stalled disk at once
        out, expected = reuse_edit(engine, base, tenant, text_tokens, at=at)
        assert not answers.is_set()
        assert loaded_from_the_tiers(out) and answer(out) == expected  # from Redis
    answers.set()
    deadline = time.monotonic() + 30
    while store._stalled:  # the stalled read returns; polling it, not synchronising on time
        assert time.monotonic() < deadline, "the disk's late read never returned"
        time.sleep(0.01)
    hits = disk.stats().hits
    out, expected = reuse_edit(engine, base, tenant, text_tokens, at=80)
    assert loaded_from_the_tiers(out) and answer(out) == expected
    assert disk.stats().hits > hits, "the disk was not read again once it answered"
    assert_one_line_names(caplog.records, "disk tier did not answer")
    assert len(fault_lines(caplog.records, "disk tier answers again", logging.INFO)) == 1
