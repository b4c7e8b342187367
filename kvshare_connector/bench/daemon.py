"""``kvshare bench daemon``: the shared daemon against the embedded cache, same index and KV.

One *op* is what a connector does for a request that hits: a lookup of a prompt (embed,
search, align, plan), then a fetch of the chunks its plan reads, each verified against
its entry (``fetch_entry_chunks``, as the worker does before it copies rows into vLLM's
blocks; that copy costs the same in both modes and is not timed).

* index: ``--entries`` real ShareGPT first turns (at most ``--max-tokens`` tokens each);
* queries: ``--queries`` edited copies (a few words swapped) of indexed prompts of at
  least 256 tokens, so every lookup plans reuse;
* KV: synthetic bf16 chunks in SmolLM2's layout (30 layers, 3 KV heads, head dim 64:
  23,040 bytes a token) for every entry, in the CPU tier only (disk and Redis off: the
  bench measures the daemon's transport, not a disk). 1,000 entries of up to 512 tokens
  hold about 3.7 GiB of KV, in each mode's CPU tier in turn.

Embedded: ``LocalCatalog`` + tiered store in this process. Remote: a ``kvshare daemon``
subprocess on ``ipc://`` (a home of its own) that is given the same chunks (``put``) and
then the same entries (``commit``), asked by ``RemoteCatalog`` + ``RemoteStore``.
``remote_vs_embedded_latency_ratio`` is remote p50 / embedded p50 of one op.
Throughput: 1, 2 and 4 client processes loop ops against the daemon for ``--seconds``
each; ``clients_N_ops_per_s`` counts the ops all N completed per second.

Remote fetches read the daemon's shared-memory CPU tier in place (``remote_fetch``:
``shared memory``); ``--socket`` makes the clients receive every chunk through the
socket instead, as TCP clients do.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from kvshare.config import KVShareConfig
from kvshare.storage.chunk import KVChunk, KVLayout, split_prompt_kv

SMOLLM2_LAYOUT = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype=torch.bfloat16)
MIN_QUERY_TOKENS = 256
MODEL_ID = "bench-daemon"
SETUP_TIMEOUT_MS = 120_000
"""Filling the daemon moves gigabytes; only the timed ops use the config's timeout."""

Query = tuple[str, list[int]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--entries", type=int, default=1000, metavar="N",
                        help="ShareGPT prompts in the index (default: 1000)")
    parser.add_argument("--queries", type=int, default=50, metavar="Q",
                        help="distinct similar prompts looked up (default: 50)")
    parser.add_argument("--ops", type=int, default=200, metavar="K",
                        help="timed lookup + fetch ops per mode (default: 200)")
    parser.add_argument("--max-tokens", type=int, default=512, metavar="T",
                        help="prompt tokens kept per entry and query (default: 512)")
    parser.add_argument("--clients", default="1,2,4", metavar="N,N",
                        help="client process counts for the throughput runs (default: 1,2,4)")
    parser.add_argument("--seconds", type=float, default=8.0, metavar="S",
                        help="duration of each throughput run (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed for picks and edits")
    parser.add_argument("--socket", action="store_true",
                        help="remote clients receive chunks through the socket instead of "
                             "reading the daemon's shared memory")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON")


# ---------------------------------------------------------------------- one op
def lookup_and_fetch(catalog, store, query: Query, chunk_tokens: int) -> int:
    """One op: the lookup, then every chunk its plan reads, verified. Returns tokens whose
    KV was fetched (chunk tokens, so a partly read chunk counts whole)."""
    from kvshare.storage.commit import fetch_entry_chunks

    text, ids = query
    result = catalog.lookup(MODEL_ID, text, ids, "")
    entries = result.entries
    fetched = 0
    for entry_id, chunks in planned_chunks(result.plan, chunk_tokens).items():
        entry = entries[entry_id]
        held = fetch_entry_chunks(store, [bytes.fromhex(k) for k in entry.chunk_keys],
                                  entry.token_ids, chunk_tokens, SMOLLM2_LAYOUT, chunks)
        if len(held) != len(chunks):
            raise RuntimeError(f"entry {entry_id}: {len(chunks) - len(held)} planned chunks "
                               "missing; the bench stores every planned chunk")
        fetched += sum(chunk.header.num_tokens for chunk in held.values())
    return fetched


def planned_chunks(plan, chunk_tokens: int) -> dict[str, list[int]]:
    """Entry id -> indices of the chunks the plan's runs read from it."""
    needed: dict[str, set[int]] = {}
    for run in plan.runs:
        first = run.src_start // chunk_tokens
        last = (run.src_start + run.length - 1) // chunk_tokens
        needed.setdefault(run.entry_id, set()).update(range(first, last + 1))
    return {entry_id: sorted(indices) for entry_id, indices in needed.items()}


def time_ops(catalog, store, queries: list[Query], ops: int, chunk_tokens: int, desc: str
             ) -> tuple[np.ndarray, int]:
    """Seconds of each of ``ops`` ops (queries round robin, after one warm-up pass), and
    the tokens fetched in them."""
    from tqdm import tqdm

    for query in queries:
        lookup_and_fetch(catalog, store, query, chunk_tokens)
    seconds, tokens = [], 0
    for i in tqdm(range(ops), desc=desc, unit="op"):
        started = time.perf_counter()
        tokens += lookup_and_fetch(catalog, store, queries[i % len(queries)], chunk_tokens)
        seconds.append(time.perf_counter() - started)
    return np.array(seconds), tokens


# ---------------------------------------------------------------------- set-up
def build_workload(config: KVShareConfig, args: argparse.Namespace):
    """(index entries, queries) from real ShareGPT prompts."""
    from kvshare.bench.lookup import edit_text
    from kvshare.bench.workload import load_workload
    from kvshare.matching.embedder import make_embedder
    from kvshare.model_assets import load_tokenizer
    from kvshare.storage.index import IndexEntry, new_entry_id
    from kvshare.storage.keys import chunk_keys

    tokenizer = load_tokenizer(config.model)
    embedder = make_embedder(config.embedder, config.embed_max_chars)
    workload = load_workload(config, embedder, tokenizer)
    if len(workload) < args.entries:
        raise SystemExit(f"--entries {args.entries}: ShareGPT has {len(workload)} prompts")
    entries = []
    for position in range(args.entries):
        ids = workload.token_ids[position][:args.max_tokens]
        entry_id = new_entry_id()
        keys = chunk_keys(MODEL_ID, ids, config.chunk_tokens, scope="", variant=entry_id)
        entries.append(IndexEntry(entry_id, MODEL_ID, "", workload.embeddings[position], ids,
                                  workload.texts[position], [key.hex() for key in keys]))
    rng = random.Random(args.seed)
    long_ones = [i for i, e in enumerate(entries) if e.num_tokens >= MIN_QUERY_TOKENS]
    if not long_ones:
        raise SystemExit(f"no indexed prompt has >= {MIN_QUERY_TOKENS} tokens; raise --entries")
    queries: list[Query] = []
    for position in rng.choices(long_ones, k=args.queries):
        text = edit_text(workload.texts[position], rng)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:args.max_tokens]
        queries.append((text, ids))
    return entries, queries, embedder


def synthetic_chunks(entries, chunk_tokens: int, seed: int) -> list[KVChunk]:
    """Every chunk of ``entries``, keyed and headed as the connector stores them.

    Their KV is random bf16, and every chunk's tensor is a contiguous view of ONE buffer
    of ``chunk_tokens`` tokens (the values do not change what the CPU tier and the socket
    cost; the tiers copy what they store): 1,000 prompts' chunks would take gigabytes here.
    """
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randn(SMOLLM2_LAYOUT.shape(chunk_tokens), generator=gen
                         ).to(torch.bfloat16).reshape(-1)
    chunks = []
    for entry in entries:
        placeholder = torch.empty(SMOLLM2_LAYOUT.shape(entry.num_tokens), dtype=torch.bfloat16)
        for c in split_prompt_kv(MODEL_ID, placeholder, entry.token_ids, chunk_tokens,
                                 scope="", variant=entry.entry_id):
            kv = shared[:c.kv.numel()].view(c.header.shape)
            chunks.append(KVChunk(c.header, kv))
    return chunks


# ---------------------------------------------------------------------- the daemon
class DaemonProcess:
    """``kvshare daemon`` in a subprocess, with the bench's config."""

    def __init__(self, config: KVShareConfig) -> None:
        path = config.home_dir / "daemon.yaml"
        path.write_text(yaml.safe_dump(config.to_dict()))
        self.log = config.home_dir / "daemon.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "kvshare.cli", "daemon",
                                          "--config", str(path)],
                                         stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, client, timeout_s: float = 120.0) -> None:
        from kvshare.remote.client import DaemonUnavailable

        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"kvshare daemon exited ({self.proc.returncode}); see {self.log}")
            try:
                client.ping(timeout_ms=250)
                return
            except DaemonUnavailable:
                if time.monotonic() > deadline:
                    raise SystemExit(f"kvshare daemon not up after {timeout_s:.0f} s; "
                                     f"see {self.log}") from None

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)


def _client_loop(config: KVShareConfig, queries: list[Query], seconds: float,
                 shared_memory: bool, start: multiprocessing.Event,
                 done: multiprocessing.Queue) -> None:
    """One throughput client: warm up, wait for the common start, loop ops."""
    from kvshare.remote.client import RemoteCatalog, RemoteStore

    catalog = RemoteCatalog.connect(config)
    store = RemoteStore.connect(config, shared_memory=shared_memory)
    for query in queries[:3]:
        lookup_and_fetch(catalog, store, query, config.chunk_tokens)
    done.put(None)  # ready
    start.wait()
    ops, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        lookup_and_fetch(catalog, store, queries[ops % len(queries)], config.chunk_tokens)
        ops += 1
    done.put((ops, time.perf_counter() - began))
    catalog.close()
    store.close()


def throughput(config: KVShareConfig, queries: list[Query], clients: int, seconds: float,
               seed: int, shared_memory: bool) -> float:
    """Ops per second ``clients`` processes complete together."""
    ctx = multiprocessing.get_context("spawn")
    start, done = ctx.Event(), ctx.Queue()
    procs = []
    for n in range(clients):
        shuffled = random.Random(seed + n).sample(queries, len(queries))
        proc = ctx.Process(target=_client_loop, args=(config, shuffled, seconds, shared_memory,
                                                         start, done))
        proc.start()
        procs.append(proc)
    for _ in procs:
        done.get(timeout=300)
    start.set()
    results = [done.get(timeout=seconds + 300) for _ in procs]
    for proc in procs:
        proc.join()
    return sum(ops / elapsed for ops, elapsed in results)


# ---------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from kvshare.catalog import LocalCatalog
    from kvshare.remote.client import DaemonClient, RemoteCatalog, RemoteStore
    from kvshare.tiers_setup import build_store

    clients = [int(n) for n in args.clients.split(",")]
    if min(args.entries, args.queries, args.ops, *clients) < 1 or args.seconds <= 0:
        raise SystemExit("--entries, --queries, --ops, --clients and --seconds must be > 0")
    base = KVShareConfig.load(args.config)
    home = base.home_dir / "bench" / "daemon"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    entries, queries, embedder = build_workload(base, args)
    chunks = synthetic_chunks(entries, base.chunk_tokens, args.seed)
    kv_bytes = sum(chunk.nbytes for chunk in chunks)
    configs = {mode: dataclasses.replace(
        base, home=str(home / mode), disk_dir="none", redis_url="", metrics_port=0,
        daemon_address="", mode=mode, cpu_bytes=max(base.cpu_bytes, kv_bytes + (1 << 30)))
        for mode in ("embedded", "remote")}

    # Embedded: index and tiers in this process.
    config = configs["embedded"]
    catalog, store = LocalCatalog(config, embedder), build_store(config)
    store.put(chunks)
    catalog.commit(entries, SMOLLM2_LAYOUT.bytes_per_token())
    embedded_s, fetched_tokens = time_ops(catalog, store, queries, args.ops,
                                          config.chunk_tokens, "embedded")
    catalog.close()
    store.close()

    # Remote: a daemon gets the same chunks, then the same entries.
    config = configs["remote"]
    Path(config.home).mkdir(parents=True)
    daemon = DaemonProcess(config)
    shared_memory = not args.socket
    rcatalog = RemoteCatalog.connect(config)
    rstore = RemoteStore.connect(config, shared_memory=shared_memory)
    setup = DaemonClient(config.daemon_endpoint, timeout_ms=SETUP_TIMEOUT_MS)
    try:
        daemon.wait_ready(setup)
        for start in tqdm(range(0, len(chunks), 8), desc="fill the daemon", unit="batch"):
            if not all(RemoteStore(setup).put(chunks[start:start + 8])):
                raise SystemExit(f"the daemon did not store the bench's chunks; see {daemon.log}")
        for start in range(0, len(entries), 256):
            RemoteCatalog(setup).commit(entries[start:start + 256],
                                        SMOLLM2_LAYOUT.bytes_per_token())
        remote_s, _ = time_ops(rcatalog, rstore, queries, args.ops, config.chunk_tokens,
                               "remote")
        if shared_memory and rstore.arena_path is None:
            raise SystemExit(f"remote fetches did not read the daemon's shared memory (no "
                             f"room under /dev/shm?); see {daemon.log}, or pass --socket")
        ops_per_s = {n: throughput(config, queries, n, args.seconds, args.seed, shared_memory)
                     for n in clients}
    finally:
        for closable in (rcatalog, rstore, setup):
            closable.close()
        daemon.stop()

    result = {
        "entries": args.entries,
        "queries": args.queries,
        "ops": args.ops,
        "kv_gib": kv_bytes / 2**30,
        "mean_fetched_tokens": fetched_tokens / args.ops,
        "mean_fetched_mib": fetched_tokens * SMOLLM2_LAYOUT.bytes_per_token() / args.ops / 2**20,
        "daemon_threads": config.daemon_threads,
        "remote_fetch": "shared memory" if shared_memory else "socket",
        "embedded_p50_ms": float(np.percentile(embedded_s, 50) * 1e3),
        "embedded_p99_ms": float(np.percentile(embedded_s, 99) * 1e3),
        "remote_p50_ms": float(np.percentile(remote_s, 50) * 1e3),
        "remote_p99_ms": float(np.percentile(remote_s, 99) * 1e3),
        "throughput_seconds": args.seconds,
    }
    result["remote_vs_embedded_latency_ratio"] = (result["remote_p50_ms"]
                                                  / result["embedded_p50_ms"])
    for n, rate in ops_per_s.items():
        result[f"clients_{n}_ops_per_s"] = rate
    _print(result, ops_per_s)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"JSON written to {args.json}")
    return 0


def _print(result: dict, ops_per_s: dict[int, float]) -> None:
    print(f"{result['entries']} entries, {result['queries']} similar prompts, "
          f"{result['ops']} ops per mode; a fetch reads {result['mean_fetched_tokens']:.0f} "
          f"tokens ({result['mean_fetched_mib']:.1f} MiB) on average; daemon threads: "
          f"{result['daemon_threads']}; remote fetch through {result['remote_fetch']}")
    print("| lookup + fetch | p50 ms | p99 ms |\n|---|---:|---:|")
    for mode in ("embedded", "remote"):
        print(f"| {mode} | {result[f'{mode}_p50_ms']:.2f} | {result[f'{mode}_p99_ms']:.2f} |")
    print(f"remote / embedded p50: {result['remote_vs_embedded_latency_ratio']:.2f}x")
    print("| clients | ops/s |\n|---:|---:|")
    for n, rate in ops_per_s.items():
        print(f"| {n} | {rate:.1f} |")
