"""``kvshare bench hitrate``: how much prefill each caching policy avoids on real traffic.

Replays ShareGPT first user turns (see :mod:`kvshare.bench.workload`) through kvshare and
the baselines of :mod:`kvshare.bench.policies`, on identical SmolLM2 token sequences.
Per policy: reused-token fraction (token-weighted), share of requests with >= 90% of
tokens reused (the KVShare paper's Figure 4 metric); for kvshare, lookup latency.

kvshare has two kinds of rows: ``kvshare``, the plan-level upper bound (every token the
planner could map), and ``connector``, what the connector reuses with the config's rules
(claim thresholds, recomputed tail, DHD's ``rho``, what it stores, tier and KV-cache
capacities). ``connector`` uses the config's ``max_approx_depth``; ``connector_depth<d>``
rows replay the same stream with other depths, so the default can be chosen on evidence.
Their JSON adds the claimed share, depth counts and where the plan-level reuse is lost.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvshare.bench.policies import (
    VLLM_CPU_BLOCK_TOKENS,
    ChunkHashPolicy,
    ConnectorPolicy,
    KVSharePolicy,
    PrefixCachePolicy,
    Request,
    ResponseCachePolicy,
    ReusePolicy,
    SpanOraclePolicy,
)
from kvshare.bench.vllm_runner import EngineSpec
from kvshare.bench.workload import Workload, load_workload, nearest_earlier
from kvshare.config import KVShareConfig

logger = logging.getLogger(__name__)

ORACLE_NEIGHBOURS = 20
GPTCACHE_THRESHOLD = 0.8
POLICY_ORDER = ("prefix", "chunk256", "gptcache", "kvshare", "connector", "oracle", "oracle_lcs")
"""Policies drawn in the CDF plot (the table lists every row)."""
CONNECTOR_CONFIG_KEYS = (
    "min_reuse_fraction", "min_reuse_tokens", "recompute_tail_tokens", "recompute_tail_by",
    "rho", "max_approx_depth", "chunk_tokens", "min_store_tokens", "index_max_entries",
    "strict_prefix_cache",
)
"""Config keys the connector rows depend on (recorded in the JSON)."""
LABELS = {
    "kvshare": "kvshare (plan-level upper bound)",
    "gptcache": "gptcache (returns an old answer)",
}


@dataclass(frozen=True)
class ConnectorSetup:
    """What the ``connector`` rows replay beyond the kvshare config."""

    kv_cache_tokens: int
    """vLLM's KV cache in tokens (its prefix cache can hold no more)."""
    bytes_per_token: int
    """KV bytes per token, for the chunk tiers' byte capacities."""
    depths: tuple[int | None, ...]
    """``max_approx_depth`` of the extra rows (None: any depth)."""


def smollm2_kv_bytes_per_token() -> int:
    """SmolLM2-135M's KV per token in bf16: 30 layers x (K, V) x 3 KV heads x 64 dims x 2 B."""
    import torch

    from kvshare.storage.chunk import KVLayout

    return KVLayout(num_layers=30, num_kv_heads=3, head_dim=64,
                    dtype=torch.bfloat16).bytes_per_token()


def parse_depths(text: str) -> tuple[int | None, ...]:
    """``"0,2,unlimited"`` -> ``(0, 2, None)``; exits naming a bad item."""
    depths: list[int | None] = []
    for item in (part.strip() for part in text.split(",")):
        if item == "unlimited":
            depths.append(None)
        elif item.isdigit():
            depths.append(int(item))
        elif item:
            raise SystemExit(f"--depths item {item!r} is neither an integer >= 0 nor 'unlimited'")
    return tuple(dict.fromkeys(depths))


def tier_capacities(config: KVShareConfig) -> list[int]:
    """Byte capacities of the chunk tiers the config enables, fastest first (as
    ``kvshare.tiers_setup.build_store`` builds them). Redis is left out: its capacity is
    the Redis server's ``maxmemory``, which the config does not know."""
    capacities = [config.gpu_bytes, config.cpu_bytes]
    if config.disk_path is not None:
        capacities.append(config.disk_bytes)
    if config.redis_url:
        logger.warning("the connector rows do not model the Redis tier (%s)", config.redis_url)
    return [c for c in capacities if c > 0]


def connector_name(depth: int | None, config: KVShareConfig) -> str:
    """``connector`` for the config's own depth, else ``connector_depth<d>``."""
    if depth == config.max_approx_depth:
        return "connector"
    return f"connector_depth{'_unlimited' if depth is None else depth}"


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
    parser.add_argument("--kv-cache-bytes", type=int, default=EngineSpec.kv_cache_bytes,
                        metavar="B", help="vLLM's KV cache, which bounds the connector rows' "
                                          "prefix cache (default: the benchmarks' engines', "
                                          f"{EngineSpec.kv_cache_bytes >> 20} MiB)")
    parser.add_argument("--kv-bytes-per-token", type=int, default=0, metavar="B",
                        help="KV bytes per token (default: SmolLM2-135M in bf16, 23,040)")
    parser.add_argument("--depths", default="0,1,2,unlimited",
                        help="max_approx_depth of the extra connector rows, comma-separated "
                             "integers or 'unlimited' (default: 0,1,2,unlimited)")


def run(args: argparse.Namespace) -> int:
    from kvshare.matching.embedder import make_embedder
    from kvshare.model_assets import load_tokenizer

    if args.requests < 0:
        raise SystemExit(f"--requests must be >= 0, got {args.requests}")
    streams = [s.strip() for s in args.streams.split(",") if s.strip()]
    unknown = set(streams) - {"similar", "all"}
    if unknown:
        raise SystemExit(f"unknown stream(s) {sorted(unknown)}; choose from similar, all")
    if args.kv_cache_bytes < 1 or args.kv_bytes_per_token < 0:
        raise SystemExit(f"--kv-cache-bytes must be > 0 and --kv-bytes-per-token >= 0 "
                         f"(0: SmolLM2's), got {args.kv_cache_bytes} and "
                         f"{args.kv_bytes_per_token}")
    config = KVShareConfig.load(args.config)
    bytes_per_token = args.kv_bytes_per_token or smollm2_kv_bytes_per_token()
    setup = ConnectorSetup(kv_cache_tokens=args.kv_cache_bytes // bytes_per_token,
                           bytes_per_token=bytes_per_token, depths=parse_depths(args.depths))
    embedder = make_embedder(config.embedder, config.embed_max_chars)
    workload = load_workload(config, embedder, load_tokenizer(config.model))
    results = {"streams": {}, "config": {
        "top_k": config.top_k, "min_run_tokens": config.min_run_tokens,
        "embedder": embedder.name,
        "connector": {key: getattr(config, key) for key in CONNECTOR_CONFIG_KEYS}
        | {"kv_cache_tokens": setup.kv_cache_tokens, "bytes_per_token": setup.bytes_per_token,
           "vllm_block_tokens": VLLM_CPU_BLOCK_TOKENS, "tier_bytes": tier_capacities(config)},
    }}
    for stream in streams:
        positions = (workload.similar_positions() if stream == "similar"
                     else np.arange(len(workload)))
        if args.requests:
            positions = positions[: args.requests]
        results["streams"][stream] = replay(workload, positions, config, embedder, stream,
                                             setup, seed=args.seed)

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
           stream: str, setup: ConnectorSetup, seed: int = 0) -> dict:
    """Run every policy over the stream; returns per-policy summary and per-request reuse."""
    from tqdm import tqdm

    from kvshare.matching.matcher import Matcher
    from kvshare.storage.index import EntryIndex

    # Neighbours are computed within the stream: a request can only reuse what the
    # stream itself sent before it.
    token_ids = [workload.token_ids[p] for p in positions]
    neighbours, sims = nearest_earlier(workload.embeddings[positions], ORACLE_NEIGHBOURS)
    with tempfile.TemporaryDirectory(prefix="kvshare-hitrate-") as tmp:
        def matcher_in(name: str, max_entries: int | None = None) -> Matcher:
            index = EntryIndex(Path(tmp) / name, embedder.dim,
                               ann_min_rows=config.ann_index_min_rows,
                               flush_rows=config.index_flush_rows, seed=seed,
                               max_entries=max_entries)
            return Matcher.from_config(config, index, embedder, model_id=config.model)

        kvshare = KVSharePolicy(matcher_in("kvshare"))
        connectors = [
            ConnectorPolicy(connector_name(depth, config),
                            matcher_in(f"connector-{depth}", config.index_max_entries),
                            config, max_approx_depth=depth,
                            kv_cache_tokens=setup.kv_cache_tokens,
                            bytes_per_token=setup.bytes_per_token,
                            tier_bytes=tier_capacities(config))
            for depth in dict.fromkeys((config.max_approx_depth, *setup.depths))
        ]
        policies: list[ReusePolicy] = [
            PrefixCachePolicy(16),
            ChunkHashPolicy(256),
            ResponseCachePolicy(sims[:, 0], GPTCACHE_THRESHOLD),
            kvshare,
            *connectors,
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
        for policy in (kvshare, *connectors):
            policy.matcher.index.close()
    summary = {name: summarize(reused[name], lengths) for name in reused}
    lookup = np.array(kvshare.lookup_ms)
    summary["kvshare"]["lookup_p50_ms"] = float(np.percentile(lookup, 50)) if lookup.size else 0.0
    summary["kvshare"]["lookup_p99_ms"] = float(np.percentile(lookup, 99)) if lookup.size else 0.0
    summary["gptcache"]["returns_stale_answer"] = True
    for connector in connectors:
        summary[connector.name] |= {"max_approx_depth": connector.max_approx_depth,
                                    **connector.stats.as_dict()}
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


def label(name: str, policy: dict) -> str:
    if "max_approx_depth" in policy:
        depth = policy["max_approx_depth"]
        return (f"{name} (as the connector runs, max_approx_depth "
                f"{'unlimited' if depth is None else depth})")
    return LABELS.get(name, name)


def markdown_table(results: dict) -> str:
    lines = []
    for stream, data in results["streams"].items():
        policies = data["policies"]
        lines.append(f"### stream `{stream}`: {data['requests']} requests, "
                     f"mean {data['mean_tokens']:.0f} tokens\n")
        lines.append("| policy | reused tokens | requests >= 90% reused | lookup p50 / p99 |")
        lines.append("|---|---:|---:|---:|")
        for name, p in policies.items():
            latency = (f"{p['lookup_p50_ms']:.2f} / {p['lookup_p99_ms']:.2f} ms"
                       if "lookup_p50_ms" in p else "")
            lines.append(f"| {label(name, p)} | {p['reused_token_fraction']:.1%} | "
                         f"{p['frac_requests_ge90']:.1%} | {latency} |")
        lines.append("")
        connectors = {n: p for n, p in policies.items() if "max_approx_depth" in p}
        if connectors:
            lines.extend(_connector_lines(policies, connectors))
    return "\n".join(lines)


def _connector_lines(policies: dict, connectors: dict) -> list[str]:
    """Target ratios and, per connector row, where the plan-level reuse goes."""
    lines = []
    fraction = {n: p["reused_token_fraction"] for n, p in policies.items()}
    ratios = [f"connector / {shown}: {fraction['connector'] / fraction[base]:.2f}x "
              f"(target >= {target})"
              for base, shown, target in (("prefix", "prefix", "5x"),
                                          ("kvshare", "kvshare (plan-level)", "0.8x"))
              if "connector" in connectors and fraction.get(base)]
    if ratios:
        lines.append("; ".join(ratios) + "\n")
    lines.append("Where the plan-level reuse goes, as shares of all prompt tokens: the "
                 "kvshare row's plan; this row's own plan (its index holds only what it "
                 "stored); minus plan tokens above vLLM's hit in plans under the claim "
                 "thresholds, in the recomputed tail, in evicted chunks, recomputed by "
                 "DHD; plus vLLM prefix-hit tokens the plan did not cover; = reused.\n")
    lines.append("| policy | claimed requests | served from depth >= 1 | stored by depth | "
                 "kvshare plan | own plan | - thresholds | - tail | - evicted | - rho | "
                 "+ vLLM hit | = reused |")
    lines.append("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, p in connectors.items():
        t = p["token_fractions"]
        stored = ", ".join(f"{d}: {n}" for d, n in p["stored_by_depth"].items()) or "none"
        lines.append(
            f"| {name} | {p['claimed_fraction']:.1%} | {p['requests_served_from_depth_ge1']} | "
            f"{stored} | {fraction.get('kvshare', 0.0):.1%} | {t['plan']:.1%} | "
            f"{t['lost_to_thresholds']:.1%} | {t['lost_to_tail']:.1%} | "
            f"{t['lost_to_missing_chunks']:.1%} | {t['lost_to_rho']:.1%} | "
            f"{t['prefix_hit_beyond_plan']:.1%} | {t['reused']:.1%} |")
    lines.append("")
    return lines


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
