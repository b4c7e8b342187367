"""``kvshare bench cross-instance``: is a hit from another vLLM instance as fast as a local one?

Starts a ``kvshare daemon`` (fresh home) and two vLLM servers (``kvshare serve``, eager
mode) whose connectors run in ``mode: remote`` on it, as users run them. Then replays the
long prompts of the ShareGPT similar stream (as ``kvshare bench ttft`` picks them), in
arrival order, twice, one request at a time, interleaved prompt by prompt:

* **local**: prompt i measured on server A, in tenant ``local``;
* **cross**: prompt i measured on server B, in tenant ``cross``.

A measured request reuses what the cache holds but is not stored (``kvshare_store=0``);
then server A serves the same prompt again, unmeasured, to store it. So in both tenants
every entry was stored by A, and the two conditions differ only in where the hit is
served: on the instance that stored its sources, or on another one. After each storing
request the benchmark waits until its entry reaches the daemon's index (up to
``COMMIT_WAIT_S``): an instance sees its own prompts at once (in flight), another only
once the chunks are written and the entry committed; that lag is reported apart
(``median_commit_lag_s``). TTFT is vLLM's own measurement (the increase of
``vllm:time_to_first_token_seconds_sum`` on the serving instance across the request,
which runs alone). A request is a hit when kvshare
claimed it and loaded at least ``--hit-found`` of the prompt. Reported: the median TTFT
of hits in each condition, their ratio (``cross_vs_local_ttft_ratio``, target <= 1.2)
and the median of per-prompt ratios over prompts that hit in both conditions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvshare.bench.engine_config import add_config_arguments
from kvshare.bench.servers import (
    DaemonProcess,
    Server,
    free_port,
    link_model,
    load_report,
    serve_options,
)
from kvshare.bench.workload import add_prompt_length_arguments, check_prompt_lengths
from kvshare.connector.scheduler import STORE_ARG

MAX_TOKENS = 2
"""The load report reaches the response only when the request outlives its load step."""
TTFT_METRIC = "vllm:time_to_first_token_seconds_sum"
QUIET_S = 0.5
"""Idle time before each measured request."""
COMMIT_WAIT_S = 5.0
"""After each request, wait up to this long for its entry to reach the daemon's index."""

EPILOG = """\
local: measured on server A, which stored every entry
cross: measured on server B (every hit reads entries A stored)
hit:   kvshare claimed the request and loaded >= --hit-found of the prompt

example: kvshare bench cross-instance --requests 30 --json results/cross_instance.json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--requests", type=int, default=30, metavar="N",
                        help="replay the first N long similar-stream prompts in each condition "
                             "(default: 30, about 8 min on 2 CPU cores)")
    add_prompt_length_arguments(parser, 1000, 2048)
    parser.add_argument("--hit-found", type=float, default=0.5,
                        help="share of the prompt kvshare must load for a hit (default: 0.5)")
    add_config_arguments(parser)
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON")


@dataclass
class Served:
    """One request of one condition."""

    prompt: int
    condition: str
    server: str
    prompt_tokens: int
    ttft_s: float
    loaded: int
    reused: int
    claimed: int

    def hit(self, hit_found: float) -> bool:
        return self.claimed > 0 and self.loaded >= hit_found * self.prompt_tokens


def indexed_entries(client) -> int:
    return int(client.stats().index["entries"])


def measure(server: Server, prompt: int, condition: str, token_ids: list[int]) -> Served:
    """One measured request; it reuses but is not stored."""
    before = server.metric(TTFT_METRIC)
    response = server.complete(token_ids, condition, max_tokens=MAX_TOKENS,
                               xargs={STORE_ARG: 0})
    ttft = server.metric(TTFT_METRIC) - before
    report = load_report(response)
    return Served(prompt, condition, server.name, len(token_ids), ttft,
                  report.get("loaded", 0), report.get("reused", 0), report.get("claimed", 0))


def store(server: Server, client, tenant: str, token_ids: list[int]) -> float | None:
    """Serve the prompt to store it; seconds until its entry is indexed (None: it was not
    within ``COMMIT_WAIT_S``, e.g. an approximation deeper than the config stores)."""
    entries = indexed_entries(client)
    server.complete(token_ids, tenant, max_tokens=MAX_TOKENS, xargs={STORE_ARG: 1})
    answered = time.perf_counter()
    while time.perf_counter() - answered < COMMIT_WAIT_S:
        if indexed_entries(client) > entries:
            return time.perf_counter() - answered
        time.sleep(0.01)  # polling a condition with a deadline
    return None


def summarize(served: list[Served], lags: list[float | None], hit_found: float
              ) -> dict[str, Any]:
    by_condition = {name: {s.prompt: s for s in served if s.condition == name}
                    for name in ("local", "cross")}
    hits = {name: [s for s in rows.values() if s.hit(hit_found)]
            for name, rows in by_condition.items()}
    both = sorted(set(s.prompt for s in hits["local"]) & set(s.prompt for s in hits["cross"]))
    medians = {name: statistics.median(s.ttft_s for s in rows) if rows else None
               for name, rows in hits.items()}
    indexed = [lag for lag in lags if lag is not None]
    paired = [by_condition["cross"][p].ttft_s / by_condition["local"][p].ttft_s for p in both]
    return {
        "requests_per_condition": len(by_condition["local"]),
        "hits": {name: len(rows) for name, rows in hits.items()},
        "hits_in_both": len(both),
        "median_hit_ttft_s": medians,
        "cross_vs_local_ttft_ratio": (medians["cross"] / medians["local"]
                                      if medians["cross"] and medians["local"] else None),
        "paired_median_ratio": statistics.median(paired) if paired else None,
        "median_commit_lag_s": statistics.median(indexed) if indexed else None,
        "stored_not_indexed": len(lags) - len(indexed),
        "median_reused_share": {
            name: statistics.median(s.reused / s.prompt_tokens for s in rows) if rows else None
            for name, rows in hits.items()},
    }


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from kvshare.bench.engine_config import base_config, parse_sets
    from kvshare.bench.ttft import long_prompts
    from kvshare.model_assets import SMOLLM2_ALIAS, resolve_model_dir
    from kvshare.remote.client import DaemonClient

    if args.requests < 2:
        raise SystemExit(f"--requests must be >= 2, got {args.requests}")
    if not 0.0 < args.hit_found <= 1.0:
        raise SystemExit(f"--hit-found must be in (0, 1], got {args.hit_found}")
    check_prompt_lengths(args)
    base = base_config(args.config, args.sets)
    prompts = long_prompts(args, base)
    if len(prompts) < 2:
        raise SystemExit(f"fewer than 2 similar-stream prompts of {args.min_tokens}.."
                         f"{args.max_tokens} tokens")
    longest = max(map(len, prompts))
    model_dir = resolve_model_dir(SMOLLM2_ALIAS, base.home_dir)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kvshare-cross-") as scratch:
        root = Path(scratch)
        address = f"ipc://{root / 'daemon.sock'}"
        daemon = DaemonProcess(root / "daemon", address, root / "daemon.log",
                               env={"KVSHARE_METRICS_PORT": "0"})
        sets = {**parse_sets(args.sets), "mode": "remote", "daemon_address": address}
        common = [SMOLLM2_ALIAS, "--host", "127.0.0.1", "--enforce-eager",
                  "--max-model-len", str(max(2048, longest + 64)),
                  "--max-num-batched-tokens", str(longest),
                  "--kv-cache-memory-bytes", str(1 << 30)]
        servers: list[Server] = []
        client = DaemonClient(address, timeout_ms=10_000)
        try:
            daemon.wait_ready(client)
            for name in ("a", "b"):
                home = root / f"server-{name}"
                link_model(home, SMOLLM2_ALIAS, model_dir)
                options = serve_options({**sets, "home": str(home)})
                servers.append(Server(name, free_port(), common + options, home / "serve.log"))
            for server in servers:
                server.wait_ready()
            a, b = servers
            print(f"cross-instance: {len(prompts)} prompts, {min(map(len, prompts))}..{longest} "
                  "tokens, eager mode; local on A, cross alternating A/B; one daemon")
            served: list[Served] = []
            lags: list[float | None] = []
            for i, ids in enumerate(tqdm(prompts, desc="prompts", unit="prompt")):
                # Each measured request follows the other server's work half the time,
                # and a quiet pause: an engine's threads keep a core busy for a moment
                # after a step (measured: the second of two back-to-back requests on
                # different servers paid for it).
                order = [(a, "local"), (b, "cross")]
                for server, condition in order if i % 2 == 0 else order[::-1]:
                    time.sleep(QUIET_S)
                    served.append(measure(server, i, condition, ids))
                for tenant in ("local", "cross"):
                    lags.append(store(a, client, tenant, ids))
        finally:
            client.close()
            for server in servers:
                server.stop()
            daemon.stop()
    summary = summarize(served, lags, args.hit_found)
    summary.update(wall_s=time.perf_counter() - started, hit_found=args.hit_found,
                   config_overrides=parse_sets(args.sets), requests=[asdict(s) for s in served])
    medians = summary["median_hit_ttft_s"]
    print(f"hits: local {summary['hits']['local']}, cross {summary['hits']['cross']} "
          f"({summary['hits_in_both']} in both)")
    if medians["local"] and medians["cross"]:
        print(f"median TTFT of hits: local {medians['local'] * 1e3:.0f} ms, cross "
              f"{medians['cross'] * 1e3:.0f} ms; cross / local = "
              f"{summary['cross_vs_local_ttft_ratio']:.2f} (paired median "
              f"{summary['paired_median_ratio']:.2f})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
        print(f"JSON written to {args.json}")
    return 0
