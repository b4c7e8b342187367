"""Cache administration: what ``kvshare inspect`` asks of one cache (an index and its tiers).

:class:`CacheAdmin` wraps the :class:`~kvshare.catalog.LocalCatalog` and the
:class:`~kvshare.storage.tiered_store.TieredStore` of one cache, in whichever process owns
them: ``kvshare inspect`` itself for an embedded home, or the ``kvshare daemon``, which
runs the methods named in :attr:`CacheAdmin.REMOTE_METHODS` for its clients. Every method
takes and returns plain data (dict, list, str, int, float, bool, None) so the same answers
travel as msgpack or print as JSON.

Removing an entry removes the chunks that only it referenced. Chunk keys name a whole
prefix within one scope, so entries of one tenant that share a prefix share its chunks:
a chunk is deleted only when no remaining entry references it. An entry being committed
while an eviction runs may lose a shared chunk it was about to reference; its loads then
recompute those tokens (a miss, never a wrong answer).
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

from kvshare.catalog import LocalCatalog
from kvshare.quality_scores import read_scores
from kvshare.storage.index import IndexEntry
from kvshare.storage.keys import ChunkKey, chunk_spans
from kvshare.storage.tiered_store import TieredStore

VERIFY_PAGE_LIMIT_MAX = 4096
"""Most chunks one ``verify_page`` call reads (each may be megabytes)."""


class CacheAdmin:
    """Views and maintenance of one cache; see the module docstring."""

    REMOTE_METHODS: ClassVar[frozenset[str]] = frozenset(
        {"stats", "list_entries", "show", "plan", "evict", "purge", "verify_page"})
    """The methods a daemon runs for remote callers, as ``getattr(admin, name)(**kwargs)``."""

    def __init__(self, catalog: LocalCatalog, store: TieredStore) -> None:
        self.catalog = catalog
        self.store = store

    # ------------------------------------------------------------------ views
    def stats(self) -> dict[str, Any]:
        """Index totals (``EntryIndex.stats``: entries, tokens, caps, partitions, pending
        writes, path), then per tenant, per approximation depth and per tier.

        Per tenant (``""`` is the public scope): ``entries``, ``tokens`` (prompt tokens of
        its entries), ``chunks`` (distinct chunk keys its entries reference), ``stored_tokens``
        (tokens those chunks cover: shared prefixes count once), ``hits`` (reuses of its
        entries), ``kv_bytes`` (what its quota charges: its entries' tokens times their
        model's KV bytes per token, shared prefixes once per entry; 0 until a commit of the
        model has named its rate). ``tenant_quota_bytes`` is the quota (0: none). Per tier:
        :meth:`TierStats.to_dict`. ``quality``: each model's latest shadow-check scores
        and gate states, for the model and per scope, as the connector last wrote them
        under the home (:func:`~kvshare.quality_scores.read_scores`; empty before a check).
        """
        entries = self.catalog.index.entries()
        chunk_tokens = self.catalog.config.chunk_tokens
        tenants: dict[str, dict[str, int]] = {}
        tenant_chunks: dict[str, dict[str, int]] = {}
        by_depth: dict[int, dict[str, int]] = {}
        for entry in entries:
            tenant = tenants.setdefault(entry.scope, {"entries": 0, "tokens": 0, "hits": 0})
            tenant["entries"] += 1
            tenant["tokens"] += entry.num_tokens
            tenant["hits"] += entry.hit_count
            spans = chunk_spans(entry.num_tokens, chunk_tokens)
            covered = tenant_chunks.setdefault(entry.scope, {})
            for key, (start, end) in zip(entry.chunk_keys, spans):
                covered[key] = end - start
            depth = by_depth.setdefault(entry.depth,
                                        {"entries": 0, "tokens": 0, "exact_tokens": 0})
            depth["entries"] += 1
            depth["tokens"] += entry.num_tokens
            depth["exact_tokens"] += entry.exact_prefix
        kv_bytes = self.catalog.quotas.usage()
        for scope, covered in tenant_chunks.items():
            tenants[scope]["chunks"] = len(covered)
            tenants[scope]["stored_tokens"] = sum(covered.values())
            tenants[scope]["kv_bytes"] = kv_bytes.get(scope, 0)
        return {
            **self.catalog.index.stats(),
            "tenant_quota_bytes": self.catalog.quotas.quota_bytes,
            "tenants": {scope: tenants[scope] for scope in sorted(tenants)},
            "by_depth": {str(depth): row for depth, row in sorted(by_depth.items())},
            "tiers": {name: stats.to_dict() for name, stats in self.store.stats().items()},
            "quality": read_scores(self.catalog.config.home_dir),
        }

    def list_entries(self, scope: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        """The ``limit`` most recently used entries (of ``scope`` if given), newest first."""
        if limit < 0:
            raise ValueError(f"limit={limit}; expected >= 0")
        entries = [e for e in self.catalog.index.entries() if scope is None or e.scope == scope]
        entries.sort(key=lambda e: -e.last_used_at)
        return [_summary(e) for e in entries[:limit]]

    def show(self, entry_id: str) -> dict[str, Any]:
        """One entry in full: its summary, chunk keys and token ids."""
        found = self.catalog.index.get([entry_id])
        if not found:
            raise KeyError(f"no entry {entry_id!r} in the index at {self.catalog.index.path}")
        entry = found[0]
        return {**_summary(entry), "chunk_keys": list(entry.chunk_keys),
                "token_ids": entry.token_ids.tolist()}

    def plan(self, model_id: str, text: str, token_ids: list[int],
             tenant: str = "") -> dict[str, Any]:
        """What the prompt would reuse now, and what the connector would claim for it with
        no vLLM prefix-cache hit (the claim rule with this cache's config)."""
        from kvshare.matching.claim import decide_claim

        config = self.catalog.config
        result = self.catalog.lookup(model_id, text, token_ids, tenant)
        plan = result.plan
        claim = decide_claim(plan, 0, config, result.entries)
        return {
            "model_id": model_id,
            "num_tokens": plan.num_tokens,
            "planned_reuse_tokens": plan.reused_tokens,
            "planned_reuse_fraction": plan.reuse_fraction,
            "planned_recompute_tokens": plan.recompute_tokens,
            "runs": [dict(vars(run)) for run in plan.runs],
            "candidates": [{"entry_id": h.entry.entry_id, "distance": h.distance,
                            "depth": h.entry.depth} for h in result.hits],
            "claim_start": claim.start,
            "claim_end": claim.end,
            "claim_tokens": claim.num_claimed,
            "claim_planned_reuse": claim.planned_reuse,
            "claim_expected_reused": claim.expected_reused(config.rho),
            "rho": config.rho,
            "min_reuse_fraction": config.min_reuse_fraction,
            "min_reuse_tokens": config.min_reuse_tokens,
            "recompute_tail_tokens": config.recompute_tail_tokens,
            "lookup_ms": result.total_ms,
        }

    # ------------------------------------------------------------------ removal
    def evict(self, entry_ids: list[str]) -> dict[str, Any]:
        """Drop entries from the index and delete the chunks no remaining entry references.

        Returns ``evicted`` (ids dropped), ``missing`` (ids not in the index),
        ``chunks_deleted`` (distinct keys deleted), ``chunks_shared`` (keys kept because a
        remaining entry references them) and ``deleted_by_tier`` (chunks each tier held).
        """
        victims = self.catalog.index.get(dict.fromkeys(entry_ids))
        found = {e.entry_id for e in victims}
        removal = self._remove(victims)
        return {"evicted": [e.entry_id for e in victims],
                "missing": [i for i in dict.fromkeys(entry_ids) if i not in found],
                **removal}

    def purge(self, tenant: str) -> dict[str, Any]:
        """Evict every entry of ``tenant`` (``""``: the public scope); see :meth:`evict`."""
        victims = [e for e in self.catalog.index.entries() if e.scope == tenant]
        return {"tenant": tenant, "evicted": [e.entry_id for e in victims],
                **self._remove(victims)}

    def _remove(self, victims: Sequence[IndexEntry]) -> dict[str, Any]:
        victim_ids = {e.entry_id for e in victims}
        referenced = Counter(key for e in self.catalog.index.entries()
                             if e.entry_id not in victim_ids for key in e.chunk_keys)
        keys = list(dict.fromkeys(key for e in victims for key in e.chunk_keys))
        unshared = [key for key in keys if not referenced[key]]
        self.catalog.drop(list(victim_ids))
        deleted_by_tier = self._delete_chunks([bytes.fromhex(key) for key in unshared])
        return {"chunks_deleted": len(unshared), "chunks_shared": len(keys) - len(unshared),
                "deleted_by_tier": deleted_by_tier}

    def _delete_chunks(self, keys: list[ChunkKey]) -> dict[str, int]:
        return {tier.name: tier.delete(keys) for tier in self.store.tiers}

    # ------------------------------------------------------------------ scrub
    def verify_page(self, cursor: str | None = None, limit: int = 64) -> dict[str, Any]:
        """Read and verify the next ``limit`` chunks, tier after tier, keys in order.

        Damaged chunks are dropped from their tier (``damaged``: tier, key, reason).
        Entries referencing a damaged chunk that no tier still holds are evicted like
        :meth:`evict` does (``removed``: their ids). ``cursor`` is ``None`` for the first
        page, then the previous page's ``next_cursor``, which is ``None`` after the last
        page. ``total`` counts the chunks every tier held when this page began (each page
        lists every tier's keys: a few ms per 100k keys on disk, one SCAN in Redis);
        ``checked_by_tier`` counts this page's reads per tier.
        """
        if not 1 <= limit <= VERIFY_PAGE_LIMIT_MAX:
            raise ValueError(f"limit={limit}; expected 1..{VERIFY_PAGE_LIMIT_MAX}")
        tiers = self.store.tiers
        start_tier, after = _parse_cursor(cursor, [t.name for t in tiers])
        keys_by_tier = [sorted(tier.keys()) for tier in tiers]
        page: list[tuple[int, list[ChunkKey]]] = []
        left_after_page = 0
        for position in range(start_tier, len(tiers)):
            keys = keys_by_tier[position]
            if position == start_tier and after is not None:
                keys = keys[bisect.bisect_right(keys, after):]
            taken = keys[:limit - sum(len(k) for _, k in page)]
            if taken:
                page.append((position, taken))
            left_after_page += len(keys) - len(taken)
        next_cursor = None
        if left_after_page:
            position, keys = page[-1]
            next_cursor = f"{tiers[position].name}:{keys[-1].hex()}"
        damaged = []
        checked_by_tier: dict[str, int] = {}
        for position, keys in page:
            tier = tiers[position]
            checks = tier.check(keys)
            checked_by_tier[tier.name] = len(keys)
            damaged += [{"tier": tier.name, "key": c.key.hex(), "reason": c.damage}
                        for c in checks if c.damage]
        removed: list[str] = []
        if damaged:
            removed = self._drop_entries_of_lost_chunks({d["key"] for d in damaged})
        return {"checked": sum(checked_by_tier.values()), "checked_by_tier": checked_by_tier,
                "damaged": damaged, "removed": removed, "next_cursor": next_cursor,
                "total": sum(len(keys) for keys in keys_by_tier)}

    def _drop_entries_of_lost_chunks(self, hex_keys: Iterable[str]) -> list[str]:
        """Evict the entries that reference a key no tier still holds; returns their ids."""
        hex_keys = list(hex_keys)
        held = self.store.contains([bytes.fromhex(key) for key in hex_keys])
        lost = {key for key, ok in zip(hex_keys, held) if not ok}
        victims = [e for e in self.catalog.index.entries() if lost.intersection(e.chunk_keys)]
        self._remove(victims)
        return [e.entry_id for e in victims]


def _parse_cursor(cursor: str | None, tier_names: list[str]) -> tuple[int, ChunkKey | None]:
    """``None`` -> (first tier, from its first key); ``"TIER:HEX"`` -> after that key."""
    if cursor is None:
        return 0, None
    name, _, key_hex = cursor.partition(":")
    try:
        return tier_names.index(name), bytes.fromhex(key_hex)
    except ValueError:
        raise ValueError(f"cursor={cursor!r}; expected None or 'TIER:KEYHEX' with TIER one "
                         f"of {tier_names} (the next_cursor of an earlier page)") from None


def _summary(entry: IndexEntry) -> dict[str, Any]:
    return {
        "entry_id": entry.entry_id,
        "model_id": entry.model_id,
        "scope": entry.scope,
        "num_tokens": entry.num_tokens,
        "depth": entry.depth,
        "exact_tokens": entry.exact_prefix,
        "hit_count": entry.hit_count,
        "created_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.created_at)),
        "last_used_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.last_used_at)),
        "chunks": len(entry.chunk_keys),
        "text_preview": entry.text_preview,
    }
