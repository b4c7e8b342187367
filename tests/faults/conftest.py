"""The fault matrix: kvshare under faults, with a real vLLM engine, a real redis-server
and real LanceDB; mocks only inject the faults.

For every case: each request gets the answer full compute gives under the same settings
(a fresh tenant is full compute; ``rho=1.0`` is full compute with the same split where
the fill reads chunks), vLLM keeps serving, nothing stored before the fault is lost,
and one log line names the fault (no traceback storm).

| case | test (in tests/faults unless a path is given) |
|---|---|
| Redis stopped, restarted mid-stream | test_tiers.py::test_redis_stopped_and_restarted_mid_stream |
| disk full (ENOSPC) | test_tiers.py::test_disk_full |
| read-only disk (EROFS) | test_tiers.py::test_read_only_disk |
| truncated chunk file | test_tiers.py::test_damaged_chunk_file[truncated] |
| bit-flipped chunk file | test_tiers.py::test_damaged_chunk_file[bit-flipped] |
| evicted between lookup and load | test_tiers.py::test_chunk_evicted_between_lookup_and_load |
| a tier slower than its timeout | test_tiers.py::test_a_tier_slower_than_its_timeout |
| LanceDB directory damaged at start-up | test_restart.py::test_damaged_index_at_start_up |
| index vs tiers after a crash | test_restart.py::test_index_and_tiers_disagree_after_a_crash |
| the same check with Redis down | test_start_up_check.py (no engine: the check alone) |
| preemption during a load | test_requests.py::test_preemption_during_a_load |
| abort during a load | test_requests.py::test_abort_during_a_load |
| daemon killed and restarted | tests/remote/test_shared_engines.py (needs servers of its own) |
| preemption, abort during a decode correction | test_correction_faults.py |

Beyond those four, each test asserts what its fault must not break: while Redis is down
loads come from the disk and new prompts are stored there, and Redis stores again once
back; a full or read-only disk still serves what it holds and new chunks go to Redis (no
temp file left); a damaged chunk file is dropped, never served, and Redis's copy heals
it; a chunk evicted after the lookup is recomputed and its entry dropped; a fill waits for
a hung disk at most ``get_timeout_s`` and reads Redis, and the disk is read again once
it answers; after a damaged index vLLM starts, the damaged files are kept aside
unchanged and the new index stores and reuses; after a crash the start-up check drops
entries whose chunks are gone and orphaned chunks serve the prompt's next save (and, with
Redis down during that check, it drops nothing); a request aborted while its fill is in
flight, or preempted as soon as it runs, leaves no state, and the rest of the batch gets
its answer.

One in-process engine serves the whole package (``fault_engine``); each test works in
tenants of its own. Its tiers are a disk directory and a private redis-server, both
holding every chunk (write-through), so a fault in one tier shows whether the other
carries the load. The engine starts on a damaged LanceDB index (the start-up case).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "connector"))  # engines
from engines import BUDGET, KV_CACHE_BLOCKS, Engine  # noqa: E402

from kvshare.storage.redis_server import RedisServer  # noqa: E402

EMBED_DIM = 256
"""WordLlama's embedding size: the damaged index must be one the connector would open."""


@dataclass
class FaultEngine(Engine):
    """The package's engine, its Redis, and what happened while it started."""

    redis: RedisServer | None = None
    start_log: list[logging.LogRecord] = field(default_factory=list)
    """kvshare log records (INFO and above) emitted while the engine started."""
    damaged_index: dict[str, bytes] = field(default_factory=dict)
    """The damaged index's files (path relative to the index directory -> bytes) as they
    were when the engine started on them."""

    @property
    def store(self):
        """The worker's chunk store (a ``TieredStore``: disk, then Redis)."""
        return self.worker.store

    def tier(self, name: str):
        return next(tier for tier in self.store.tiers if tier.name == name)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def seed_damaged_index(index_dir: Path) -> dict[str, bytes]:
    """A real index with one entry whose data file is then cut short, as a crash or a
    full disk in the middle of a write leaves it. Returns its files as damaged."""
    from kvshare.storage.index import EntryIndex, IndexEntry, new_entry_id

    with EntryIndex(index_dir, EMBED_DIM) as index:
        index.add([IndexEntry(new_entry_id(), "model", "before-the-crash",
                              np.full(EMBED_DIM, EMBED_DIM ** -0.5), np.arange(64),
                              chunk_keys=["00" * 16])])
    data = next(index_dir.rglob("data/*.lance"))
    data.write_bytes(data.read_bytes()[:64])
    return {str(path.relative_to(index_dir)): path.read_bytes()
            for path in sorted(index_dir.rglob("*")) if path.is_file()}


@pytest.fixture(scope="package")
def fault_engine(tmp_path_factory):
    """One in-process vLLM engine with the connector on disk + Redis, started on a damaged
    index; ``Engine`` explains its sizes and split."""
    from vllm import LLM
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer import kv_transfer_state

    from kvshare.model_assets import resolve_model_dir
    from kvshare.model_identity import model_fingerprint

    redis = RedisServer().start()
    home = tmp_path_factory.mktemp("kvshare-faults")
    damaged = seed_damaged_index(home / "index")
    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "1"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    model = str(resolve_model_dir("smollm2-135m-instruct"))
    extra_config = {"home": str(home), "cpu_bytes": 0, "disk_dir": str(home / "chunks"),
                    "redis_url": redis.url, "share_public_scope": False,
                    "shadow_sample_rate": 0.0}
    # vLLM keeps one worker-side connector per process and keeps the first one made: an
    # engine started earlier in this process (tests/connector) would lend this one its
    # connector. This package's engine gets its own, and the earlier one gets its back.
    earlier_connector = kv_transfer_state._KV_CONNECTOR_AGENT
    kv_transfer_state._KV_CONNECTOR_AGENT = None
    records, kvshare_logger = _Records(), logging.getLogger("kvshare")
    level = kvshare_logger.level
    kvshare_logger.addHandler(records)
    kvshare_logger.setLevel(logging.INFO)
    try:
        llm = LLM(
            model=model, enforce_eager=True, gpu_memory_utilization=0.3, max_model_len=2048,
            max_num_batched_tokens=BUDGET, enable_prefix_caching=True, seed=0,
            kv_cache_memory_bytes=KV_CACHE_BLOCKS * 128 * _bytes_per_token(model),
            kv_transfer_config=KVTransferConfig(
                kv_connector="KVShareConnector", kv_connector_module_path="kvshare.connector",
                kv_role="kv_both", kv_load_failure_policy="recompute",
                kv_connector_extra_config=extra_config))
    finally:
        kvshare_logger.removeHandler(records)
        kvshare_logger.setLevel(level)
    engine = FaultEngine(llm=llm, home=home, chunk_dir=home / "chunks",
                         model_id=model_fingerprint(model, home), redis=redis,
                         start_log=records.records, damaged_index=damaged)
    yield engine
    engine.settle()
    kv_transfer_state._KV_CONNECTOR_AGENT = earlier_connector
    redis.close()


def _bytes_per_token(model_dir: str) -> int:
    import json

    config = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    return config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * head_dim * 2


@pytest.fixture(scope="package")
def text_tokens(tokenizer) -> list[int]:
    """About 1.4k tokens of report-like text to cut prompts from."""
    text = "Summarise the incident log below for the on-call engineer.\n" + " ".join(
        f"Ticket {i}: service {i % 9} returned {500 + i % 4} errors for {3 + 7 * i} seconds "
        f"after deploy {1200 + 13 * i}; {i % 3} customers reported it."
        for i in range(45))
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(autouse=True)
def healthy_tiers(request, caplog):
    """INFO records of the kvshare loggers are captured, and a test on the engine leaves
    its tiers healthy (so the next one's first failure logs its line)."""
    caplog.set_level(logging.INFO, logger="kvshare")
    yield
    if "fault_engine" in request.fixturenames:
        probe = [bytes(16)]
        for tier in request.getfixturevalue("fault_engine").store.tiers:
            tier.contains(probe)  # a call that succeeds marks a recovered tier healthy
