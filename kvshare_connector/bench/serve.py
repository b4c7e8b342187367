"""``kvshare bench serve``: a saturated server, vanilla vLLM vs kvshare FCFS vs cache-aware.

Each system is a vLLM OpenAI server started as users start it, one after the other with
the same flags (eager mode unless ``--compiled``, ``--enable-prompt-tokens-details``):

* ``vanilla``: vLLM's own server, prefix caching on, no connector;
* ``fcfs``: ``kvshare serve`` (the connector, fresh home), vLLM's FCFS scheduler;
* ``cache-aware``: the same with ``--scheduler-cls kvshare.scheduler.CacheAwareScheduler``.

Workload (real ShareGPT first turns, SmolLM2 chat template, fixed ``--seed``):
``--requests`` prompts, a ``--hit-share`` of them *hits* (the later prompt of a
similar-stream pair whose earlier prompt is sent first, one at a time, to warm the cache;
see :func:`kvshare.bench.pairs.similar_pairs`) and the rest *misses* (prompts with no
neighbour within cosine 0.05 in the whole set). Every system gets the same warm-up and
then the same stream in the same order with Poisson arrivals at ``--rate`` requests per
second (default: ``--load`` times the service rate of the first system's warm-up, one
request at a time, which saturates it). Each request streams ``--output-tokens`` greedy
tokens (``ignore_eos``); the client stamps every streamed event.

Measured per system: mean and p99 TTFT over all requests and p99 TTFT of misses (by
design: vanilla claims nothing), requests per second (requests / (last answer - first
send)), and the time per output token of running requests: every gap between two
streamed events of a request after its first, split into gaps during which a fill ended
(another request whose prompt the cache filled, ``cached_tokens`` >= half its prompt,
got its first token inside the gap: the step that ran the fill, or its last part) and
the others. Asynchronous fills spread over earlier steps too; those steps count as
without fills here.

Key results (``--json``): ``mean_ttft_gain_vs_fcfs`` (1 - cache-aware / fcfs mean TTFT,
target >= 0.15), ``p99_ttft_misses_ratio`` (cache-aware / fcfs, target <= 1.2),
``throughput_vs_vanilla`` (cache-aware / vanilla requests per second, target >= 1.2) and
``tpot_during_fills_ratio`` (cache-aware: TPOT during fills / without, target <= 1.2).
"""

from __future__ import annotations

import argparse
import bisect
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvshare.bench.engine_config import add_config_arguments
from kvshare.bench.workload import add_prompt_length_arguments, check_prompt_lengths

SYSTEMS = ("vanilla", "fcfs", "cache-aware")
CACHE_AWARE_SCHEDULER = "kvshare.scheduler.CacheAwareScheduler"
FILLED_SHARE = 0.5
"""A request whose ``cached_tokens`` (vLLM prefix hit + kvshare's claim) reach this share
of its prompt had a fill (on vanilla vLLM: a prefix hit, which the stream avoids)."""
REQUEST_TIMEOUT_S = 1800.0
SAME_STEP_S = 0.005
"""Events of one engine step reach the client's threads within this of each other (a
decode step takes 10 ms or more here)."""
KV_CACHE_BYTES = 1 << 30
"""vLLM's KV cache of every system (about 46k SmolLM2 tokens: max_num_seqs full prompts
and a prefix cache), the same for all, instead of a share of host memory."""

EPILOG = """\
TTFT: send to first streamed token, measured by the client.
misses: prompts with no similar prompt in the whole data set (none is warmed up).
TPOT during fills: gaps between streamed tokens of running requests in which another
request's fill ended; without: all other gaps.

example (about 15 min on 2 CPU cores):
  kvshare bench serve --requests 80 --json results/serve.json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"comma-separated subset of {','.join(SYSTEMS)} (default: all)")
    parser.add_argument("--requests", type=int, default=80, metavar="N",
                        help="measured requests per system (default: 80)")
    parser.add_argument("--hit-share", type=float, default=0.5,
                        help="share of the requests that are similar to a warmed-up prompt "
                             "(default: 0.5)")
    add_prompt_length_arguments(parser, 500, 1500)
    parser.add_argument("--output-tokens", type=int, default=32,
                        help="streamed greedy tokens per request (default: 32)")
    parser.add_argument("--rate", type=float, default=None,
                        help="Poisson arrival rate in requests per second (default: --load x "
                             "the first system's warm-up service rate)")
    parser.add_argument("--load", type=float, default=2.0,
                        help="arrival rate over the measured service rate when --rate is not "
                             "given (default: 2.0, saturating)")
    parser.add_argument("--max-num-seqs", type=int, default=16,
                        help="vLLM --max-num-seqs of every system (default: 16)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048,
                        help="vLLM --max-num-batched-tokens of every system (default: 2048)")
    parser.add_argument("--compiled", action="store_true",
                        help="vLLM's default compiled mode instead of --enforce-eager")
    parser.add_argument("--seed", type=int, default=0, help="workload and arrivals (default: 0)")
    add_config_arguments(parser)
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON")
    parser.add_argument("--plot", type=Path, metavar="PNG",
                        help="TTFT CDF of each system, hits and misses")


# ------------------------------------------------------------------------ workload
@dataclass(frozen=True)
class Prompt:
    name: str
    token_ids: list[int]
    hit: bool
    """Designed as a hit (its similar earlier prompt is warmed up) or a miss."""


@dataclass(frozen=True)
class Workload:
    warmup: list[list[int]]
    """Earlier prompts of the hits' pairs, sent one at a time before the stream."""
    stream: list[Prompt]
    arrivals_s: list[float]
    """Offsets from the stream's start, one per prompt (rate 1; scaled by the rate)."""


def build_workload(args: argparse.Namespace, config) -> Workload:
    """Hits, misses and unit-rate Poisson arrival offsets, all fixed by ``args.seed``."""
    from kvshare.bench.pairs import similar_pairs
    from kvshare.bench.quality import chat_ids
    from kvshare.bench.workload import load_workload
    from kvshare.matching.embedder import make_embedder
    from kvshare.model_assets import load_tokenizer

    tokenizer = load_tokenizer(config.model)
    data = load_workload(config, make_embedder(config.embedder, config.embed_max_chars),
                         tokenizer)
    similar = data.similar_positions()
    n_hits = round(args.requests * args.hit_share)
    pairs = similar_pairs([data.texts[p] for p in similar], [data.token_ids[p] for p in similar],
                          data.embeddings[similar], len(similar), min_tokens=args.min_tokens,
                          max_tokens=args.max_tokens)
    rng = random.Random(args.seed)
    chosen = sorted(rng.sample(range(len(pairs)), min(n_hits, len(pairs))))
    is_similar = set(similar.tolist())
    novel = [p for p in range(len(data)) if p not in is_similar
             and args.min_tokens <= len(data.token_ids[p]) <= args.max_tokens]
    misses = sorted(rng.sample(novel, min(args.requests - len(chosen), len(novel))))
    if len(chosen) < n_hits or len(misses) < args.requests - n_hits:
        raise SystemExit(f"the data set has {len(pairs)} similar pairs and {len(novel)} novel "
                         f"prompts of {args.min_tokens}..{args.max_tokens} tokens; need "
                         f"{n_hits} and {args.requests - n_hits}")
    stream = ([Prompt(f"hit-{i}", chat_ids(tokenizer, pairs[i].later), True) for i in chosen]
              + [Prompt(f"miss-{p}", chat_ids(tokenizer, data.texts[p]), False)
                 for p in misses])
    rng.shuffle(stream)
    offsets, t = [], 0.0
    for _ in stream:
        offsets.append(t)
        t += rng.expovariate(1.0)
    return Workload([chat_ids(tokenizer, pairs[i].earlier) for i in chosen], stream, offsets)


# ------------------------------------------------------------------------ servers
class VanillaServer:
    """vLLM's OpenAI server without a connector, with the flags the kvshare systems get."""

    def __init__(self, model_dir: Path, port: int, vllm_args: list[str], log: Path) -> None:
        from kvshare.bench.servers import SERVED_MODEL, environment
        from kvshare.serve import CPU_ENVIRONMENT, CPU_MEMORY_UTILIZATION, SERVER_MODULE

        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        with log.open("w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", SERVER_MODULE, "--model", str(model_dir),
                 "--served-model-name", SERVED_MODEL, "--port", str(port),
                 "--gpu-memory-utilization", CPU_MEMORY_UTILIZATION, *vllm_args],
                stdout=out, stderr=subprocess.STDOUT,
                env={**environment(), **CPU_ENVIRONMENT}, start_new_session=True)

    def wait_ready(self) -> None:
        from kvshare.bench.servers import START_DEADLINE_S

        deadline = time.monotonic() + START_DEADLINE_S
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5):
                    return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    tail = self.log.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"vanilla vLLM did not start:\n{tail}") from None
            time.sleep(1.0)  # polling a condition with a deadline

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=120)


@dataclass
class Streamed:
    """One request of the stream on one system, as the client saw it."""

    name: str
    hit: bool
    prompt_tokens: int
    sent_s: float
    """Client clock (``time.perf_counter``)."""
    event_s: list[float] = field(default_factory=list)
    """When each streamed event carrying tokens arrived."""
    cached_tokens: int = 0

    @property
    def ttft_s(self) -> float:
        return self.event_s[0] - self.sent_s

    @property
    def filled(self) -> bool:
        return self.cached_tokens >= FILLED_SHARE * self.prompt_tokens


def stream_request(url: str, prompt: Prompt, tenant: str, output_tokens: int,
                   result: Streamed) -> None:
    """Send one streaming completion and stamp its events into ``result``."""
    from kvshare.bench.servers import SERVED_MODEL

    body = {"model": SERVED_MODEL, "prompt": prompt.token_ids, "max_tokens": output_tokens,
            "temperature": 0.0, "ignore_eos": True, "cache_salt": tenant, "stream": True,
            "stream_options": {"include_usage": True}}
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    result.sent_s = time.perf_counter()
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if event.get("choices"):
                result.event_s.append(time.perf_counter())
            usage = event.get("usage")
            if usage:
                details = usage.get("prompt_tokens_details") or {}
                result.cached_tokens = int(details.get("cached_tokens") or 0)


def send_one(url: str, token_ids: list[int], tenant: str, output_tokens: int) -> float:
    """One request alone; its latency in seconds (warm-up and service-rate measurement)."""
    result = Streamed("warmup", False, len(token_ids), 0.0)
    stream_request(url, Prompt("warmup", token_ids, False), tenant, output_tokens, result)
    return time.perf_counter() - result.sent_s


def replay(url: str, workload: Workload, rate: float, tenant: str, output_tokens: int
           ) -> list[Streamed]:
    """The stream with Poisson arrivals at ``rate``; one thread per request."""
    results = [Streamed(p.name, p.hit, len(p.token_ids), 0.0) for p in workload.stream]
    errors: list[BaseException] = []

    def worker(prompt: Prompt, result: Streamed) -> None:
        try:
            stream_request(url, prompt, tenant, output_tokens, result)
        except BaseException as exc:  # reported after the stream
            errors.append(exc)

    threads = []
    start = time.perf_counter()
    for prompt, result, offset in zip(workload.stream, results, workload.arrivals_s):
        delay = start + offset / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)  # the arrival process itself
        thread = threading.Thread(target=worker, args=(prompt, result), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]!r}")
    return results


# ------------------------------------------------------------------------ metrics
def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0..1), linear between order statistics; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def token_gaps(results: list[Streamed]) -> tuple[list[float], list[float]]:
    """(gaps during which another request's fill ended, the other gaps), in seconds: every
    gap between two consecutive events of a request, from its first token on.

    A filled request's first token leaves the server with the tokens of the step that ran
    its fill, so the step's gap of a running request ends with it; the client may read
    one stream a moment before the other, hence :data:`SAME_STEP_S`.
    """
    fill_ends = sorted(r.event_s[0] for r in results if r.filled and r.event_s)
    during, without = [], []
    for r in results:
        for begin, end in zip(r.event_s, r.event_s[1:]):
            i = bisect.bisect_right(fill_ends, begin + SAME_STEP_S)
            in_gap = i < len(fill_ends) and fill_ends[i] <= end + SAME_STEP_S
            (during if in_gap else without).append(end - begin)
    return during, without


def system_summary(results: list[Streamed]) -> dict[str, Any]:
    ttfts = [r.ttft_s for r in results]
    misses = [r.ttft_s for r in results if not r.hit]
    hits = [r.ttft_s for r in results if r.hit]
    first_send = min(r.sent_s for r in results)
    last_event = max(r.event_s[-1] for r in results)
    during, without = token_gaps(results)
    tpot_during = statistics.fmean(during) if during else None
    tpot_without = statistics.fmean(without) if without else None
    return {
        "requests": len(results),
        "mean_ttft_s": statistics.fmean(ttfts),
        "p50_ttft_s": percentile(ttfts, 0.5),
        "p99_ttft_s": percentile(ttfts, 0.99),
        "mean_ttft_hits_s": statistics.fmean(hits) if hits else None,
        "mean_ttft_misses_s": statistics.fmean(misses) if misses else None,
        "p99_ttft_misses_s": percentile(misses, 0.99),
        "requests_per_s": len(results) / (last_event - first_send),
        "filled_requests": sum(r.filled for r in results),
        "filled_hits": sum(r.filled for r in results if r.hit),
        "tpot_during_fills_s": tpot_during,
        "tpot_without_fills_s": tpot_without,
        "tpot_during_fills_ratio": (tpot_during / tpot_without
                                    if tpot_during and tpot_without else None),
        "gaps_during_fills": len(during),
    }


def comparison(systems: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """The issue's four figures, from whichever systems ran."""
    aware, fcfs, vanilla = (systems.get(name) for name in SYSTEMS[::-1])

    def ratio(a, b, key):
        return a[key] / b[key] if a and b and a.get(key) and b.get(key) else None

    gain = ratio(aware, fcfs, "mean_ttft_s")
    return {
        "mean_ttft_gain_vs_fcfs": None if gain is None else 1.0 - gain,
        "p99_ttft_misses_ratio": ratio(aware, fcfs, "p99_ttft_misses_s"),
        "throughput_vs_vanilla": ratio(aware, vanilla, "requests_per_s"),
        "fcfs_throughput_vs_vanilla": ratio(fcfs, vanilla, "requests_per_s"),
        "tpot_during_fills_ratio": (aware or {}).get("tpot_during_fills_ratio"),
    }


def markdown_table(summary: dict[str, Any]) -> str:
    from kvshare.bench.quality import format_or_dash as cell

    def ms(value):
        return cell(value, ".0f", " ms", scale=1000)

    rows = [f"### Saturated server: {summary['requests']} requests "
            f"({summary['hits']} similar to a warmed prompt), Poisson {summary['rate']:.2f}/s, "
            f"{summary['output_tokens']} output tokens\n",
            "| system | mean TTFT | p99 TTFT | p99 TTFT misses | req/s | filled | "
            "TPOT during fills | TPOT without |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in summary["systems"].items():
        rows.append(f"| {name} | {ms(s['mean_ttft_s'])} | {ms(s['p99_ttft_s'])} | "
                    f"{ms(s['p99_ttft_misses_s'])} | {s['requests_per_s']:.2f} | "
                    f"{s['filled_requests']} | {ms(s['tpot_during_fills_s'])} | "
                    f"{ms(s['tpot_without_fills_s'])} |")
    c = summary["comparison"]
    rows += ["",
             f"mean TTFT gain vs FCFS: {cell(c['mean_ttft_gain_vs_fcfs'], '.1%')} (target >= "
             f"15%); p99 TTFT of misses vs FCFS: {cell(c['p99_ttft_misses_ratio'], '.2f', 'x')} "
             f"(<= 1.2x); throughput vs vanilla: {cell(c['throughput_vs_vanilla'], '.2f', 'x')}"
             f" (>= 1.2x); TPOT during fills / without: "
             f"{cell(c['tpot_during_fills_ratio'], '.2f', 'x')} (<= 1.2x)", ""]
    return "\n".join(rows)


def plot(path: Path, runs: dict[str, list[Streamed]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, hit in zip(axes, (True, False)):
        for name, results in runs.items():
            values = sorted(r.ttft_s for r in results if r.hit == hit)
            ax.step(values, [(i + 1) / len(values) for i in range(len(values))], label=name)
        ax.set_title("hits" if hit else "misses")
        ax.set_xlabel("TTFT (s)")
    axes[0].set_ylabel("share of requests")
    axes[0].legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")


# ------------------------------------------------------------------------ run
def parse_systems(value: str) -> list[str]:
    systems = [s.strip() for s in value.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        raise SystemExit(f"--systems: unknown {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(SYSTEMS)}")
    return systems


def run_system(name: str, workload: Workload, rate: float | None, args, base, root: Path,
               longest: int) -> tuple[list[Streamed], float, float]:
    """Start one system, warm it up, replay the stream; (results, rate, warm-up rate)."""
    from kvshare.bench.engine_config import parse_sets
    from kvshare.bench.servers import Server, free_port, link_model, serve_options
    from kvshare.model_assets import SMOLLM2_ALIAS, resolve_model_dir

    model_dir = resolve_model_dir(SMOLLM2_ALIAS, base.home_dir)
    vllm_args = ["--host", "127.0.0.1", "--max-model-len",
                 str(longest + args.output_tokens + 64),
                 "--max-num-batched-tokens", str(args.max_num_batched_tokens),
                 "--max-num-seqs", str(args.max_num_seqs), "--enable-prompt-tokens-details",
                 "--kv-cache-memory-bytes", str(KV_CACHE_BYTES)]
    if not args.compiled:
        vllm_args.append("--enforce-eager")
    if name == "vanilla":
        server = VanillaServer(model_dir, free_port(), vllm_args, root / f"{name}.log")
    else:
        home = root / name
        link_model(home, SMOLLM2_ALIAS, model_dir)
        if name == "cache-aware":
            vllm_args += ["--scheduler-cls", CACHE_AWARE_SCHEDULER]
        settings = {**parse_sets(args.sets), "home": str(home)}
        server = Server(name, free_port(), [SMOLLM2_ALIAS, *vllm_args,
                                            *serve_options(settings)], root / f"{name}.log")
    try:
        server.wait_ready()
        latencies = [send_one(server.url, ids, "bench", args.output_tokens)
                     for ids in workload.warmup]
        service_rate = 1.0 / statistics.fmean(latencies)
        rate = rate or args.load * service_rate
        print(f"serve: {name}: warm-up service rate {service_rate:.2f}/s; stream at "
              f"{rate:.2f}/s", flush=True)
        return replay(server.url, workload, rate, "bench", args.output_tokens), rate, \
            service_rate
    finally:
        server.stop()


def run(args: argparse.Namespace) -> int:
    from kvshare.bench.engine_config import base_config, parse_sets

    systems = parse_systems(args.systems)
    check_prompt_lengths(args)
    if args.requests < 2:
        raise SystemExit(f"--requests must be >= 2, got {args.requests}")
    if not 0.0 <= args.hit_share <= 1.0:
        raise SystemExit(f"--hit-share must be in [0, 1], got {args.hit_share}")
    if args.rate is not None and args.rate <= 0:
        raise SystemExit(f"--rate must be > 0, got {args.rate}")
    if args.output_tokens < 3:
        raise SystemExit(f"--output-tokens must be >= 3 (TPOT needs two gaps), got "
                         f"{args.output_tokens}")
    base = base_config(args.config, args.sets)
    started = time.perf_counter()
    workload = build_workload(args, base)
    longest = max(len(ids) for ids in [p.token_ids for p in workload.stream] + workload.warmup)
    print(f"serve: {len(workload.stream)} requests ({sum(p.hit for p in workload.stream)} "
          f"hits by design), {len(workload.warmup)} warm-up prompts, systems "
          f"{', '.join(systems)}", flush=True)
    runs: dict[str, list[Streamed]] = {}
    summaries: dict[str, dict[str, Any]] = {}
    rate = args.rate
    service_rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="kvshare-serve-") as scratch:
        for name in systems:
            try:
                runs[name], rate, service_rates[name] = run_system(
                    name, workload, rate, args, base, Path(scratch), longest)
            except RuntimeError as exc:
                print(f"kvshare bench serve: {name}: {exc}")
                return 2
            summaries[name] = system_summary(runs[name])
    summary = {"requests": len(workload.stream),
               "hits": sum(p.hit for p in workload.stream), "rate": rate,
               "output_tokens": args.output_tokens, "seed": args.seed,
               "warmup_service_rate": service_rates, "systems": summaries,
               "comparison": comparison(summaries), "config_overrides": parse_sets(args.sets),
               "compiled": args.compiled, "wall_s": time.perf_counter() - started}
    print(markdown_table(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(
            {**summary, "per_request": {name: [asdict(r) for r in results]
                                        for name, results in runs.items()}}, indent=1))
        print(f"JSON written to {args.json}")
    if args.plot:
        plot(args.plot, runs)
        print(f"plot written to {args.plot}")
    return 0
