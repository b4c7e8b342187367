"""Who may reuse whose entries (``TenancyPolicy``), and how much KV each tenant may keep
(``TenantQuotas``).

A tenant is vLLM's ``cache_salt`` (unsalted requests belong to ``default_tenant``); an
entry belongs to the tenant whose prompt made it (``IndexEntry.scope``; ``""`` is the
public scope). Reusing another tenant's entry is a disclosure: a hit answers faster than
a miss, so time to first token tells the requester that someone sent a similar prompt.
The policies bound what a tenant can learn that way; docs/security.md states the threat
model and what each policy discloses.

Both classes keep a small JSON file under the index directory (written atomically, read
at start) and are thread-safe: lookups, index writes and flushes call them from different
threads.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvshare.config import KVShareConfig
from kvshare.matching.align import plan_reuse
from kvshare.matching.plan import Candidate
from kvshare.storage.index import IndexEntry

logger = logging.getLogger(__name__)

PUBLIC_SCOPE = ""
"""The scope of entries every tenant may reuse when ``share_public_scope`` is on."""
TENANCIES = ("isolated", "groups", "popular")
POPULARITY_FILE = "popularity.json"
KV_RATES_FILE = "kv_bytes_per_token.json"
STATE_FORMAT = 1


def aligns(token_ids: Sequence[int], entry: IndexEntry, *, min_run_tokens: int,
           min_reuse: float) -> bool:
    """Whether a prompt *aligns to* an entry: the entry alone, planned by the same
    ``plan_reuse`` a lookup uses, would fill at least ``min_reuse`` of the prompt's tokens
    (``ReusePlan.reuse_fraction``: reused tokens / prompt tokens)."""
    plan = plan_reuse(token_ids, [Candidate(entry.entry_id, entry.token_ids)],
                      min_run_tokens=min_run_tokens)
    return plan.reuse_fraction >= min_reuse


class Popularity:
    """Which tenants aligned to which entries of other tenants, kept across restarts.

    State: entry id -> hashes of the tenants other than its owner whose lookups aligned to
    it (a tenant's name never reaches the file). An entry is *popular* once those tenants
    plus its owner number ``min_tenants``: the owner counts as one because its own prompt
    is the entry. A tenant counts once per entry however often it repeats a prompt.

    Bounded: an entry gains no tenants once popular (at most ``min_tenants - 1`` hashes
    each), and ``forget``/``retain`` drop entries the index no longer holds, so the state
    covers at most the index's entries.
    """

    def __init__(self, min_tenants: int, min_reuse: float, state_dir: str | Path) -> None:
        if min_tenants < 2:
            raise ValueError(f"min_tenants={min_tenants} is invalid: expected >= 2 (one "
                             "tenant alone must never unlock an entry)")
        if not 0.0 < min_reuse <= 1.0:
            raise ValueError(f"min_reuse={min_reuse} is invalid: expected a share in (0, 1]")
        self.min_tenants = min_tenants
        self.min_reuse = min_reuse
        self.path = Path(state_dir) / POPULARITY_FILE
        self._lock = threading.Lock()
        self._aligned: dict[str, set[str]] = {
            entry_id: set(hashes) for entry_id, hashes in
            _read_state(self.path, "aligned").items()}
        self._dirty = False

    def is_popular(self, entry_id: str) -> bool:
        with self._lock:
            return len(self._aligned.get(entry_id, ())) + 1 >= self.min_tenants

    def awaits(self, entry: IndexEntry, tenant: str) -> bool:
        """Whether an alignment of ``tenant`` to ``entry`` would still count: the entry is
        not popular yet and the tenant is neither its owner nor already counted."""
        if tenant == entry.scope:
            return False
        with self._lock:
            tenants = self._aligned.get(entry.entry_id, set())
            return len(tenants) + 1 < self.min_tenants and _tenant_hash(tenant) not in tenants

    def observe(self, entry: IndexEntry, tenant: str) -> None:
        """Count that a lookup of ``tenant`` aligned to ``entry`` (see ``aligns``)."""
        if tenant == entry.scope:
            return  # the owner is counted already
        with self._lock:
            tenants = self._aligned.setdefault(entry.entry_id, set())
            if len(tenants) + 1 < self.min_tenants:
                before = len(tenants)
                tenants.add(_tenant_hash(tenant))
                self._dirty |= len(tenants) != before

    def forget(self, entry_ids: Iterable[str]) -> None:
        """Drop the state of entries removed from the index."""
        with self._lock:
            for entry_id in entry_ids:
                self._dirty |= self._aligned.pop(entry_id, None) is not None

    def retain(self, entry_ids: Iterable[str]) -> None:
        """Keep only the state of these entries (the index's, at start: entries deleted
        after the last ``save`` may still be in the file)."""
        keep = set(entry_ids)
        with self._lock:
            gone = [entry_id for entry_id in self._aligned if entry_id not in keep]
            for entry_id in gone:
                del self._aligned[entry_id]
            self._dirty |= bool(gone)

    def save(self) -> None:
        """Write the state if it changed since the last save (atomically)."""
        with self._lock:
            if not self._dirty:
                return
            aligned = {entry_id: sorted(tenants) for entry_id, tenants in self._aligned.items()}
            self._dirty = False
        try:
            _write_state(self.path, "aligned", aligned)
        except BaseException:
            with self._lock:
                self._dirty = True
            raise


class TenancyPolicy:
    """Decides which entries a tenant's lookup may reuse.

    - ``isolated``: its own scope, plus the public scope if ``share_public_scope``;
    - ``groups``: also the scope of every tenant that shares a group of ``groups`` with it;
    - ``popular``: also every entry that ``Popularity.min_tenants`` distinct tenants
      aligned to (``popularity``). Lookups then search every scope, and align the entries
      they may not reuse one by one, only to count them (``Popularity.observe``).

    Invariant: ``visible(entry, tenant)`` holds for every entry of ``scopes(tenant)``, and
    for another scope's entry only when that entry is popular.
    """

    def __init__(self, tenancy: str = "isolated", *, share_public_scope: bool = True,
                 groups: Mapping[str, Sequence[str]] | None = None,
                 popularity: Popularity | None = None) -> None:
        if tenancy not in TENANCIES:
            raise ValueError(f"tenancy={tenancy!r} is invalid: expected one of "
                             + ", ".join(TENANCIES))
        if (tenancy == "popular") != (popularity is not None):
            raise ValueError("a Popularity is required with tenancy='popular' and only then, "
                             f"got tenancy={tenancy!r} and popularity={popularity!r}")
        self.tenancy = tenancy
        self.share_public_scope = share_public_scope
        self.popularity = popularity
        self._mates: dict[str, set[str]] = {}
        """Tenant -> the other tenants of its groups (``groups`` only)."""
        if tenancy == "groups":
            for members in (groups or {}).values():
                for member in members:
                    self._mates.setdefault(member, set()).update(members)
            for member, mates in self._mates.items():
                mates.discard(member)

    @classmethod
    def from_config(cls, config: KVShareConfig, state_dir: str | Path | None = None
                    ) -> TenancyPolicy:
        """The configured policy; ``popular`` keeps its state in ``state_dir`` (default:
        the index directory)."""
        popularity = None
        if config.tenancy == "popular":
            popularity = Popularity(config.popular_min_tenants, config.popular_min_reuse,
                                    config.index_dir if state_dir is None else state_dir)
        return cls(config.tenancy, share_public_scope=config.share_public_scope,
                   groups=config.tenant_groups, popularity=popularity)

    @property
    def searches_every_scope(self) -> bool:
        """Lookups also search scopes they may not reuse (to count popularity)."""
        return self.popularity is not None

    def scopes(self, tenant: str) -> list[str]:
        """Scopes all of whose entries ``tenant`` may reuse: its own first."""
        scopes = [tenant]
        if self.share_public_scope and tenant != PUBLIC_SCOPE:
            scopes.append(PUBLIC_SCOPE)
        scopes.extend(sorted(self._mates.get(tenant, set()) - set(scopes)))
        return scopes

    def visible(self, entry: IndexEntry, tenant: str) -> bool:
        """Whether ``tenant``'s lookups may reuse ``entry``."""
        if entry.scope in self.scopes(tenant):
            return True
        return self.popularity is not None and self.popularity.is_popular(entry.entry_id)

    def observe_lookup(self, tenant: str, token_ids: Sequence[int],
                       entries: Iterable[IndexEntry], *, min_run_tokens: int) -> None:
        """Count ``tenant`` for each of ``entries`` (found by its lookup, not visible to
        it) that its prompt aligns to. Entries that can no longer gain this tenant are
        not aligned at all."""
        if self.popularity is None:
            return
        for entry in entries:
            if self.popularity.awaits(entry, tenant) and aligns(
                    token_ids, entry, min_run_tokens=min_run_tokens,
                    min_reuse=self.popularity.min_reuse):
                self.popularity.observe(entry, tenant)

    def forget(self, entry_ids: Iterable[str]) -> None:
        """Entries left the index: drop their state."""
        if self.popularity is not None:
            self.popularity.forget(entry_ids)

    def retain(self, entry_ids: Iterable[str]) -> None:
        """At start: keep state only for these entries (those the index holds)."""
        if self.popularity is not None:
            self.popularity.retain(entry_ids)

    def save(self) -> None:
        """Persist the state that changed (call when the index is flushed)."""
        if self.popularity is not None:
            self.popularity.save()


@dataclass
class _TenantEntries:
    """One tenant's entries, their tokens per model, and an LRU heap over them."""

    entries: dict[str, IndexEntry] = field(default_factory=dict)
    tokens_by_model: Counter[str] = field(default_factory=Counter)
    lru: list[tuple[float, str]] = field(default_factory=list)
    """(last_used_at when pushed, entry id). Each entry has an item; an item whose entry
    was removed, or whose stamp is older than the entry's ``last_used_at`` (a hit since),
    is stale and is skipped or pushed again when popped."""


class TenantQuotas:
    """Per-tenant byte quotas over index entries, least recently used first.

    An entry holds ``num_tokens * kv_bytes_per_token`` bytes of KV, at its model's rate
    (the caller passes the rate with each commit; rates are kept per model in
    ``kv_bytes_per_token.json`` under ``state_dir`` so that ``rebuild`` after a restart
    knows them). Chunks two entries of one tenant share count for each. Entries of a model
    whose rate is not known yet count 0 bytes until a commit of that model names it.

    A tenant's eviction only ever takes that tenant's own entries, so one tenant cannot
    push out another's. ``quota_bytes`` 0 is unlimited (usage is still tracked). Costs
    O(log n) per admitted or evicted entry; nothing scans all entries but ``rebuild``.

    The caller keeps this in step with the index: ``rebuild`` at start, ``admit`` after
    each add, ``forget`` after each delete (of entries removed for any reason), and
    deletes from the index every entry ``admit`` or ``rebuild`` returns.
    """

    def __init__(self, quota_bytes: int, state_dir: str | Path) -> None:
        if quota_bytes < 0:
            raise ValueError(f"quota_bytes={quota_bytes} is invalid: expected >= 0 "
                             "(0: unlimited)")
        self.quota_bytes = quota_bytes
        self.rates_path = Path(state_dir) / KV_RATES_FILE
        self._lock = threading.Lock()
        self._rates: dict[str, int] = {
            model_id: int(rate) for model_id, rate in
            _read_state(self.rates_path, "kv_bytes_per_token").items()}
        self._tenants: dict[str, _TenantEntries] = {}
        self._tenant_of: dict[str, str] = {}
        """Entry id -> its tenant, for ``forget``."""

    @classmethod
    def from_config(cls, config: KVShareConfig, state_dir: str | Path | None = None
                    ) -> TenantQuotas:
        return cls(config.tenant_quota_bytes,
                   config.index_dir if state_dir is None else state_dir)

    def rebuild(self, entries: Iterable[IndexEntry]) -> list[IndexEntry]:
        """Track exactly ``entries`` (the index's, at start); returns the least recently
        used entries of each tenant over its quota (a quota lowered since), to delete."""
        with self._lock:
            self._tenants.clear()
            self._tenant_of.clear()
            for entry in entries:
                self._track(entry)
            return [victim for tenant in list(self._tenants)
                    for victim in self._evict_over_quota(tenant, admitted=frozenset())]

    def admit(self, entries: Sequence[IndexEntry], kv_bytes_per_token: int
              ) -> list[IndexEntry]:
        """Track entries just added to the index (of models whose KV costs
        ``kv_bytes_per_token`` bytes a token); returns the entries to delete so that each
        of their tenants is back within its quota, and stops tracking those.

        Victims are the tenant's least recently used entries (``last_used_at``) among those
        it held before this call. An entry of this call is returned only (a) when it alone
        exceeds the quota: it is refused, whatever else the tenant holds, or (b) when this
        call's entries of one tenant together exceed the quota after all its older entries
        are gone: then the least recently used of them go first. Re-admitting an id
        replaces its tracking.
        """
        if kv_bytes_per_token < 1:
            raise ValueError(f"kv_bytes_per_token={kv_bytes_per_token} is invalid: "
                             "expected the model's KV bytes per token (>= 1)")
        with self._lock:
            self._learn_rates({entry.model_id for entry in entries}, kv_bytes_per_token)
            for entry in entries:
                self._untrack(entry.entry_id)
                self._track(entry)
            admitted = frozenset(entry.entry_id for entry in entries)
            tenants = dict.fromkeys(entry.scope for entry in entries)
            return [victim for tenant in tenants
                    for victim in self._evict_over_quota(tenant, admitted)]

    def forget(self, entry_ids: Iterable[str]) -> None:
        """Stop tracking entries removed from the index (unknown ids are skipped)."""
        with self._lock:
            tenants = dict.fromkeys(self._untrack(entry_id) for entry_id in entry_ids)
            for tenant in tenants:
                if tenant is not None:
                    self._shrink_lru(tenant)

    def usage(self) -> dict[str, int]:
        """Tenant -> KV bytes its entries hold, for every tenant holding entries."""
        with self._lock:
            return {tenant: self._usage(state) for tenant, state in self._tenants.items()}

    # ---------------------------------------------------------------- (lock held)
    def _learn_rates(self, model_ids: set[str], kv_bytes_per_token: int) -> None:
        changed = {m for m in model_ids if self._rates.get(m) != kv_bytes_per_token}
        if not changed:
            return
        for model_id in changed:
            if model_id in self._rates:
                logger.warning("model %s: KV bytes per token changed from %d to %d",
                               model_id, self._rates[model_id], kv_bytes_per_token)
            self._rates[model_id] = kv_bytes_per_token
        _write_state(self.rates_path, "kv_bytes_per_token", dict(self._rates))

    def _usage(self, state: _TenantEntries) -> int:
        return sum(tokens * self._rates.get(model_id, 0)
                   for model_id, tokens in state.tokens_by_model.items())

    def _bytes(self, entry: IndexEntry) -> int:
        return entry.num_tokens * self._rates.get(entry.model_id, 0)

    def _track(self, entry: IndexEntry) -> None:
        state = self._tenants.setdefault(entry.scope, _TenantEntries())
        state.entries[entry.entry_id] = entry
        state.tokens_by_model[entry.model_id] += entry.num_tokens
        heapq.heappush(state.lru, (entry.last_used_at, entry.entry_id))
        self._tenant_of[entry.entry_id] = entry.scope

    def _untrack(self, entry_id: str) -> str | None:
        """Stop tracking an entry; returns its tenant (None: it was not tracked)."""
        tenant = self._tenant_of.pop(entry_id, None)
        if tenant is None:
            return None
        state = self._tenants[tenant]
        entry = state.entries.pop(entry_id)
        state.tokens_by_model[entry.model_id] -= entry.num_tokens
        if not state.entries:
            del self._tenants[tenant]
        return tenant

    def _shrink_lru(self, tenant: str) -> None:
        """Rebuild a tenant's heap once stale items outnumber live ones (never while an
        eviction is popping it)."""
        state = self._tenants.get(tenant)
        if state is not None and len(state.lru) > 2 * len(state.entries) + 64:
            state.lru = [(e.last_used_at, i) for i, e in state.entries.items()]
            heapq.heapify(state.lru)

    def _evict_over_quota(self, tenant: str, admitted: frozenset[str]) -> list[IndexEntry]:
        """Untrack and return ``tenant``'s entries over its quota (see ``admit``)."""
        state = self._tenants.get(tenant)
        if not self.quota_bytes or state is None:
            return []
        victims = [entry for entry_id, entry in state.entries.items()
                   if entry_id in admitted and self._bytes(entry) > self.quota_bytes]
        for entry in victims:
            self._untrack(entry.entry_id)
        kept_back: list[tuple[float, str]] = []
        while tenant in self._tenants and self._usage(state) > self.quota_bytes and state.lru:
            stamp, entry_id = heapq.heappop(state.lru)
            entry = state.entries.get(entry_id)
            if entry is None:
                continue  # removed since it was pushed
            if entry.last_used_at != stamp:
                heapq.heappush(state.lru, (entry.last_used_at, entry_id))  # reused since
            elif entry_id in admitted:
                kept_back.append((stamp, entry_id))
            else:
                victims.append(entry)
                self._untrack(entry_id)
        for stamp, entry_id in kept_back:  # oldest first: they were popped in order
            if self._usage(state) > self.quota_bytes:
                victims.append(state.entries[entry_id])
                self._untrack(entry_id)
            else:
                heapq.heappush(state.lru, (stamp, entry_id))
        self._shrink_lru(tenant)
        return victims


def _tenant_hash(tenant: str) -> str:
    return hashlib.blake2b(tenant.encode(), digest_size=8).hexdigest()


def _read_state(path: Path, key: str) -> dict[str, Any]:
    """The mapping stored under ``key`` in a state file; empty when the file is missing,
    and empty with a warning when it is unreadable (the state is then rebuilt by use)."""
    try:
        data = json.loads(path.read_text())
        if data.get("format") != STATE_FORMAT or not isinstance(data.get(key), dict):
            raise ValueError(f"expected format {STATE_FORMAT} with a {key!r} mapping")
        return data[key]
    except FileNotFoundError:
        return {}
    except (ValueError, AttributeError) as exc:
        logger.warning("ignoring unreadable kvshare state file %s (%s)", path, exc)
        return {}


def _write_state(path: Path, key: str, mapping: Mapping[str, Any]) -> None:
    """Replace the state file atomically: a crash leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps({"format": STATE_FORMAT, key: mapping}))
    os.replace(partial, path)
