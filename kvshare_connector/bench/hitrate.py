"""``kvshare bench hitrate``: how much prefill each caching policy avoids on real traffic.

Replays ShareGPT first user turns (see :mod:`kvshare.bench.workload`) through kvshare and
the baselines of :mod:`kvshare.bench.policies`, on identical SmolLM2 token sequences.
Per policy: reused-token fraction (token-weighted), share of requests with >= 90% of
tokens reused (the KVShare paper's Figure 4 metric); for kvshare, lookup latency.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import numpy as np

from kvshare.bench.policies import (
    ChunkHashPolicy,
    KVSharePolicy,
    PrefixCachePolicy,
    Request,
    ResponseCachePolicy,
    ReusePolicy,
    SpanOraclePolicy,
)
from kvshare.bench.workload import Workload, load_workload, nearest_earlier
from kvshare.config import KVShareConfig

logger = logging.getLogger(__name__)

ORACLE_NEIGHBOURS = 20
GPTCACHE_THRESHOLD = 0.8
POLICY_ORDER = ("prefix", "chunk256", "gptcache", "kvshare", "oracle", "oracle_lcs")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=0, metavar="N",
                        help="replay only the first N requests of each stream (default: all)")
    parser.add_argument("--streams", default="similar,all",
                        help="comma-separated streams to replay: similar, all (default: both)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for the index's ANN training sample (default: 0)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON")
    parser.add_argument("--out", type=Path, default=Path("results/hitrate"),
                        help="directory for the markdown table and CDF plot "
                             "(default: results/hitrate)")


def run(args: argparse.Namespace) -> int:
    from kvshare.matching.embedder import make_embedder
    from kvshare.model_assets import load_tokenizer

    if args.requests < 0:
        raise SystemExit(f"--requests must be >= 0, got {args.requests}")
    streams = [s.strip() for s in args.streams.split(",") if s.strip()]
    unknown = set(streams) - {"similar", "all"}
    if unknown:
        raise SystemExit(f"unknown stream(s) {sorted(unknown)}; choose from similar, all")
    config = KVShareConfig.load(args.config)
    embedder = make_embedder(config.embedder, config.embed_max_chars)
    workload = load_workload(config, embedder, load_tokenizer(config.model))
    results = {"streams": {}, "config": {"top_k": config.top_k,
                                         "min_run_tokens": config.min_run_tokens,
                                         "embedder": embedder.name}}
    for stream in streams:
        positions = (workload.similar_positions() if stream == "similar"
                     else np.arange(len(workload)))
        if args.requests:
            positions = positions[: args.requests]
        results["streams"][stream] = replay(workload, positions, config, embedder, stream,
                                             seed=args.seed)

    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    (args.out / "hitrate.md").write_text(table)
    plot_cdf(results, args.out / "hitrate_cdf.png")
    print(table)
    print(f"table and CDF plot written to {args.out}/")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_without_per_request(results), indent=2))
        print(f"JSON written to {args.json}")
    return 0


def replay(workload: Workload, positions: np.ndarray, config: KVShareConfig, embedder,
           stream: str, seed: int = 0) -> dict:
    """Run every policy over the stream; returns per-policy summary and per-request reuse."""
    from tqdm import tqdm

    from kvshare.matching.matcher import Matcher
    from kvshare.storage.index import EntryIndex

    # Neighbours are computed within the stream: a request can only reuse what the
    # stream itself sent before it.
    token_ids = [workload.token_ids[p] for p in positions]
    neighbours, sims = nearest_earlier(workload.embeddings[positions], ORACLE_NEIGHBOURS)
    with tempfile.TemporaryDirectory(prefix="kvshare-hitrate-") as tmp:
        index = EntryIndex(tmp, embedder.dim, ann_min_rows=config.ann_index_min_rows,
                           flush_rows=config.index_flush_rows, seed=seed)
        matcher = Matcher.from_config(config, index, embedder, model_id=config.model)
        kvshare = KVSharePolicy(matcher)
        policies: list[ReusePolicy] = [
            PrefixCachePolicy(16),
            ChunkHashPolicy(256),
            ResponseCachePolicy(sims[:, 0], GPTCACHE_THRESHOLD),
            kvshare,
            SpanOraclePolicy("oracle", neighbours, token_ids),
            SpanOraclePolicy("oracle_lcs", neighbours, token_ids, lcs=True),
        ]
        reused = {p.name: np.zeros(len(positions), np.int64) for p in policies}
        lengths = np.array([len(t) for t in token_ids], np.int64)
        for i, position in enumerate(tqdm(positions, desc=f"replay {stream}", unit="req")):
            request = Request(i, workload.texts[position], token_ids[i])
            for policy in policies:
                reused[policy.name][i] = policy.reuse(request)
                policy.remember(request)
        index.close()
    summary = {name: summarize(reused[name], lengths) for name in reused}
    lookup = np.array(kvshare.lookup_ms)
    summary["kvshare"]["lookup_p50_ms"] = float(np.percentile(lookup, 50)) if lookup.size else 0.0
    summary["kvshare"]["lookup_p99_ms"] = float(np.percentile(lookup, 99)) if lookup.size else 0.0
    summary["gptcache"]["returns_stale_answer"] = True
    return {
        "requests": int(len(positions)),
        "mean_tokens": float(lengths.mean()) if lengths.size else 0.0,
        "policies": summary,
        "per_request": {name: (reused[name] / np.maximum(lengths, 1)).tolist() for name in reused},
    }


def summarize(reused: np.ndarray, lengths: np.ndarray) -> dict:
    fractions = reused / np.maximum(lengths, 1)
    return {
        "reused_token_fraction": float(reused.sum() / max(1, lengths.sum())),
        "frac_requests_ge90": float(np.mean(fractions >= 0.9)) if fractions.size else 0.0,
        "mean_request_reuse": float(fractions.mean()) if fractions.size else 0.0,
    }


def markdown_table(results: dict) -> str:
    lines = []
    for stream, data in results["streams"].items():
        lines.append(f"### stream `{stream}`: {data['requests']} requests, "
                     f"mean {data['mean_tokens']:.0f} tokens\n")
        lines.append("| policy | reused tokens | requests >= 90% reused | lookup p50 / p99 |")
        lines.append("|---|---:|---:|---:|")
        policies = data["policies"]
        for name in POLICY_ORDER:
            if name not in policies:
                continue
            p = policies[name]
            latency = (f"{p['lookup_p50_ms']:.2f} / {p['lookup_p99_ms']:.2f} ms"
                       if "lookup_p50_ms" in p else "")
            label = name + (" (returns an old answer)" if p.get("returns_stale_answer") else "")
            lines.append(f"| {label} | {p['reused_token_fraction']:.1%} | "
                         f"{p['frac_requests_ge90']:.1%} | {latency} |")
        lines.append("")
    return "\n".join(lines)


def plot_cdf(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    streams = results["streams"]
    fig, axes = plt.subplots(1, len(streams), figsize=(6 * len(streams), 4.5), squeeze=False)
    for ax, (stream, data) in zip(axes[0], streams.items()):
        for name in POLICY_ORDER:
            values = np.sort(np.asarray(data["per_request"].get(name, []), float))
            if values.size:
                ax.plot(values, np.arange(1, values.size + 1) / values.size, label=name,
                        linestyle="--" if name.startswith("oracle") or name == "gptcache" else "-")
        ax.set_title(f"{stream} stream ({data['requests']} requests)")
        ax.set_xlabel("fraction of prompt tokens reused")
        ax.set_ylabel("share of requests (CDF)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _without_per_request(results: dict) -> dict:
    return {
        **results,
        "streams": {
            name: {k: v for k, v in data.items() if k != "per_request"}
            for name, data in results["streams"].items()
        },
    }
