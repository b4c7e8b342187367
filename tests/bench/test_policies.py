"""The hit-rate policies behave like the systems they stand for."""

from __future__ import annotations

import numpy as np
import pytest

from kvshare.bench.policies import (
    ChunkHashPolicy,
    ConnectorPolicy,
    PrefixCachePolicy,
    Request,
    ResponseCachePolicy,
    SpanOraclePolicy,
)
from kvshare.bench.workload import nearest_earlier
from kvshare.config import KVShareConfig
from kvshare.matching.matcher import Matcher
from kvshare.storage.index import EntryIndex


def req(i, tokens):
    return Request(i, "", np.asarray(tokens, np.int32))


def test_prefix_cache_hits_whole_leading_blocks_and_recomputes_the_last_token():
    policy = PrefixCachePolicy(16)
    base = np.arange(100)
    policy.remember(req(0, base))
    assert policy.reuse(req(1, base)) == 96  # 6 full blocks; never the whole prompt
    edited = base.copy()
    edited[40] = -1  # inside block 2
    assert policy.reuse(req(2, edited)) == 32
    assert policy.reuse(req(3, np.arange(1, 101))) == 0  # shifted by one: no block matches
    exact_blocks = np.arange(64)
    policy.remember(req(4, exact_blocks))
    assert policy.reuse(req(5, exact_blocks)) == 48  # full hit backs off one block


def test_chunk_hashes_match_at_any_chunk_position():
    policy = ChunkHashPolicy(4)
    policy.remember(req(0, [1, 2, 3, 4, 5, 6, 7, 8]))
    assert policy.reuse(req(1, [5, 6, 7, 8, 1, 2, 3, 4, 9])) == 8
    assert policy.reuse(req(2, [0, 1, 2, 3, 4, 5, 6, 7, 8])) == 0  # misaligned by one


def test_response_cache_is_all_or_nothing_at_the_threshold():
    policy = ResponseCachePolicy(np.array([-np.inf, 0.79, 0.8]), threshold=0.8)
    assert [policy.reuse(req(i, np.arange(10))) for i in range(3)] == [0, 0, 10]


def test_span_oracle_trims_runs_and_lcs_counts_everything():
    source = np.arange(40)
    target = np.concatenate([source[:20], [999], source[21:25], [998], source[26:]])
    neighbours = np.array([[-1], [0]])
    span = SpanOraclePolicy("oracle", neighbours, [source, target])
    lcs = SpanOraclePolicy("oracle_lcs", neighbours, [source, target], lcs=True)
    assert span.reuse(req(1, target)) == 18 + 12  # runs of 20 and 14 (the 4-run is < 8)
    assert lcs.reuse(req(1, target)) == 20 + 4 + 14
    assert span.reuse(req(0, source)) == 0  # no earlier prompt


def test_nearest_earlier_matches_brute_force():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((1500, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    indices, sims = nearest_earlier(vectors, 3)
    assert (indices[0] == -1).all() and (indices[1] == [0, -1, -1]).all()
    for i in (5, 1100, 1499):
        expected = np.argsort(-(vectors[:i] @ vectors[i]))[:3]
        assert indices[i].tolist() == expected.tolist()
        np.testing.assert_allclose(sims[i], vectors[expected] @ vectors[i], rtol=1e-5)


# --------------------------------------------------------------------- the connector policy
# Real SmolLM2 tokens and WordLlama embeddings; prompts are spliced at the token level so
# that every position below is known by construction.

DOC = (
    "Northwind Traders opened its first warehouse in Lyon in 2019, after two years of "
    "renting shelf space from a regional grocer. The building sits beside the river port, "
    "so barges bring coffee, tea and dried fruit straight to the loading bays without a "
    "single truck on the motorway. In the first winter the heating failed twice, and the "
    "night shift moved the chocolate pallets into the office corridor to keep them from "
    "blooming. Since then the company has replaced the boilers, added solar panels over "
    "the car park and hired an energy manager who reports to the board every quarter. "
    "Revenue grew from 1.2 million euros in the first year to 4.1 million last year, while "
    "the number of employees rose from nine to thirty-four. Most of the growth came from "
    "restaurants in Geneva and Turin, which now order twice a week through the web shop. "
    "The founders still answer customer emails themselves on Sundays, a habit they say "
    "keeps them honest about delivery times. Two risks worry the finance team: the lease "
    "on the river site ends in 2027, and a single supplier in Vietnam provides almost half "
    "of the green coffee. The board has asked for a plan that covers both before the "
    "summer, including the cost of a second site near the airport and the terms a new "
    "supplier in Colombia or Ethiopia would accept. Meanwhile the logistics team tests "
    "electric vans for the last mile inside the old town, where diesel vehicles will be "
    "banned from next spring. Early results look good: each van covers its route on one "
    "charge, drivers like the quiet cabins, and the vans fit the narrow streets around the "
    "cathedral. The marketing lead wants to put the river barges on the packaging, since "
    "customers keep asking where the coffee comes from and how it travels. A local artist "
    "has already sketched the port at dawn, with cranes and gulls above the water. "
    "Inside the warehouse, the picking robots arrived in March and still share the aisles "
    "with people, which the safety officer watches closely. Each robot carries one crate "
    "at a time and stops whenever a person steps within two metres of it. The pickers "
    "were sceptical at first, but the robots now handle the heavy sacks of rice and flour "
    "that used to cause back injuries every autumn. Training took three weeks, mostly "
    "spent teaching the robots the quirks of the old floor, which slopes towards the "
    "river by almost a degree. For the next financial year the chief executive proposes "
    "three goals: open the airport site, sign a second coffee supplier, and cut delivery "
    "emissions by a third. She also wants an apprenticeship programme with the technical "
    "college across the bridge, so that young mechanics learn to service the vans and the "
    "robots instead of waiting for engineers from Paris. The works council supports the "
    "plan but asks for a written promise that no picker loses a job to the machines. "
    "Please summarise the situation for the board in five bullet points, list the main "
    "risks with a rough probability for each, and suggest the first three steps the "
    "company should take before the end of June."
)
OTHER = (
    "Write a short story about a lighthouse keeper on a remote Scottish island who finds "
    "a message in a bottle from a sailor who vanished a century ago. The keeper tries to "
    "trace the sailor's family through old parish records, letters kept in a museum in "
    "Inverness and the memories of an elderly fisherman who heard the tale as a boy. "
) * 10
BYTES_PER_TOKEN = 23_040  # SmolLM2-135M, bf16
TAIL = KVShareConfig().recompute_tail_tokens


@pytest.fixture(scope="module")
def doc(tokenizer):
    return token_array(tokenizer, DOC)


def token_array(tokenizer, text):
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)


def prompt(tokenizer, position, token_ids):
    return Request(position, tokenizer.decode(token_ids), np.asarray(token_ids, np.int32))


def spliced(base, at, inserted):
    return np.concatenate([base[:at], inserted, base[at:]]).astype(np.int32)


def runs_of(plan):
    return [(run.dst_start, run.entry_id, run.src_start, run.length) for run in plan.runs]


@pytest.fixture
def make_connector(tmp_path, wordllama):
    indexes = []

    def make(max_approx_depth=1, tier_bytes=(1 << 36,), kv_cache_tokens=1 << 16, **config):
        config = KVShareConfig(**config)
        index = EntryIndex(tmp_path / f"index{len(indexes)}", wordllama.dim,
                           max_entries=config.index_max_entries)
        indexes.append(index)
        matcher = Matcher.from_config(config, index, wordllama, model_id="smollm2")
        return ConnectorPolicy("connector", matcher, config, max_approx_depth=max_approx_depth,
                               kv_cache_tokens=kv_cache_tokens, bytes_per_token=BYTES_PER_TOKEN,
                               tier_bytes=tier_bytes)

    yield make
    for index in indexes:
        index.close()


def serve(policy, request):
    reused = policy.reuse(request)
    policy.remember(request)
    return reused


def test_connector_reuses_vllm_hit_plus_claim_minus_tail_and_rho(make_connector, tokenizer, doc):
    policy = make_connector()  # the embedded default: thresholds 0.5 / 64, tail, rho 0.15
    n1 = len(doc)
    inserted = token_array(tokenizer, " (all of these figures are still unaudited)")
    k = len(inserted)
    second = spliced(doc, 300, inserted)
    n2 = n1 + k
    assert inserted[0] != doc[300] and inserted[-1] != doc[299]  # the runs end at the insert

    assert serve(policy, prompt(tokenizer, 0, doc)) == 0
    (first_entry,) = policy.matcher.index.entries()
    assert (first_entry.depth, first_entry.exact_tokens) == (0, n1)

    reused = serve(policy, prompt(tokenizer, 1, second))
    out = policy.last
    e1 = first_entry.entry_id
    # Plan: the exact prefix, then (after the recomputed boundary token at 300 + k) the rest
    # of the first prompt up to, not including, the last token.
    assert runs_of(policy.last_lookup.plan) == [(0, e1, 0, 300), (301 + k, e1, 301, n1 - 302)]
    # vLLM's prefix cache (128-token blocks) serves the two blocks before the insert; the
    # claim runs from there to the tail before the last token, which vLLM computes.
    assert out.prefix_hit.tokens == 256
    assert (out.claim.start, out.claim.end) == (256, n2 - 1 - TAIL)
    planned = (300 - 256) + (n2 - 1 - TAIL - (301 + k))
    assert out.claim.planned_reuse == out.loaded == planned
    # Positions 256-299 continue the exact prefix: verbatim, never recomputed by DHD.
    assert out.claim.verbatim == 300 - 256
    recomputed = round(0.15 * (planned - out.claim.verbatim))
    assert out.reused == planned - recomputed
    assert reused == out.reused_tokens == 256 + planned - recomputed

    # Stored as approximate KV (depth 1) whose first 300 tokens are exact: the chunk of
    # positions 0-255 is the first prompt's (stored once), the others are its own.
    assert (out.depth, out.exact_tokens, out.stored) == (1, 300, True)
    (second_entry,) = [e for e in policy.matcher.index.entries() if e.entry_id != e1]
    assert (second_entry.depth, second_entry.exact_tokens) == (1, 300)
    assert second_entry.chunk_keys[0] == first_entry.chunk_keys[0]
    assert not set(second_entry.chunk_keys[1:]) & set(first_entry.chunk_keys)
    assert policy.tiers.tiers[0].used_bytes == (n1 + n2 - 256) * BYTES_PER_TOKEN

    # The same prompt again: vLLM's prefix cache now holds the filled blocks, approximate
    # from block 2 (position 256) on; the rest comes from the second entry's approximate
    # rows, so this KV would be depth 2: not stored (and its scope holds the prompt anyway).
    reused = serve(policy, prompt(tokenizer, 2, second))
    out = policy.last
    assert (out.prefix_hit.tokens, out.prefix_hit.exact_tokens, out.prefix_hit.depth) == \
        ((n2 - 1) // 128 * 128, 256, 1)
    assert {run.entry_id for run in policy.last_lookup.plan.runs} == {second_entry.entry_id}
    assert (out.source_depth, out.depth, out.stored) == (1, 2, False)
    planned = n2 - 1 - TAIL - out.prefix_hit.tokens
    assert reused == out.prefix_hit.tokens + planned - round(0.15 * planned)
    assert policy.stats.served_from_approximate == 1
    assert policy.stats.claimed == 2 and policy.stats.approximate_prefix_hits == 1


def test_edit_chain_reuses_the_middle_edit_only_when_approximate_kv_is_stored(
        make_connector, tokenizer, doc):
    edit = token_array(tokenizer, " and a small bakery in Annecy")
    second = spliced(doc, 200, edit)
    third = spliced(second, 3, token_array(tokenizer, " [confidential]"))  # no vLLM hit
    k = len(third) - len(second)
    edit_in_third = np.arange(200 + k, 200 + k + len(edit))
    reused, plans = {}, {}
    for depth in (0, 1):
        policy = make_connector(max_approx_depth=depth)
        serve(policy, prompt(tokenizer, 0, doc))
        serve(policy, prompt(tokenizer, 1, second))
        assert policy.last.depth == 1 and policy.last.claim.num_claimed > 0
        entries = policy.matcher.index.entries()
        assert [e.depth for e in entries] == ([0] if depth == 0 else [0, 1])
        reused[depth] = serve(policy, prompt(tokenizer, 2, third))
        plans[depth] = (policy.last_lookup.plan, {e.entry_id: e for e in entries})
        out = policy.last
        assert out.prefix_hit.tokens == 0 and out.claim.num_claimed > 0
        assert not out.stored  # depth 1 + its source's
        stats = policy.stats
        if depth == 0:
            assert (stats.not_stored_too_deep, stats.served_from_approximate) == (2, 0)
            assert (out.source_depth, out.depth) == (0, 1)
        else:
            assert (stats.not_stored_too_deep, stats.served_from_approximate) == (1, 1)
            assert (out.source_depth, out.depth) == (1, 2)
    plan, entries = plans[0]
    assert np.isin(edit_in_third, plan.recompute).all()  # nothing stored holds the edit
    plan, entries = plans[1]
    from_second = [run for run in plan.runs if entries[run.entry_id].depth == 1]
    assert any(run.dst_start <= edit_in_third[0] and edit_in_third[-1] < run.dst_end
               for run in from_second)
    assert reused[1] > reused[0] + 0.85 * len(edit)


def test_lookup_prefers_an_exact_source_over_an_approximate_one_covering_the_same_tokens(
        tmp_path, wordllama, tokenizer, doc):
    index = EntryIndex(tmp_path, wordllama.dim)
    matcher = Matcher(index, wordllama, model_id="smollm2")
    text = tokenizer.decode(doc)
    # The approximate copy is the nearest by embedding (it has the query's own), the exact
    # one is stored under an unrelated text's embedding: only the depth puts it first.
    exact = matcher.insert(text, doc, embedding=wordllama.embed([OTHER])[0])
    approximate = matcher.insert(text, doc, depth=1, exact_tokens=100)
    result = matcher.lookup(text, doc)
    assert [hit.entry.entry_id for hit in result.hits] == [exact.entry_id, approximate.entry_id]
    assert result.hits[0].distance > result.hits[1].distance
    assert {run.entry_id for run in result.plan.runs} == {exact.entry_id}
    # Preference breaks ties only: an approximate source that covers more still wins.
    longer = spliced(doc, len(doc) - 1, token_array(tokenizer, " Thank you very much."))
    further = matcher.insert(tokenizer.decode(longer), longer, depth=1, exact_tokens=100)
    plan = matcher.lookup(tokenizer.decode(longer), longer).plan
    assert runs_of(plan)[0] == (0, further.entry_id, 0, len(longer) - 1)
    index.close()


def test_evicted_chunks_make_an_entry_unreusable(make_connector, tokenizer, doc):
    other = token_array(tokenizer, OTHER)
    assert len(other) > len(doc)
    edited = spliced(doc, 2, token_array(tokenizer, " Draft:"))  # vLLM's hit stays 0
    room_for_one = (len(other) * BYTES_PER_TOKEN,)  # one tier that holds one prompt
    reused = {}
    for name, tiers in (("roomy", (1 << 36,)), ("tight", room_for_one)):
        policy = make_connector(tier_bytes=tiers)
        serve(policy, prompt(tokenizer, 0, doc))
        (doc_entry,) = policy.matcher.index.entries()
        serve(policy, prompt(tokenizer, 1, other))  # evicts every chunk of doc if tight
        reused[name] = serve(policy, prompt(tokenizer, 2, edited))
        out = policy.last
        assert out.claim.num_claimed > 0  # the index still offered doc's entry
        assert {run.entry_id for run in policy.last_lookup.plan.runs} == {doc_entry.entry_id}
        if name == "tight":
            assert out.loaded == 0 and reused[name] == 0  # every claimed token recomputed
            assert doc_entry.entry_id not in policy.matcher.index
            assert policy.stats.entries_dropped == 1
            assert policy.stats.lost_to_missing_chunks == out.claim.planned_reuse
    assert reused["roomy"] > 0.7 * len(edited)
