"""What every case of the fault matrix checks (see ``conftest.py``)."""

from __future__ import annotations

import logging
import uuid

from engines import SPLIT


def report(out) -> dict:
    assert out.kv_transfer_params is not None, "no kvshare load report for this request"
    return out.kv_transfer_params["kvshare"]


def full_compute(engine, prompt: list[int], max_tokens: int = 8) -> list[int]:
    """The greedy tokens vLLM computes for ``prompt`` with nothing to reuse: a fresh
    tenant has no entry and no prefix-cache hit. Not stored, so it changes nothing."""
    out = engine.run(prompt, f"full-{uuid.uuid4().hex[:8]}", max_tokens=max_tokens,
                     extra_args={"kvshare_store": 0})
    assert out.kv_transfer_params is None and out.num_cached_tokens == 0
    return list(out.outputs[0].token_ids)


def edit_of(base: list[int], at: int, tokens: list[int]) -> list[int]:
    return base[:at] + tokens + base[at + len(tokens):]


def stored_base(engine, text_tokens: list[int], tenant: str, offset: int) -> list[int]:
    """A ``SPLIT``-token prompt stored (chunks written, entry committed) in ``tenant``.
    Its edits at positions below 128 have no prefix-cache hit, and kvshare claims their
    first ``BUDGET`` tokens: the whole first chunk."""
    base = text_tokens[offset:offset + SPLIT]
    assert len(base) == SPLIT, "text_tokens is too short for this offset"
    engine.run(base, tenant)
    engine.settle()
    assert len(engine.entries(tenant)) == 1
    return base


def fault_lines(records, text: str, level: int = logging.WARNING) -> list[logging.LogRecord]:
    """kvshare log records at ``level`` or above whose message contains ``text``."""
    return [r for r in records if r.name.startswith("kvshare") and r.levelno >= level
            and text in r.getMessage()]


def assert_one_line_names(records, text: str, level: int = logging.WARNING) -> None:
    """Exactly one kvshare line at ``level`` or above names the fault, and no kvshare
    line carries a traceback (a fault the system handles is not a crash)."""
    named = fault_lines(records, text, level)
    assert len(named) == 1, (f"{len(named)} log lines name {text!r}: "
                             f"{[r.getMessage() for r in named]}")
    tracebacks = [r.getMessage() for r in records
                  if r.name.startswith("kvshare") and r.exc_info]
    assert not tracebacks, f"tracebacks logged: {tracebacks}"
