"""``kvshare demo``: replay real similar ShareGPT prompts and show what kvshare reuses.

Runs on the embedded default (index in ``<home>/demo``, rebuilt each run so the table
always starts from a cold cache) and prints, per request, how many prompt tokens vLLM's
prefix cache would reuse and how many kvshare's plan reuses, from how many earlier
prompts, and the lookup time. Once the connector lands this also drives vLLM.
"""

from __future__ import annotations

import argparse
import shutil

import numpy as np

from kvshare.config import KVShareConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=40, metavar="N",
                        help="similar-stream requests to replay (default: 40)")


def run(args: argparse.Namespace) -> int:
    from kvshare.bench.policies import KVSharePolicy, PrefixCachePolicy, Request
    from kvshare.bench.workload import load_workload
    from kvshare.matching.embedder import make_embedder
    from kvshare.matching.matcher import Matcher
    from kvshare.model_assets import load_tokenizer
    from kvshare.storage.index import EntryIndex

    if args.requests < 1:
        raise SystemExit(f"--requests must be >= 1, got {args.requests}")
    config = KVShareConfig.load(args.config)
    print(f"kvshare demo: model {config.model}, embedder {config.embedder}, "
          f"home {config.home_dir}")
    tokenizer = load_tokenizer(config.model)
    embedder = make_embedder(config.embedder, config.embed_max_chars)
    workload = load_workload(config, embedder, tokenizer)
    positions = workload.similar_positions()[: args.requests]

    demo_dir = config.home_dir / "demo"
    shutil.rmtree(demo_dir, ignore_errors=True)
    index = EntryIndex(demo_dir, embedder.dim, ann_min_rows=config.ann_index_min_rows,
                       flush_rows=config.index_flush_rows)
    kvshare = KVSharePolicy(Matcher.from_config(config, index, embedder, config.model))
    prefix = PrefixCachePolicy(16)

    header = (f"{'#':>3} {'tokens':>6} {'prefix':>7} {'kvshare':>8} {'sources':>7} "
              f"{'lookup':>8}  prompt")
    print(header)
    print("-" * len(header))
    totals = np.zeros(3, np.int64)
    for i, position in enumerate(positions):
        request = Request(i, workload.texts[position], workload.token_ids[position])
        n = len(request.token_ids)
        by_prefix = prefix.reuse(request)
        by_kvshare = kvshare.reuse(request)
        sources = len(kvshare.last_result.plan.source_entries)
        for policy in (prefix, kvshare):
            policy.remember(request)
        totals += (n, by_prefix, by_kvshare)
        preview = " ".join(request.text.split())[:48]
        print(f"{i:>3} {n:>6} {by_prefix / n:>7.0%} {by_kvshare / n:>8.0%} {sources:>7} "
              f"{kvshare.lookup_ms[-1]:>6.1f}ms  {preview}")
    index.close()
    lookups = np.array(kvshare.lookup_ms)
    print()
    print("| requests | prompt tokens | prefix caching reuses | kvshare reuses | lookup p50 |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {len(positions)} | {totals[0]} | {totals[1] / totals[0]:.1%} | "
          f"{totals[2] / totals[0]:.1%} | {np.percentile(lookups, 50):.2f} ms |")
    return 0
