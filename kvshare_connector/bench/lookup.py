"""``kvshare bench lookup``: lookup latency (embed + search + align) with a large index.

The index is filled with real ShareGPT prompts; past the ~10.7k distinct prompts of
>= 16 tokens it holds edited copies of them (a few words swapped per copy), which is
what a multi-tenant cache full of templated prompts looks like. Queries are further
edited copies of indexed prompts, so every lookup finds candidates and aligns them.

``open_s`` is how long ``EntryIndex(...)`` takes to open the index kept from an earlier
run (read the rows, build the RAM mirror and the vector partitions); on the first run it
opens an empty directory and ``fill_s`` is the fill.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np

from kvshare.config import KVShareConfig

EDIT_WORDS = ("alpha", "Berlin", "2023", "Jon Snow", "Lin Daiyu", "invoice", "42", "quickly")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--entries", type=int, default=100_000, metavar="N",
                        help="prompts in the index (default: 100000)")
    parser.add_argument("--queries", type=int, default=1000, metavar="Q",
                        help="lookups to time (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the edits (default: 0)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON")


def edit_text(text: str, rng: random.Random, edits: int = 3) -> str:
    """Swap ``edits`` words for others: a realistic near-duplicate of a template prompt."""
    words = text.split(" ")
    for _ in range(edits):
        words[rng.randrange(len(words))] = rng.choice(EDIT_WORDS)
    return " ".join(words)


def fill_index(index, workload, embedder, tokenizer, model_id: str, entries: int,
               rng: random.Random, batch: int = 2048) -> None:
    """Add ``entries`` prompts: the workload's originals first, then edited copies."""
    from tqdm import tqdm

    from kvshare.storage.index import IndexEntry, new_entry_id

    base = len(workload)
    for start in tqdm(range(0, entries, batch), desc="fill index", unit="batch"):
        positions = range(start, min(start + batch, entries))
        if positions[-1] < base:  # originals: embeddings and tokens already known
            embeddings = workload.embeddings[list(positions)]
            token_ids = [workload.token_ids[p] for p in positions]
            texts = [workload.texts[p] for p in positions]
        else:
            texts = [workload.texts[p % base] if p < base else
                     edit_text(workload.texts[p % base], rng) for p in positions]
            embeddings = embedder.embed(texts)
            token_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        index.add([
            IndexEntry(new_entry_id(), model_id, "", embedding, tokens, text)
            for embedding, tokens, text in zip(embeddings, token_ids, texts)
        ])
    index.flush()


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from kvshare.bench.workload import load_workload
    from kvshare.matching.embedder import make_embedder
    from kvshare.matching.matcher import Matcher
    from kvshare.model_assets import load_tokenizer
    from kvshare.storage.index import EntryIndex

    if args.entries < 1 or args.queries < 1:
        raise SystemExit(
            f"--entries and --queries must be >= 1, got {args.entries}, {args.queries}")
    config = KVShareConfig.load(args.config)
    tokenizer = load_tokenizer(config.model)
    embedder = make_embedder(config.embedder, config.embed_max_chars)
    workload = load_workload(config, embedder, tokenizer)
    base = len(workload)
    index_dir = config.home_dir / "bench" / f"lookup-{args.entries}-seed{args.seed}"
    started = time.perf_counter()
    index = EntryIndex(index_dir, embedder.dim, ann_min_rows=config.ann_index_min_rows,
                       flush_rows=config.index_flush_rows)
    open_s = time.perf_counter() - started
    fill_s = None
    if len(index) != args.entries:  # first run (or an interrupted one): fill it
        started = time.perf_counter()
        index.delete([e.entry_id for e in index.entries()])
        fill_index(index, workload, embedder, tokenizer, config.model, args.entries,
                   random.Random(args.seed))
        fill_s = time.perf_counter() - started

    rng = random.Random(args.seed + 1)
    matcher = Matcher.from_config(config, index, embedder, model_id=config.model)
    queries = [edit_text(workload.texts[rng.randrange(base)], rng) for _ in range(args.queries)]
    query_tokens = tokenizer(queries, add_special_tokens=False)["input_ids"]
    for text, tokens in zip(queries[:20], query_tokens[:20]):  # warm caches and code paths
        matcher.lookup(text, tokens)
    timings = np.array([
        (r.embed_ms, r.search_ms, r.align_ms, r.total_ms, r.plan.reuse_fraction)
        for r in (matcher.lookup(text, tokens) for text, tokens in
                  tqdm(zip(queries, query_tokens), total=len(queries), desc="lookups"))
    ])
    stats = index.stats()
    index.close()

    def pct(column: int, q: float) -> float:
        return float(np.percentile(timings[:, column], q))

    result = {
        "entries": args.entries,
        "queries": args.queries,
        "ann": any(p["ann"] for p in stats["partitions"].values()),
        "open_s": open_s,
        "fill_s": fill_s,
        "lookup_p50_ms": pct(3, 50),
        "lookup_p99_ms": pct(3, 99),
        "embed_p50_ms": pct(0, 50),
        "search_p50_ms": pct(1, 50),
        "search_p99_ms": pct(1, 99),
        "align_p50_ms": pct(2, 50),
        "align_p99_ms": pct(2, 99),
        "mean_query_tokens": float(np.mean([len(t) for t in query_tokens])),
        "mean_reuse_fraction": float(timings[:, 4].mean()),
        "top_k": config.top_k,
    }
    print(f"{args.entries} entries (ANN: {result['ann']}), {args.queries} lookups, "
          f"mean query {result['mean_query_tokens']:.0f} tokens, top_k={config.top_k}")
    print(f"index open: {open_s:.1f} s" + (
        f" (then filled in {fill_s:.0f} s)" if fill_s is not None else ""))
    print("| stage | p50 ms | p99 ms |\n|---|---:|---:|")
    for label, column in (("embed", 0), ("search", 1), ("align", 2), ("total", 3)):
        print(f"| {label} | {pct(column, 50):.2f} | {pct(column, 99):.2f} |")
    print(f"mean reuse fraction of the queries: {result['mean_reuse_fraction']:.1%}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"JSON written to {args.json}")
    return 0
