"""Lookup end to end on real parts: SmolLM2 tokens, WordLlama, LanceDB, the planner."""

from __future__ import annotations

import pytest

from kvshare.matching.matcher import Matcher
from kvshare.storage.index import EntryIndex
from kvshare.tenancy import TenancyPolicy

REPORT = (
    "Quarterly report for Northwind Traders. Revenue grew 12% to $4.1M while costs fell "
    "3%. The board approved the new warehouse in Lyon and asked the CFO to present the "
    "hiring plan for the logistics team at the next meeting. Summarise the key risks."
)


@pytest.fixture
def matcher(tmp_path, wordllama):
    index = EntryIndex(tmp_path, wordllama.dim)
    yield Matcher(index, wordllama, model_id="smollm2", top_k=4, min_run_tokens=8)
    index.close()


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_identical_prompt_reuses_all_but_the_last_token(matcher, tokenizer):
    tokens = ids(tokenizer, REPORT)
    stored = matcher.insert(REPORT, tokens)
    plan = matcher.lookup(REPORT, tokens).plan
    assert plan.reused_tokens == len(tokens) - 1
    assert plan.recompute.tolist() == [len(tokens) - 1]
    assert {run.entry_id for run in plan.runs} == {stored.entry_id}


def test_edited_prompt_reuses_the_unchanged_spans(matcher, tokenizer):
    matcher.insert(REPORT, ids(tokenizer, REPORT))
    edited = REPORT.replace("Northwind Traders", "Contoso Ltd").replace("12%", "9%")
    tokens = ids(tokenizer, edited)
    plan = matcher.lookup(edited, tokens).plan
    assert 0.7 < plan.reuse_fraction < 1.0
    for run in plan.runs:
        (source,) = matcher.index.get([run.entry_id])
        assert tokens[run.dst_start : run.dst_end] == \
            source.token_ids[run.src_start : run.src_start + run.length].tolist()


def test_tenants_never_see_each_other(matcher, tokenizer):
    tokens = ids(tokenizer, REPORT)
    matcher.insert(REPORT, tokens, tenant="tenant-a")
    assert matcher.lookup(REPORT, tokens, tenant="tenant-b").plan.reused_tokens == 0
    assert matcher.lookup(REPORT, tokens, tenant="tenant-a").plan.reused_tokens == len(tokens) - 1
    # The public scope is shared with everyone (by default), a tenant's scope with no one.
    assert matcher.lookup(REPORT, tokens).plan.reused_tokens == 0
    matcher.insert(REPORT, tokens)
    assert matcher.lookup(REPORT, tokens, tenant="tenant-b").plan.reused_tokens == len(tokens) - 1
    matcher.policy = TenancyPolicy(share_public_scope=False)
    assert matcher.lookup(REPORT, tokens, tenant="tenant-b").plan.reused_tokens == 0


def test_other_models_entries_are_never_used(matcher, tokenizer, wordllama):
    tokens = ids(tokenizer, REPORT)
    other = Matcher(matcher.index, wordllama, model_id="another-model")
    other.insert(REPORT, tokens)
    assert matcher.lookup(REPORT, tokens).plan.reused_tokens == 0


def test_lookup_reports_its_timings(matcher, tokenizer):
    result = matcher.lookup(REPORT, ids(tokenizer, REPORT))
    assert result.plan.reused_tokens == 0 and result.hits == []
    assert min(result.embed_ms, result.search_ms, result.align_ms) >= 0.0
    assert result.total_ms == pytest.approx(result.embed_ms + result.search_ms + result.align_ms)


def test_chunk_planner_baseline_reuses_less_than_alignment(matcher, tokenizer):
    long_report = " ".join([REPORT] * 6)
    matcher.insert(long_report, ids(tokenizer, long_report))
    head, _, tail = long_report.rpartition("Lyon")  # edit the last copy: leading chunks match
    edited = head + "Turin" + tail
    tokens = ids(tokenizer, edited)
    aligned = matcher.lookup(edited, tokens).plan
    matcher.planner, matcher.chunk_tokens = "chunk256", 64
    chunked = matcher.lookup(edited, tokens).plan
    assert 0 < chunked.reused_tokens < aligned.reused_tokens
    assert all(run.length <= 64 * 6 for run in chunked.runs)


def test_an_in_flight_entry_that_reached_the_index_is_a_candidate_once(matcher, tokenizer):
    """The connector lists entries in flight before its commit lands: the same entry may
    then come from the index and from ``extra``."""
    stored = matcher.insert(REPORT, ids(tokenizer, REPORT))
    edited = REPORT.replace("Northwind Traders", "Contoso Ltd")
    result = matcher.lookup(edited, ids(tokenizer, edited), extra=[stored])
    assert [hit.entry.entry_id for hit in result.hits] == [stored.entry_id]
    assert result.plan.source_entries == (stored.entry_id,)
