"""FillProgress: which fills advance how far in a step (no engine; fills are generators
that record the layers they ran)."""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from kvshare.connector.fill_progress import FillOutcome, FillProgress
from kvshare.connector.metadata import LoadSpec


def spec(req_id: str, load_async: bool = True) -> LoadSpec:
    return LoadSpec(req_id=req_id, token_ids=[1, 2, 3], block_ids=[0], num_computed=0,
                    num_claimed=2, runs=[], sources={}, rho=0.15, tail_start=2,
                    load_async=load_async)


class Fills:
    """Fills of ``layers`` layers costing ``cost`` token-layers each; ``ran`` records
    (request, layer) in the order they ran, ``fail`` makes a request's first attempt
    (or every attempt) raise at its second layer, ``loads`` holds a future a fill waits
    for before its first layer."""

    def __init__(self, layers: int = 4, cost: int = 100) -> None:
        self.layers, self.cost = layers, cost
        self.ran: list[tuple[str, int, bool]] = []
        self.fail: dict[str, str] = {}
        self.loads: dict[str, Future] = {}

    def start(self, spec: LoadSpec, missing: set[str], fallback: bool):
        if spec.req_id in self.loads:
            yield self.loads[spec.req_id]
            self.loads[spec.req_id].result()
        for layer in range(self.layers):
            mode = self.fail.get(spec.req_id)
            if layer == 1 and (mode == "always" or (mode == "once" and not fallback)):
                raise RuntimeError("injected fill failure")
            self.ran.append((spec.req_id, layer, fallback))
            yield self.cost
        return FillOutcome(loaded=2 * (not fallback), recomputed=2 if fallback else 1,
                           load_seconds=0.0)


def test_async_fills_share_the_budget_oldest_first_in_whole_layers():
    fills = Fills()
    progress = FillProgress(fills.start)
    progress.add(spec("a"))
    progress.add(spec("b"))
    assert progress.advance(250) == []
    assert fills.ran == [("a", 0, False), ("a", 1, False), ("a", 2, False)]
    assert progress.last_step_work == 300  # the layer that crossed the budget ran whole
    done = progress.advance(250)
    assert [d.spec.req_id for d in done] == ["a"] and done[0].outcome.loaded == 2
    assert fills.ran[3:] == [("a", 3, False), ("b", 0, False), ("b", 1, False)]
    assert progress.in_flight == ["b"]


def test_a_synchronous_fill_ends_in_its_step_whatever_the_budget():
    fills = Fills()
    progress = FillProgress(fills.start)
    progress.add(spec("async"))
    progress.add(spec("sync", load_async=False))
    done = progress.advance(1)
    assert [d.spec.req_id for d in done] == ["sync"]
    assert [layer for req, layer, _ in fills.ran if req == "sync"] == [0, 1, 2, 3]
    assert [layer for req, layer, _ in fills.ran if req == "async"] == [0]


def test_a_fill_waiting_for_its_loads_is_passed_over():
    fills = Fills()
    fills.loads["a"] = Future()
    progress = FillProgress(fills.start)
    progress.add(spec("a"))
    progress.add(spec("b"))
    progress.advance(150)
    assert {req for req, _, _ in fills.ran} == {"b"}
    fills.loads["a"].set_result(None)
    progress.advance(150)
    assert ("a", 0, False) in fills.ran


def test_a_failing_fill_restarts_as_a_full_recompute_then_reports_a_failure():
    fills = Fills()
    fills.fail = {"once": "once", "always": "always"}
    progress = FillProgress(fills.start)
    progress.add(spec("once", load_async=False))
    progress.add(spec("always", load_async=False))
    done = {d.spec.req_id: d for d in progress.advance(100)}
    assert done["once"].fallback and done["once"].outcome.recomputed == 2
    assert done["always"].outcome is None
    assert progress.in_flight == []


def test_a_dropped_fill_never_runs_again():
    fills = Fills()
    progress = FillProgress(fills.start)
    progress.add(spec("a"))
    progress.advance(100)
    assert progress.drop({"a", "unknown"}) == {"a"}
    assert progress.advance(1000) == [] and progress.last_step_work == 0
    assert fills.ran == [("a", 0, False)]


@pytest.mark.parametrize("budget", [1, 99, 100])
def test_every_step_runs_at_least_one_layer(budget):
    fills = Fills()
    progress = FillProgress(fills.start)
    progress.add(spec("a"))
    progress.advance(budget)
    assert fills.ran == [("a", 0, False)]


def test_without_a_budget_every_fill_runs_to_its_end():
    fills = Fills()
    fills.loads["b"] = Future()
    fills.loads["b"].set_result(None)
    progress = FillProgress(fills.start)
    progress.add(spec("a"))
    progress.add(spec("b"))
    assert [d.spec.req_id for d in progress.advance(None)] == ["a", "b"]
    assert len(fills.ran) == 8 and progress.in_flight == []
