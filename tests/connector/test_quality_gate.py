"""Shadow checks and the quality gate: the score and gate rules, the checker thread, and
on the real in-process engine: injected fill faults trip the gate and claims stop, the
gate reopens after passing checks, a check never delays the request it samples, and the
load report says what happened.

Engine tests force ``shadow_sample_rate=1`` and give the scheduler a fresh gate, both on
the live objects (restored afterwards); every check they cause is answered and
delivered before they end, so no result reaches another test's gate.
"""

from __future__ import annotations

import dataclasses
import queue
import threading

import pytest
import torch

from kvshare.config import ConfigError, KVShareConfig
from kvshare.connector.metadata import LoadSpec, ShadowSpec
from kvshare.connector.quality_gate import GateSettings, QualityGate, sampled
from kvshare.connector.shadow import ShadowChecker, compare_next_tokens
from kvshare.quality_scores import read_scores, scores_path, write_scores

SETTINGS = GateSettings(min_top1=0.75, max_kl=0.1, window=6, floor=0.5, min_checks=3,
                        reopen_checks=2)
GOOD, BAD = (1.0, 0.001), (0.2, 2.0)


# ---------------------------------------------------------------------- score and gate
def test_a_scope_closes_once_its_window_holds_min_checks_mostly_failing():
    gate = QualityGate(SETTINGS)
    assert gate.record("a", *BAD) == [] and gate.record("a", *BAD) == []
    assert gate.is_open("a")  # two checks: below min_checks, whatever they say
    changes = gate.record("a", *BAD)
    assert [(c.scope, c.opened) for c in changes] == [(None, False), ("a", False)]
    assert not gate.is_open("a") and not gate.is_open("b")  # the model closed too


def test_a_scope_failing_alone_closes_only_itself():
    gate = QualityGate(SETTINGS)
    for _ in range(4):
        gate.record("good", *GOOD)
    for _ in range(3):
        gate.record("bad", *BAD)
    assert not gate.is_open("bad") and gate.is_open("good") and gate.is_open("new")
    assert gate.scores()["model"]["score"] == 0.5  # the last 6 checks: 3 good, 3 bad


def test_occasional_failures_keep_the_gate_open():
    gate = QualityGate(SETTINGS)
    for check in [GOOD, BAD, GOOD, GOOD, BAD, GOOD, GOOD, BAD, GOOD]:
        assert gate.record("a", *check) == []
    assert gate.is_open("a")


def test_the_gate_reopens_after_consecutive_passes_and_forgets_the_failures():
    gate = QualityGate(SETTINGS)
    for _ in range(3):
        gate.record("a", *BAD)
    gate.record("a", *GOOD)
    gate.record("a", *BAD)  # resets the run of passes
    assert gate.record("a", *GOOD) == [] and not gate.is_open("a")
    changes = gate.record("a", *GOOD)
    assert [(c.scope, c.opened) for c in changes] == [(None, True), ("a", True)]
    assert gate.is_open("a")
    scores = gate.scores()["scopes"]["a"]
    assert scores["score"] == 1.0 and scores["checks_in_window"] == 2 and scores["checks"] == 7
    gate.record("a", *BAD)  # one failure after reopening: 2 of 3 pass
    assert gate.is_open("a")


def test_a_zero_floor_never_closes_and_still_scores():
    gate = QualityGate(dataclasses.replace(SETTINGS, floor=0.0))
    for _ in range(6):
        gate.record("a", *BAD)
    assert gate.is_open("a") and gate.scores()["scopes"]["a"]["score"] == 0.0


def test_old_open_scopes_are_forgotten_closed_ones_kept():
    gate = QualityGate(dataclasses.replace(SETTINGS, max_scopes=2))
    for _ in range(3):
        gate.record("closed", *BAD)
    gate.record("b", *GOOD)
    gate.record("c", *GOOD)
    assert set(gate.scores()["scopes"]) == {"closed", "c"}


def test_scores_are_written_atomically_and_read_back(tmp_path):
    gate = QualityGate(SETTINGS)
    gate.record("acme", *GOOD)
    write_scores(scores_path(tmp_path, "model-a"), gate.snapshot("model-a"))
    [document] = read_scores(tmp_path)
    assert document["model_id"] == "model-a"
    assert document["scopes"]["acme"]["gate"] == "open"
    assert [p.name for p in (tmp_path / "quality").iterdir()] == ["model-a.json"]


def test_sampling_is_deterministic_per_request_id():
    ids = [f"req-{i}" for i in range(4000)]
    assert all(sampled(i, 1.0) for i in ids) and not any(sampled(i, 0.0) for i in ids)
    share = sum(sampled(i, 0.05) for i in ids) / len(ids)
    assert 0.03 < share < 0.07
    assert [sampled(i, 0.05) for i in ids] == [sampled(i, 0.05) for i in ids]


@pytest.mark.parametrize(("key", "value"), [("shadow_sample_rate", 1.5), ("gate_floor", -0.1),
                                            ("gate_min_checks", 50), ("shadow_max_kl", -1)])
def test_bad_gate_config_names_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        KVShareConfig.from_dict({key: value})


def test_next_token_comparison():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    assert compare_next_tokens(logits, logits) == (1.0, pytest.approx(0.0, abs=1e-7))
    flipped = torch.tensor([[0.0, 2.0, -1.0], [0.0, 1.0, 0.0]])
    top1, kl = compare_next_tokens(logits, flipped)
    p = logits[0].softmax(-1)
    expected = float((p * (p.log() - flipped[0].log_softmax(-1))).sum()) / 2
    assert top1 == 0.5 and kl == pytest.approx(expected)


# ---------------------------------------------------------------------- checker thread
def spec(req_id: str) -> ShadowSpec:
    fill = LoadSpec(req_id=req_id, token_ids=[1, 2, 3], block_ids=[], num_computed=0,
                    num_claimed=1, runs=[], sources={}, rho=0.15, tail_start=1)
    return ShadowSpec(fill, scope="s")


def test_the_checker_answers_every_spec_and_drops_when_busy():
    release, running = threading.Event(), queue.Queue()

    def check(shadow, before_layer):
        running.put(shadow.fill.req_id)
        release.wait()
        if shadow.fill.req_id == "broken":
            raise RuntimeError("injected check failure")
        return 0.9, 0.01, 2

    checker = ShadowChecker(check, queue_size=2)
    try:
        checker.submit(spec("first"))
        assert running.get() == "first"  # running: the queue is empty again
        for req_id in ("broken", "queued", "dropped"):
            checker.submit(spec(req_id))
        assert [(r.req_id, r.outcome) for r in checker.take_results()] == [("dropped", "dropped")]
        release.set()
        checker.drain()
        results = {r.req_id: r for r in checker.take_results()}
        assert {k: r.outcome for k, r in results.items()} == {
            "first": "done", "broken": "error", "queued": "done"}
        assert (results["first"].top1, results["first"].kl, results["first"].positions) == (
            0.9, 0.01, 2)
    finally:
        release.set()
        checker.close()


def test_closing_stops_the_running_check_at_its_next_layer_and_runs_no_other():
    in_layer, release, stopped, checked = (threading.Event(), threading.Event(),
                                           threading.Event(), [])

    def check(shadow, before_layer):
        checked.append(shadow.fill.req_id)
        before_layer(0)
        in_layer.set()
        release.wait()
        try:
            before_layer(1)
        except BaseException:
            stopped.set()
            raise
        return 1.0, 0.0, 1

    checker = ShadowChecker(check)
    checker.submit(spec("running"))
    checker.submit(spec("queued"))
    in_layer.wait()
    checker.close(timeout_s=0)
    release.set()
    stopped.wait()
    assert checked == ["running"] and checker.take_results() == []


# ---------------------------------------------------------------------- real engine
def report(out) -> dict:
    assert out.kv_transfer_params is not None, "no kvshare load report for this request"
    return out.kv_transfer_params["kvshare"]


@pytest.fixture
def checked(engine, monkeypatch):
    """The engine's scheduler samples every claim into a fresh gate; yields the gate.
    Every check is answered and delivered before the test ends."""
    from kvshare.connector.scheduler import gate_settings

    config = dataclasses.replace(engine.scheduler.config, shadow_sample_rate=1.0)
    gate = QualityGate(gate_settings(config))
    monkeypatch.setattr(engine.scheduler, "config", config)
    monkeypatch.setattr(engine.scheduler, "gate", gate)
    monkeypatch.setattr(engine.scheduler, "_withheld_checks", {})
    yield gate
    deliver(engine)


@pytest.fixture
def scheduler_stats(engine, monkeypatch):
    """What the scheduler-side connector answers vLLM's ``get_kv_connector_stats`` (asked
    after every step), summed over the test."""
    from kvshare.connector.stats import KVShareConnectorStats

    connector = engine.engine_core.scheduler.connector
    asked, total = connector.get_kv_connector_stats, KVShareConnectorStats()

    def summing():
        nonlocal total
        stats = asked()
        if stats is not None:
            total = total.aggregate(stats)
        return stats

    monkeypatch.setattr(connector, "get_kv_connector_stats", summing)
    yield lambda: total.data


def deliver(engine) -> None:
    """Wait for every queued check, then step a tiny request: its steps carry the
    answers to the scheduler (worker metadata travels only with engine steps)."""
    engine.worker.shadow.drain()
    engine.run(list(range(1000, 1010)), "quality-deliver", max_tokens=1)


def insert_at(base: list[int], at: int, tokens: list[int]) -> list[int]:
    """An insertion in block 0: vLLM's prefix cache has no hit, every later run moves."""
    return base[:at] + tokens + base[at:]


FAULTS = ["keys-not-rerotated", "another-models-chunks"]
FAULT_SHIFT = 32
"""Tokens inserted before the reused ones when a fault is injected. Keys left unrotated
matter more the farther they move: measured on SmolLM2 (600-token prompt), a shift of 6
kept the checks' KL at 0.09 nats (under ``shadow_max_kl`` 0.1), one of 32 raised it to
0.31 and one of 100 to 0.51."""


def inject(fault: str, engine, monkeypatch) -> None:
    import kvshare.connector.worker as worker_module

    if fault == "keys-not-rerotated":
        monkeypatch.setattr(worker_module, "rerotate_keys", lambda keys, delta, inv_freq: keys)
        return
    load_runs = engine.worker._load_runs

    def another_models(spec, kv, pending, missing):
        """Same-shaped KV this model never produced: each layer gets another's rows."""
        before = pending.clone()
        load_runs(spec, kv, pending, missing)
        rows = (before & ~pending).nonzero().flatten()
        kv.keys[:, rows] = kv.keys[:, rows].roll(1, dims=0)
        kv.values[:, rows] = kv.values[:, rows].roll(1, dims=0)

    monkeypatch.setattr(engine.worker, "_load_runs", another_models)


@pytest.mark.engine
@pytest.mark.parametrize("fault", FAULTS)
def test_a_fill_fault_trips_the_gate_and_claims_stop(engine, checked, scheduler_stats,
                                                      report_tokens, fault):
    tenant, base = f"gate-{fault}", report_tokens[400:1000]
    engine.run(base, tenant)
    engine.settle()
    extra = report_tokens[1100:1200]
    with pytest.MonkeyPatch.context() as faulty:
        inject(fault, engine, faulty)
        for sampled_requests in range(1, 21):
            at = 10 + 5 * sampled_requests
            out = engine.run(insert_at(base, at, extra[at % 50:at % 50 + FAULT_SHIFT]),
                             tenant)
            assert report(out)["claimed"] > 0 and report(out)["shadow"] is True
            deliver(engine)
            if not checked.is_open(tenant):
                break
        assert not checked.is_open(tenant), "20 sampled requests did not trip the gate"
        assert checked.scores()["scopes"][tenant]["score"] < checked.settings.floor
        print(f"{fault}: gate closed after {sampled_requests} sampled requests; "
              f"{checked.scores()['scopes'][tenant]}")
        # Claims stop; the answer is full compute's (a fresh tenant: nothing to reuse).
        prompt = insert_at(base, 7, extra[60:66])
        stopped = engine.run(prompt, tenant)
        fresh = engine.run(prompt, tenant + "-fresh")
        assert report(stopped) == {"claimed": 0, "loaded": 0, "recomputed": 0, "reused": 0,
                                   "fallback": False, "sources": 0, "depth": 0,
                                   "source_depth": 0, "gate": "closed", "shadow": True}
        assert stopped.num_cached_tokens == 0 == fresh.num_cached_tokens
        assert stopped.outputs[0].token_ids == fresh.outputs[0].token_ids
        deliver(engine)  # its check (the claim it withheld) ran with the fault: still closed
        assert not checked.is_open(tenant)
    counts = scheduler_stats()  # vLLM's stats path: the scheduler half's quality counts
    scope = checked.scores()["scopes"][tenant]
    assert counts["shadow_checks"] == checked.scores()["model"]["checks"] >= scope["checks"]
    assert counts["shadow_failures"] >= checked.settings.min_checks
    assert counts["gate_closures"] >= 1 and counts["loads"] == 0


@pytest.mark.engine
def test_the_gate_reopens_after_passing_checks(engine, checked, report_tokens, monkeypatch):
    tenant, base = "gate-reopens", report_tokens[300:900]
    engine.run(base, tenant)
    engine.settle()
    extra = report_tokens[1200:1300]
    with pytest.MonkeyPatch.context() as faulty:
        inject(FAULTS[0], engine, faulty)
        for at in range(20, 80, 3):
            engine.run(insert_at(base, at, extra[:FAULT_SHIFT]), tenant)
            deliver(engine)
            if not checked.is_open(tenant):
                break
        assert not checked.is_open(tenant)
    # The fault is gone: each withheld claim's check passes.
    for i in range(checked.settings.reopen_checks):
        out = engine.run(insert_at(base, 90 + i, extra[10 + i:15 + i]), tenant)
        assert report(out)["claimed"] == 0 and report(out)["gate"] == "closed"
        deliver(engine)
    assert checked.is_open(tenant)
    again = engine.run(insert_at(base, 100, extra[30:35]), tenant)
    assert report(again)["claimed"] > 0 and report(again)["gate"] == "open"
    assert not report(again)["fallback"]


@pytest.mark.engine
def test_a_shadow_check_never_delays_the_request_it_samples(engine, checked, report_tokens,
                                                             monkeypatch):
    tenant, base = "gate-no-delay", report_tokens[200:800]
    engine.run(base, tenant)
    engine.settle()
    checker = engine.worker.shadow
    check, started, release = checker._check, threading.Event(), threading.Event()

    def held(shadow, before_layer):
        started.set()
        release.wait()
        return check(shadow, before_layer)

    monkeypatch.setattr(checker, "_check", held)
    out = engine.run(insert_at(base, 50, report_tokens[10:16]), tenant)
    # The request is answered; its check is held before it computed anything.
    started.wait()
    assert not release.is_set() and checker.take_results() == []
    stats = report(out)
    assert stats["shadow"] is True and stats["gate"] == "open" and stats["claimed"] > 0
    assert stats["source_depth"] == 0 and stats["depth"] == 1
    assert {"loaded", "reused", "recomputed", "fallback", "seconds", "load_seconds",
            "sources"} <= stats.keys()
    release.set()
    deliver(engine)
    scope = checked.scores()["scopes"][tenant]
    assert scope["checks"] == 1 and scope["score"] == 1.0, scope
    print(f"a normal fill's check: {scope}")


@pytest.mark.engine
def test_the_checks_model_reproduces_vllms_prefill(engine, report_tokens):
    """Full compute on the checks' own model (transformers' copy, torch SDPA) is vLLM's
    prefill up to bf16 rounding: its K/V match what vLLM wrote (read back from the stored
    chunks) within ``rel_kv`` per layer, its next token is vLLM's first output token, and
    its log-probabilities of vLLM's 20 most likely first tokens are vLLM's within
    ``logprob_nats`` (both compute bf16 logits: at magnitudes 16 to 32 one bf16 step is
    0.125; measured up to 0.23 nats)."""
    from kvshare.connector.shadow import forward_positions
    from kvshare.recompute.engine import PromptKV
    from kvshare.storage.keys import chunk_keys

    rel_kv, logprob_nats = 0.05, 0.5
    prompt, tenant = report_tokens[900:1156], "checks-model"
    out = engine.run(prompt, tenant, max_tokens=1, logprobs=20)
    engine.settle()
    [chunk] = engine.worker.saves.get(chunk_keys(engine.model_id, prompt, 256, scope=tenant))
    model = engine.worker._reference_model()
    kv = PromptKV.empty(model, len(prompt))
    with torch.inference_mode():
        logits = forward_positions(model, prompt, kv, 0, 1, lambda layer: None)
    for got, want in ((kv.keys, chunk.kv[:, 0]), (kv.values, chunk.kv[:, 1])):
        error = ((got.float() - want.float()).flatten(1).norm(dim=1)
                 / want.float().flatten(1).norm(dim=1))
        assert float(error.max()) < rel_kv, error
    first = out.outputs[0]
    assert int(logits[-1].argmax()) == first.token_ids[0]
    vllm_logprobs = {token: p.logprob for token, p in first.logprobs[0].items()}
    ours = logits[-1].log_softmax(-1)
    gaps = {token: abs(float(ours[token]) - logprob) for token, logprob in vllm_logprobs.items()}
    print(f"K/V relative error max {float(error.max()):.4f}; top-20 log-prob gap max "
          f"{max(gaps.values()):.4f} nats")
    assert max(gaps.values()) < logprob_nats, gaps
