"""Tenancy policies and per-tenant quotas on real parts: SmolLM2 tokens, WordLlama, LanceDB."""

from __future__ import annotations

import json

import pytest

from kvshare.matching.align import plan_reuse
from kvshare.matching.matcher import Matcher
from kvshare.matching.plan import Candidate
from kvshare.storage.index import EntryIndex
from kvshare.tenancy import (
    KV_RATES_FILE,
    POPULARITY_FILE,
    Popularity,
    TenancyPolicy,
    TenantQuotas,
)

REPORT = (
    "Quarterly report for Northwind Traders. Revenue grew 12% to $4.1M while costs fell "
    "3%. The board approved the new warehouse in Lyon and asked the CFO to present the "
    "hiring plan for the logistics team at the next meeting. Summarise the key risks."
)
SIMILAR = REPORT.replace("Northwind Traders", "Contoso Ltd").replace("12%", "9%")
"""Aligns to REPORT: about 90% of its tokens reuse REPORT's KV."""
UNRELATED_TAIL = (
    " Separately, I am planning a two-week walking trip through the Scottish Highlands in "
    "late September with my brother and our dog. We want to sleep in bothies or small inns, "
    "avoid long stretches on roads, carry light packs, and finish near a railway station. "
    "Which routes would you suggest, what gear do we need for rain and midges, how should "
    "we plan food resupply, and are dogs welcome in most of the inns along the way?"
)
WEAK = ". ".join(REPORT.split(". ")[:2]) + "." + UNRELATED_TAIL
"""Shares REPORT's first two sentences: aligns to it below ``popular_min_reuse`` (0.5)."""
KV_BYTES_PER_TOKEN = 1000


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture
def index(tmp_path, wordllama):
    index = EntryIndex(tmp_path / "index", wordllama.dim)
    yield index
    index.close()


def matcher_with(index, wordllama, policy):
    return Matcher(index, wordllama, model_id="smollm2", policy=policy, top_k=4,
                   min_run_tokens=8)


def popular_policy(index, min_tenants=3, min_reuse=0.5):
    return TenancyPolicy("popular", popularity=Popularity(min_tenants, min_reuse, index.path))


def reused(matcher, tokenizer, text, tenant):
    """Tokens a lookup of ``tenant`` reuses, after checking that every hit is one the
    tenant may reuse and that the plan reads only from hits."""
    result = matcher.lookup(text, ids(tokenizer, text), tenant)
    hit_ids = {hit.entry.entry_id for hit in result.hits}
    assert all(matcher.policy.visible(hit.entry, tenant) for hit in result.hits)
    assert set(result.plan.source_entries) <= hit_ids
    return result.plan.reused_tokens


# --------------------------------------------------------------------- policies
def test_isolated_tenant_never_reuses_another_tenants_entries(index, wordllama, tokenizer):
    matcher = matcher_with(index, wordllama, TenancyPolicy("isolated"))
    matcher.insert(REPORT, ids(tokenizer, REPORT), tenant="y")
    for _ in range(3):  # repeated similar prompts never unlock anything under isolated
        assert reused(matcher, tokenizer, SIMILAR, "x") == 0
        assert reused(matcher, tokenizer, REPORT, "x") == 0
    assert reused(matcher, tokenizer, SIMILAR, "y") > 0
    assert not (index.path / POPULARITY_FILE).exists()


def test_in_flight_entries_follow_the_policy(index, wordllama, tokenizer):
    """An entry still being stored (``extra``) is offered only to tenants that may reuse it."""
    matcher = matcher_with(index, wordllama, TenancyPolicy("isolated"))
    stored = matcher.insert(REPORT, ids(tokenizer, REPORT), tenant="y")
    index.delete([stored.entry_id])
    tokens = ids(tokenizer, SIMILAR)
    assert matcher.lookup(SIMILAR, tokens, "x", extra=[stored]).plan.reused_tokens == 0
    plan = matcher.lookup(SIMILAR, tokens, "y", extra=[stored]).plan
    assert plan.source_entries == (stored.entry_id,)


def test_groups_share_within_a_group_and_never_with_a_non_member(index, wordllama,
                                                                  tokenizer):
    policy = TenancyPolicy("groups", groups={"acme": ["x", "y"], "other": ["y", "w"]})
    matcher = matcher_with(index, wordllama, policy)
    matcher.insert(REPORT, ids(tokenizer, REPORT), tenant="x")
    assert reused(matcher, tokenizer, SIMILAR, "y") > 0  # same group as x
    assert reused(matcher, tokenizer, SIMILAR, "z") == 0  # in no group
    assert reused(matcher, tokenizer, SIMILAR, "w") == 0  # shares a group with y, not x
    assert policy.scopes("y") == ["y", "", "w", "x"]


def test_groups_from_config_follow_tenant_groups(tmp_path):
    from kvshare.config import KVShareConfig

    config = KVShareConfig(home=str(tmp_path), tenancy="groups",
                           tenant_groups={"acme": ["x", "y"]}, share_public_scope=False)
    policy = TenancyPolicy.from_config(config)
    assert (policy.scopes("x"), policy.scopes("z")) == (["x", "y"], ["z"])
    assert not policy.searches_every_scope


def test_popular_entry_is_reused_only_after_k_distinct_tenants_aligned(index, wordllama,
                                                                        tokenizer):
    policy = popular_policy(index, min_tenants=3)
    matcher = matcher_with(index, wordllama, policy)
    entry = matcher.insert(REPORT, ids(tokenizer, REPORT), tenant="owner")
    assert reused(matcher, tokenizer, SIMILAR, "owner") > 0  # the owner counts as one
    for _ in range(3):  # one tenant repeating counts once: owner + a = 2 < 3
        assert reused(matcher, tokenizer, SIMILAR, "a") == 0
    assert not policy.popularity.is_popular(entry.entry_id)
    # b is the third distinct tenant: its lookup makes the entry popular without using it.
    assert reused(matcher, tokenizer, SIMILAR, "b") == 0
    assert policy.popularity.is_popular(entry.entry_id)
    assert reused(matcher, tokenizer, SIMILAR, "a") > 0
    assert reused(matcher, tokenizer, REPORT, "c") == len(ids(tokenizer, REPORT)) - 1


def test_popular_does_not_count_prompts_aligning_below_min_reuse(index, wordllama,
                                                                  tokenizer):
    report = ids(tokenizer, REPORT)
    weak_plan = plan_reuse(ids(tokenizer, WEAK), [Candidate("report", report)])
    assert 0.0 < weak_plan.reuse_fraction < 0.5  # it aligns, but too little
    policy = popular_policy(index, min_tenants=3, min_reuse=0.5)
    matcher = matcher_with(index, wordllama, policy)
    entry = matcher.insert(REPORT, report, tenant="owner")
    assert reused(matcher, tokenizer, WEAK, "a") == 0
    assert reused(matcher, tokenizer, WEAK, "b") == 0
    assert reused(matcher, tokenizer, SIMILAR, "c") == 0  # owner + c = 2: not popular
    assert not policy.popularity.is_popular(entry.entry_id)
    assert reused(matcher, tokenizer, SIMILAR, "d") == 0  # owner + c + d = 3
    assert reused(matcher, tokenizer, WEAK, "a") > 0


def test_popularity_survives_a_restart(tmp_path, wordllama, tokenizer):
    with EntryIndex(tmp_path / "index", wordllama.dim) as index:
        policy = popular_policy(index, min_tenants=2)
        matcher = matcher_with(index, wordllama, policy)
        popular = matcher.insert(REPORT, ids(tokenizer, REPORT), tenant="owner")
        assert reused(matcher, tokenizer, SIMILAR, "tenant-alpha") == 0  # 2 tenants: popular
        policy.save()
    saved = (tmp_path / "index" / POPULARITY_FILE).read_text()
    assert "tenant-alpha" not in saved  # tenants are stored as hashes
    assert list(json.loads(saved)["aligned"]) == [popular.entry_id]
    with EntryIndex(tmp_path / "index", wordllama.dim) as index:
        policy = popular_policy(index, min_tenants=2)
        policy.retain(entry.entry_id for entry in index.entries())
        assert policy.popularity.is_popular(popular.entry_id)
        assert reused(matcher_with(index, wordllama, policy), tokenizer, SIMILAR, "b") > 0


def test_forgotten_and_absent_entries_leave_the_popularity_state(index, wordllama, tokenizer):
    policy = popular_policy(index, min_tenants=2)
    matcher = matcher_with(index, wordllama, policy)
    kept = matcher.insert(REPORT, ids(tokenizer, REPORT), tenant="owner")
    gone = matcher.insert(SIMILAR, ids(tokenizer, SIMILAR), tenant="other-owner")
    reused(matcher, tokenizer, SIMILAR, "a")  # aligns to both: each is popular
    assert policy.popularity.is_popular(kept.entry_id)
    assert policy.popularity.is_popular(gone.entry_id)
    policy.save()
    restarted = popular_policy(index, min_tenants=2)
    restarted.retain([kept.entry_id])  # as at start, when the index no longer holds `gone`
    assert restarted.popularity.is_popular(kept.entry_id)
    assert not restarted.popularity.is_popular(gone.entry_id)
    restarted.forget([kept.entry_id])
    assert not restarted.popularity.is_popular(kept.entry_id)
    restarted.save()
    assert json.loads((index.path / POPULARITY_FILE).read_text())["aligned"] == {}


def test_popular_policy_refuses_a_single_tenant_threshold(tmp_path):
    with pytest.raises(ValueError, match="min_tenants=1"):
        Popularity(1, 0.5, tmp_path)
    with pytest.raises(ValueError, match="tenancy='open'"):
        TenancyPolicy("open")


# ----------------------------------------------------------------------- quotas
def insert(matcher, tokenizer, text, tenant, at):
    """Index a prompt created ``at`` (seconds since the epoch), as a commit would."""
    entry = matcher.insert(text, ids(tokenizer, text), tenant=tenant)
    entry.created_at = at
    return entry


def commit(index, quotas, entries):
    """What the catalog does on a commit: admit, then delete what the quotas return."""
    victims = quotas.admit(entries, KV_BYTES_PER_TOKEN)
    index.delete([victim.entry_id for victim in victims])
    return victims


def entry_bytes(entry):
    return entry.num_tokens * KV_BYTES_PER_TOKEN


def test_a_tenant_over_quota_loses_its_least_recently_used_entries(index, wordllama,
                                                                    tokenizer, tmp_path):
    matcher = matcher_with(index, wordllama, TenancyPolicy("isolated"))
    texts = [REPORT, SIMILAR, WEAK]
    # Room for the first and the last prompt, not for all three.
    quota = (len(ids(tokenizer, texts[0])) + len(ids(tokenizer, texts[2]))) * KV_BYTES_PER_TOKEN
    quotas = TenantQuotas(quota, tmp_path / "index")
    other = [insert(matcher, tokenizer, text, "y", at=100.0 + i) for i, text in enumerate(texts)]
    assert commit(index, quotas, other[:2]) == []
    x1, x2 = (insert(matcher, tokenizer, text, "x", at) for text, at in
              ((texts[0], 200.0), (texts[1], 201.0)))
    assert commit(index, quotas, [x1, x2]) == []
    index.record_hits([x1.entry_id], now=300.0)  # x1 is now more recent than x2
    x3 = insert(matcher, tokenizer, texts[2], "x", at=301.0)
    victims = commit(index, quotas, [x3])
    assert [v.entry_id for v in victims] == [x2.entry_id]
    assert x2.entry_id not in index and {x1.entry_id, x3.entry_id} <= set(
        e.entry_id for e in index.entries())
    # y's older entries were untouched by x's eviction, and y is still under its quota.
    assert all(e.entry_id in index for e in other[:2])
    usage = quotas.usage()
    assert usage == {"x": entry_bytes(x1) + entry_bytes(x3),
                     "y": entry_bytes(other[0]) + entry_bytes(other[1])}
    assert all(used <= quota for used in usage.values())
    # An entry committed late (older than x's others) is not the one evicted for itself.
    late = insert(matcher, tokenizer, texts[1], "x", at=250.0)
    assert [v.entry_id for v in commit(index, quotas, [late])] == [x1.entry_id]
    assert quotas.usage()["x"] == entry_bytes(x3) + entry_bytes(late) <= quota


def test_an_entry_alone_over_the_quota_is_refused(index, wordllama, tokenizer, tmp_path):
    matcher = matcher_with(index, wordllama, TenancyPolicy("isolated"))
    small = insert(matcher, tokenizer, REPORT.split(". ")[0], "x", at=1.0)
    quotas = TenantQuotas(entry_bytes(small) * 2, tmp_path / "index")
    assert commit(index, quotas, [small]) == []
    large = insert(matcher, tokenizer, WEAK, "x", at=2.0)
    assert entry_bytes(large) > quotas.quota_bytes
    assert commit(index, quotas, [large]) == [large]
    assert small.entry_id in index and large.entry_id not in index
    assert quotas.usage() == {"x": entry_bytes(small)}


def test_one_commit_over_the_quota_keeps_its_most_recent_entries(index, wordllama, tokenizer,
                                                                   tmp_path):
    matcher = matcher_with(index, wordllama, TenancyPolicy("isolated"))
    batch = [insert(matcher, tokenizer, text, "x", at=float(i))
             for i, text in enumerate((REPORT, SIMILAR, REPORT.replace("Lyon", "Turin")))]
    quotas = TenantQuotas(sum(entry_bytes(e) for e in batch[1:]), tmp_path / "index")
    assert commit(index, quotas, batch) == [batch[0]]


def test_usage_is_recomputed_after_a_restart(tmp_path, wordllama, tokenizer):
    state = tmp_path / "index"
    with EntryIndex(state, wordllama.dim) as index:
        matcher = matcher_with(index, wordllama, TenancyPolicy("isolated"))
        quotas = TenantQuotas(0, state)  # unlimited, still counted
        entries = [insert(matcher, tokenizer, text, tenant, at=float(i)) for i, (text, tenant)
                   in enumerate(((SIMILAR, "x"), (REPORT, "x"), (WEAK, "y")))]
        assert commit(index, quotas, entries) == []
        before = quotas.usage()
    assert json.loads((state / KV_RATES_FILE).read_text())["kv_bytes_per_token"] == {
        "smollm2": KV_BYTES_PER_TOKEN}
    with EntryIndex(state, wordllama.dim) as index:
        restarted = TenantQuotas(0, state)
        assert restarted.rebuild(index.entries()) == []
        assert restarted.usage() == before == {
            "x": entry_bytes(entries[0]) + entry_bytes(entries[1]), "y": entry_bytes(entries[2])}
        # A quota lowered across the restart: rebuild names each tenant's oldest entries
        # beyond it (y's only entry is larger than the new quota on its own).
        assert entry_bytes(entries[0]) <= entry_bytes(entries[1]) < entry_bytes(entries[2])
        lowered = TenantQuotas(entry_bytes(entries[1]), state)
        victims = lowered.rebuild(index.entries())
        assert [v.entry_id for v in victims] == [entries[0].entry_id, entries[2].entry_id]
        assert lowered.usage() == {"x": entry_bytes(entries[1])}
        lowered.forget([entries[1].entry_id])
        assert lowered.usage() == {}
