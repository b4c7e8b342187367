"""Faults a restart finds: a damaged LanceDB index, and an index that disagrees with the
tiers after a crash.

The package's engine itself started on a damaged index (``seed_damaged_index``). The
crash case puts the cache in the state a crash leaves (chunks gone that the durable index
still lists; chunks written whose entry never reached the index) and runs the worker's
start-up check of the index against the tiers, as every start runs it.
"""

from __future__ import annotations

import logging

import pytest
from fault_checks import (
    assert_one_line_names,
    edit_of,
    fault_lines,
    full_compute,
    report,
    stored_base,
)

pytestmark = pytest.mark.engine


def test_damaged_index_at_start_up(fault_engine, text_tokens):
    engine = fault_engine
    # One line names the damage, and the start raised nothing.
    assert_one_line_names(engine.start_log, "is damaged", logging.WARNING)
    assert fault_lines(engine.start_log, "is damaged")[0].levelno == logging.ERROR
    # Nothing stored is lost: the damaged directory is kept aside as it was.
    [aside] = engine.home.glob("index.damaged-*")
    kept = {str(path.relative_to(aside)): path.read_bytes()
            for path in sorted(aside.rglob("*")) if path.is_file()}
    assert kept == engine.damaged_index
    # vLLM serves, and the new index stores and reuses.
    tenant = "after-damage"
    base = stored_base(engine, text_tokens, tenant, 180)
    prompt = edit_of(base, 60, text_tokens[1140:1143])
    out = engine.run(prompt, tenant, rho=1.0)
    assert report(out)["loaded"] > 0
    assert list(out.outputs[0].token_ids) == full_compute(engine, prompt)


def test_index_and_tiers_disagree_after_a_crash(fault_engine, text_tokens, caplog):
    engine, tenant = fault_engine, "crash"
    lost = stored_base(engine, text_tokens, tenant, 200)
    orphaned = stored_base(engine, text_tokens, tenant + "-orphan", 220)
    [lost_entry] = engine.entries(tenant)
    [orphan_entry] = engine.entries(tenant + "-orphan")
    # The crash: the tiers lost one entry's chunks, and another's index row was never
    # written although its chunks were.
    engine.store.delete([bytes.fromhex(k) for k in lost_entry.chunk_keys])
    catalog = engine.scheduler.catalog
    catalog.drop([orphan_entry.entry_id])
    catalog.index.flush()  # the durable index the next start reads
    orphan_file = engine.chunk_dir / f"{orphan_entry.chunk_keys[0]}.kvc"
    orphan_inode = orphan_file.stat().st_ino
    # The start-up check, as the worker runs it at every start.
    engine.worker._reconcile()
    prompt = edit_of(lost, 60, text_tokens[1150:1153])
    out = engine.run(prompt, tenant)
    assert out.kv_transfer_params is None or report(out)["loaded"] == 0
    assert list(out.outputs[0].token_ids) == full_compute(engine, prompt)
    engine.settle()
    assert lost_entry.entry_id not in {e.entry_id for e in engine.entries(tenant)}
    assert_one_line_names(caplog.records, "1 index entries lost their chunks")
    # The orphaned chunks serve the prompt's next save: it is indexed again, on them.
    again = engine.run(orphaned, tenant + "-orphan")
    assert list(again.outputs[0].token_ids) == full_compute(engine, orphaned)
    engine.settle()
    [stored_again] = engine.entries(tenant + "-orphan")
    assert stored_again.chunk_keys == orphan_entry.chunk_keys
    assert orphan_file.stat().st_ino == orphan_inode, "the orphaned chunk was written again"
