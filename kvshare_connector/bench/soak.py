"""``kvshare bench soak``: does kvshare stay healthy under sustained traffic and eviction?

Starts a redis-server (127.0.0.1, small ``maxmemory``, ``allkeys-lru``), a ``kvshare
daemon`` with a shared-memory CPU tier, a disk tier and that Redis tier, and two ``kvshare
serve`` engines (eager mode) in ``mode: remote`` on it. ``--clients`` threads then send
real ShareGPT similar-stream prompts, round-robin to the two engines, for ``--minutes``:

* **the stream never ends and never changes character.** The similar stream's prompts
  are grouped in families (connected by cosine distance <= 0.05); ``--families`` families
  are served at once, one request each in turn, and a family that has sent all its
  members makes room for the next. Every pass over all families runs in fresh tenants,
  so a request's likely source is its family's previous member, about ``--families``
  requests earlier, for the whole run: reuse stays stationary while new KV keeps coming.
* **every tier evicts.** The daemon's CPU tier holds ``--families`` / 4 prompts' KV (of
  the stream's mean length), Redis ``maxmemory`` / 2, the disk tier (compressed) x 2 and
  the index x 4 entries, far below what the run writes; vLLM's own KV cache is 512 MiB
  per engine. ``--set cpu_bytes=``, ``disk_bytes=`` and ``index_max_entries=`` override
  the daemon's caps.
* **wrong answers are checked where the project asserts equality.** Every
  ``--check-every``-th request starts a check while the other clients pause (so batching
  does not change the numbers): a prompt is served in a fresh tenant on one engine (full
  compute, stored), and once the daemon has indexed it, served again in that tenant on
  the other engine, which claims it and fills the KV loaded from the daemon's tiers
  (exact KV: a verbatim repeat), and in another fresh tenant on that engine (full
  compute, not stored). The two greedy answers (``--check-tokens`` tokens) must be equal
  token for token, as ``tests/connector/test_connector.py`` asserts for an identical
  prompt. That equality holds under the same split only: the claim ends where vanilla
  vLLM's chunked prefill ends its first step (equal KV computed in other step shapes
  differs in the last bits, enough to flip a greedy token now and then). So the engines
  prefill ``STEP_TOKENS`` per step and a check's prompt is a stream prompt cut to the
  length whose claim ends at that step (``STEP_TOKENS`` + the tail vLLM computes + 1). A
  check whose first request reused anything, whose repeat claimed another split, or
  that failed, counts apart (it compares nothing).

Every ``--sample-s`` seconds it samples each process's RSS and open file descriptors
(every process of each engine's tree, vLLM's EngineCore among them, as its own series),
the disk tier's file bytes against its cap, Redis ``used_memory`` against ``maxmemory``,
the daemon's index rows and every tier's eviction counters. Hit rate per minute comes
from the load reports in the responses (a hit: kvshare claimed tokens).

Results, after the warm-up (first 20% of the run unless ``--warmup-minutes``):
``rss_growth`` (median RSS of the last window over that of the first, minus 1, per
process), ``disk_max_over_cap`` (bytes; <= 0 while the cap holds), ``wrong_answers``,
``hit_rate_slope`` (least-squares slope of the per-minute hit rate, per minute),
``engine_restarts`` (sampled processes gone) and ``failed_requests`` (HTTP errors).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import json
import math
import os
import re
import statistics
import tempfile
import threading
import time
import urllib.error
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvshare.bench.engine_config import add_config_arguments
from kvshare.bench.workload import add_prompt_length_arguments, check_prompt_lengths

DEFAULT_JSON = Path("results/soak.json")
DEFAULT_PLOT = Path("results/soak.png")
WARMUP_SHARE = 0.2
"""Share of the run treated as warm-up when ``--warmup-minutes`` is not given."""
GROWTH_WINDOW_S = 120.0
"""Span of the first and last post-warm-up windows whose median RSS ``rss_growth`` compares
(shortened to a fifth of the post-warm-up time on short runs)."""
ENGINE_KV_BYTES = 512 << 20
"""vLLM's own KV cache per engine: small, so its prefix cache evicts too."""
STEP_TOKENS = 1024
"""The engines' ``--max-num-batched-tokens``, where the checks' claims end (see above)."""
COMMIT_WAIT_S = 30.0
"""A check waits this long for its stored prompt to reach the daemon's index."""
HTTP_TIMEOUT_S = 300.0
ENGINE_ONLY_KEYS = frozenset({"home", "mode", "daemon_address"})
"""Config keys the benchmark sets per process: not passed on to the daemon's file."""
SHADOW_CHECKS_METRIC = "vllm:kvshare_shadow_checks_total"
REQUEST_ERRORS = (urllib.error.URLError, http.client.HTTPException, OSError, ValueError)
"""What a failed request raises: HTTP errors, a dropped connection, a reply cut short or
not JSON."""

EPILOG = """\
targets (issue 12, a run of >= 30 minutes): rss_growth < 0.10 for every process,
disk_max_over_cap <= 0, hit_rate_slope not negative beyond noise, engine_restarts 0,
failed_requests 0, wrong_answers 0.

examples:
  kvshare bench soak --minutes 2 --clients 2              # smoke run, about 6 minutes
  kvshare bench soak --minutes 30 --clients 4 --json results/soak.json --plot results/soak.png
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--minutes", type=float, default=30.0, metavar="M",
                        help="minutes of traffic after both engines are ready (default: 30; "
                             "start-up adds 3-5 minutes on 2 CPU cores)")
    parser.add_argument("--clients", type=int, default=4, metavar="C",
                        help="concurrent clients, each sending one request at a time, "
                             "alternating engines (default: 4)")
    parser.add_argument("--warmup-minutes", type=float, metavar="W",
                        help="minutes left out of the growth and slope figures (default: 20%% "
                             "of --minutes)")
    parser.add_argument("--families", type=int, default=16, metavar="F",
                        help="prompt families served at once: the reuse distance in requests, "
                             "and the unit the tier caps are sized in (default: 16)")
    parser.add_argument("--check-every", type=int, default=20, metavar="K",
                        help="every K-th request starts a full-compute check (default: 20)")
    parser.add_argument("--check-tokens", type=int, default=16,
                        help="greedy tokens compared in a check (default: 16)")
    parser.add_argument("--answer-tokens", type=int, default=16,
                        help="greedy tokens of each traffic request (default: 16)")
    parser.add_argument("--sample-s", type=float, default=5.0,
                        help="seconds between samples of the processes and tiers (default: 5)")
    add_prompt_length_arguments(parser, 200, 1500)
    add_config_arguments(parser)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, metavar="PATH",
                        help=f"write the results as JSON (default: {DEFAULT_JSON})")
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT, metavar="PATH",
                        help=f"write the curves as a PNG (default: {DEFAULT_PLOT})")


# ------------------------------------------------------------------ what is recorded
@dataclass
class Served:
    """One traffic request. Times are seconds since traffic started."""

    t_s: float
    engine: str
    tenant: str
    prompt_tokens: int
    claimed: int = 0
    reused: int = 0
    latency_s: float = 0.0
    error: str = ""

    @property
    def hit(self) -> bool:
        return self.claimed > 0


@dataclass
class Check:
    """One full-compute check (see the module docstring)."""

    check_id: str
    t_s: float
    stored_on: str
    checked_on: str
    prompt_tokens: int
    outcome: str
    """``match``, ``mismatch``, ``reference_claimed`` (the first request reused something),
    ``not_indexed`` (not in the index within ``COMMIT_WAIT_S``), ``other_split`` (the
    repeat's claim did not end at ``STEP_TOKENS``, or the full compute reused something)
    or ``error`` (an HTTP error)."""
    claimed: int = 0
    reused: int = 0
    first_difference: int | None = None
    """Position of the first differing answer token (a mismatch)."""
    answer: list[int] = field(default_factory=list)
    full_compute: list[int] = field(default_factory=list)


@dataclass
class Sample:
    """The state of every process and tier at ``t_s`` seconds after traffic started."""

    t_s: float
    rss_bytes: dict[str, int]
    open_fds: dict[str, int]
    disk_bytes: int
    redis_used_bytes: int
    index_rows: int
    evictions: dict[str, int]
    """Cumulative evictions per tier (``cpu``, ``disk``, ``redis``, ``index``)."""
    shared_bytes: dict[str, int] = field(default_factory=dict)
    """The part of each process's RSS that is file-backed or shared memory (the model's
    mapped weights, the daemon's shared-memory CPU tier as it is touched): RSS minus it is
    the process's own (anonymous) memory, where a leak or allocator retention shows."""
    shadow_checks: dict[str, int] = field(default_factory=dict)
    """Cumulative shadow checks per engine. An engine's worker loads a copy of the model
    (about 270 MB for SmolLM2-135M) at its first one: a step in its RSS, not a leak."""


@dataclass(frozen=True)
class Caps:
    """What each tier may hold, sized so that every one of them evicts within minutes."""

    cpu_bytes: int
    disk_bytes: int
    redis_bytes: int
    index_entries: int


# ------------------------------------------------------------------ pure analysis
def least_squares_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Slope of the least-squares line through (xs, ys); None with fewer than 2 distinct xs."""
    if len(xs) != len(ys):
        raise ValueError(f"xs and ys differ in length: {len(xs)} vs {len(ys)}")
    if len(set(xs)) < 2:
        return None
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    covariance = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    variance = sum((x - mean_x) ** 2 for x in xs)
    return covariance / variance


def slope_standard_error(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Standard error of :func:`least_squares_slope` (residuals with n - 2 degrees of
    freedom); None with fewer than 3 points. A slope within about two of these of 0 is no
    trend."""
    slope = least_squares_slope(xs, ys)
    if slope is None or len(xs) < 3:
        return None
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    residuals = sum((y - mean_y - slope * (x - mean_x)) ** 2 for x, y in zip(xs, ys))
    return math.sqrt(residuals / (len(xs) - 2) / sum((x - mean_x) ** 2 for x in xs))


def growth(times: Sequence[float], values: Sequence[float], start_s: float, end_s: float,
           window_s: float) -> float | None:
    """(median of ``values`` in the last ``window_s`` before ``end_s`` - median in the first
    ``window_s`` from ``start_s``) / the first; None when a window has no sample or the
    first median is 0."""
    first = [v for t, v in zip(times, values) if start_s <= t < start_s + window_s]
    last = [v for t, v in zip(times, values) if end_s - window_s < t <= end_s]
    if not first or not last or statistics.median(first) == 0:
        return None
    return statistics.median(last) / statistics.median(first) - 1.0


def max_over_cap(values: Sequence[float], cap: float) -> float | None:
    """Largest ``value - cap`` over the samples (<= 0 while the cap held); None if none."""
    return max(values) - cap if values else None


def per_minute_hit_rates(served: Sequence[Served], minutes: float
                         ) -> list[tuple[int, float, int]]:
    """``(minute, hit rate, requests)`` for every full minute of traffic with a request
    (failed requests left out); minute m covers ``[60 m, 60 (m + 1))`` seconds."""
    buckets: dict[int, list[bool]] = {}
    for request in served:
        minute = int(request.t_s // 60)
        if not request.error and minute < int(minutes):
            buckets.setdefault(minute, []).append(request.hit)
    return [(minute, sum(hits) / len(hits), len(hits))
            for minute, hits in sorted(buckets.items())]


def hit_rate_slope(rates: Sequence[tuple[int, float, int]], warmup_minutes: float
                   ) -> tuple[float | None, float | None]:
    """Per-minute slope of the hit rate over the minutes that start after the warm-up, and
    its standard error."""
    after = [(minute + 0.5, rate) for minute, rate, _ in rates if minute >= warmup_minutes]
    xs, ys = [m for m, _ in after], [r for _, r in after]
    return least_squares_slope(xs, ys), slope_standard_error(xs, ys)


def anonymous_series(samples: Sequence[Sample], name: str) -> tuple[list[float], list[float]]:
    """(times, RSS minus its shared part) of one process (see ``Sample.shared_bytes``)."""
    pairs = [(s.t_s, s.rss_bytes[name] - s.shared_bytes[name]) for s in samples
             if name in s.rss_bytes and name in s.shared_bytes]
    return [t for t, _ in pairs], [v for _, v in pairs]


def analyse(samples: Sequence[Sample], served: Sequence[Served], checks: Sequence[Check],
            caps: Caps, minutes: float, warmup_minutes: float) -> dict[str, Any]:
    """The headline figures of one run (see the module docstring)."""
    warmup_s, end_s = 60.0 * warmup_minutes, 60.0 * minutes
    window_s = min(GROWTH_WINDOW_S, (end_s - warmup_s) / 5)
    times = [s.t_s for s in samples]
    names = sorted({name for s in samples for name in s.rss_bytes})

    def series(attribute: str, name: str) -> tuple[list[float], list[float]]:
        pairs = [(s.t_s, getattr(s, attribute)[name]) for s in samples
                 if name in getattr(s, attribute)]
        return [t for t, _ in pairs], [v for _, v in pairs]

    rates = per_minute_hit_rates(served, minutes)
    slope, slope_error = hit_rate_slope(rates, warmup_minutes)
    first_shadow = {name: min((s.t_s for s in samples if s.shadow_checks.get(name, 0) > 0),
                              default=None)
                    for name in sorted({n for s in samples for n in s.shadow_checks})}
    after = [r for r in served if r.t_s >= warmup_s and not r.error]
    compared = [c for c in checks if c.outcome in ("match", "mismatch")]
    return {
        "rss_growth": {name: growth(*series("rss_bytes", name), warmup_s, end_s, window_s)
                       for name in names},
        "anonymous_rss_growth": {name: growth(*anonymous_series(samples, name), warmup_s,
                                              end_s, window_s)
                                 for name in names},
        "fd_growth": {name: growth(*series("open_fds", name), warmup_s, end_s, window_s)
                      for name in names},
        "disk_max_over_cap": max_over_cap([s.disk_bytes for s in samples], caps.disk_bytes),
        "redis_max_over_maxmemory": max_over_cap([s.redis_used_bytes for s in samples],
                                                 caps.redis_bytes),
        "index_max_over_cap": max_over_cap([s.index_rows for s in samples],
                                           caps.index_entries),
        "hit_rate_slope": slope,
        "hit_rate_slope_stderr": slope_error,
        "hit_rate_after_warmup": (sum(r.hit for r in after) / len(after)) if after else None,
        "reused_share_after_warmup": (sum(r.reused for r in after)
                                      / sum(r.prompt_tokens for r in after)) if after else None,
        "hit_rate_per_minute": [{"minute": m, "hit_rate": rate, "requests": n}
                                for m, rate, n in rates],
        "wrong_answers": sum(c.outcome == "mismatch" for c in compared),
        "checks_compared": len(compared),
        "checks_not_compared": {outcome: sum(c.outcome == outcome for c in checks)
                                for outcome in ("reference_claimed", "not_indexed",
                                                "other_split", "error")},
        "mismatches": [{"check_id": c.check_id, "first_difference": c.first_difference}
                       for c in compared if c.outcome == "mismatch"],
        "requests": len(served),
        "failed_requests": sum(bool(r.error) for r in served),
        "evictions": dict(samples[-1].evictions) if samples else {},
        "first_shadow_check_s": first_shadow,
        "shadow_model_loaded_after_warmup": sorted(
            name for name, t in first_shadow.items() if t is not None and t >= warmup_s),
        "samples": len(times),
        "growth_window_s": window_s,
    }


# ------------------------------------------------------------------ the stream
def prompt_families(embeddings, max_distance: float) -> list[list[int]]:
    """Rows of ``embeddings`` (unit-norm, in arrival order) grouped by single linkage at
    cosine distance <= ``max_distance``: families of two or more, each in arrival order,
    ordered by their first member."""
    import numpy as np

    parent = list(range(len(embeddings)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    similar = np.asarray(embeddings) @ np.asarray(embeddings).T >= 1.0 - max_distance
    for i, j in zip(*np.nonzero(np.triu(similar, 1))):
        parent[root(int(i))] = root(int(j))
    groups: dict[int, list[int]] = {}
    for i in range(len(embeddings)):
        groups.setdefault(root(i), []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def family_stream(families: Sequence[Sequence[int]], active: int
                  ) -> Iterator[tuple[str, int]]:
    """An endless stream of ``(tenant, prompt)``: ``active`` families at once, one member
    each in turn; a family that has sent all its members is replaced by the next one.
    Families are taken in a cycle; each pass over them runs in tenant ``pass-<n>``, so a
    prompt never meets its own earlier copy, only its family's earlier members."""
    if not families or active < 1:
        raise ValueError(f"need families and active >= 1, got {len(families)} and {active}")
    upcoming = ((f"pass-{n}", family) for n in itertools.count()
                for family in families)
    slots = [iter([(tenant, p) for p in family])
             for tenant, family in itertools.islice(upcoming, min(active, len(families)))]
    while True:
        for i, slot in enumerate(slots):
            request = next(slot, None)
            if request is None:
                tenant, family = next(upcoming)
                slots[i] = slot = iter([(tenant, p) for p in family])
                request = next(slot)
            yield request


def sized_caps(mean_prompt_kv_bytes: int, families: int, chunk_bytes: int) -> Caps:
    """Caps in units of the stream's mean prompt KV: the CPU tier holds ``families`` / 4
    prompts, Redis / 2, the disk (compressed) x 2 and the index x 4 entries; each is at
    least 4 chunks, so a prompt always fits."""
    def prompts(n: float) -> int:
        return max(int(n * mean_prompt_kv_bytes), 4 * chunk_bytes)

    return Caps(cpu_bytes=prompts(families / 4), disk_bytes=prompts(2 * families),
                redis_bytes=prompts(families / 2), index_entries=4 * families)


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Position of the first differing token (the shorter length if one is a prefix of
    the other); None when equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# ------------------------------------------------------------------ the processes
class ProcessTree:
    """The processes of one started program, each sampled as its own series.

    The tree is read once, after the program is ready: ``kvshare serve`` runs vLLM's API
    server, which runs EngineCore. A process of that snapshot that is gone later counts as
    a restart (vLLM does not restart its EngineCore; a new one would be a new process)."""

    def __init__(self, name: str, pid: int) -> None:
        import psutil

        root = psutil.Process(pid)
        self.processes: dict[str, Any] = {name: root}
        for child in root.children(recursive=True):
            label = f"{name}/{_role(child)}"
            for n in itertools.count(2):
                if label not in self.processes:
                    break
                label = f"{name}/{_role(child)}-{n}"
            self.processes[label] = child
        self.gone: set[str] = set()

    def sample(self, rss: dict[str, int], shared: dict[str, int], fds: dict[str, int]
               ) -> None:
        import psutil

        for label, process in self.processes.items():
            if label in self.gone:
                continue
            try:
                with process.oneshot():
                    memory = process.memory_info()
                    rss[label], shared[label] = memory.rss, memory.shared
                    fds[label] = process.num_fds()
            except psutil.NoSuchProcess:
                self.gone.add(label)


def _role(process) -> str:
    """A stable label: vLLM's process title when it set one (``VLLM::EngineCore``), else
    the program and module it runs."""
    import psutil

    try:
        cmdline = process.cmdline()
    except psutil.Error:
        return process.name()
    head = cmdline[0] if cmdline else process.name()
    if "::" in head:
        return head.split("::", 1)[1].split()[0]
    for flag in ("-m", "-c"):  # a module, or code importing one (multiprocessing's helpers)
        if flag in cmdline[:-1]:
            names = re.findall(r"[A-Za-z_][\w.]*", cmdline[cmdline.index(flag) + 1])
            parts = [part for name in names for part in name.split(".")
                     if part not in ("from", "import", "main", "entry", "__main__")]
            if parts:
                return parts[-1] if flag == "-m" else parts[1 if len(parts) > 1 else 0]
    return os.path.basename(head)


class Quiet:
    """Requests share the engines; a check takes them alone (waits for the requests in
    flight, holds new ones back until it is done)."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._in_flight = 0
        self._exclusive = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._condition:
            self._condition.wait_for(lambda: not self._exclusive)
            self._in_flight += 1
        try:
            yield
        finally:
            with self._condition:
                self._in_flight -= 1
                self._condition.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._condition:
            self._condition.wait_for(lambda: not self._exclusive)
            self._exclusive = True
            self._condition.wait_for(lambda: self._in_flight == 0)
        try:
            yield
        finally:
            with self._condition:
                self._exclusive = False
                self._condition.notify_all()


def directory_bytes(root: Path) -> int:
    """Bytes of the files under ``root`` (the disk tier's files, ``.tmp`` ones included)."""
    total = 0
    for directory, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # evicted while we walk
                total += os.stat(os.path.join(directory, name)).st_size
    return total


# ------------------------------------------------------------------ the run
@dataclass
class Traffic:
    """What the client threads share."""

    servers: list
    prompts: list[list[int]]
    check_prompts: list[list[int]]
    """Prompts cut to the length whose claim ends at ``STEP_TOKENS``."""
    stream: Iterator[tuple[str, int]]
    args: argparse.Namespace
    started: float
    deadline: float
    client: Any
    """A DaemonClient, for the checks' wait for the index."""
    served: list[Served] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    quiet: Quiet = field(default_factory=Quiet)
    lock: threading.Lock = field(default_factory=threading.Lock)
    count: int = 0

    def now(self) -> float:
        return time.monotonic() - self.started

    def next_request(self) -> tuple[int, str, int]:
        with self.lock:
            self.count += 1
            tenant, prompt = next(self.stream)
            return self.count, tenant, prompt


def client_loop(traffic: Traffic) -> None:
    from kvshare.bench.servers import load_report

    while time.monotonic() < traffic.deadline:
        number, tenant, prompt = traffic.next_request()
        if number % traffic.args.check_every == 0:
            with traffic.quiet.exclusive():
                if time.monotonic() < traffic.deadline:
                    traffic.checks.append(run_check(traffic,
                                                    number // traffic.args.check_every))
        server = traffic.servers[number % 2]
        ids = traffic.prompts[prompt]
        with traffic.quiet.shared():
            sent = time.monotonic()
            try:
                response = server.complete(ids, tenant, max_tokens=traffic.args.answer_tokens,
                                           timeout_s=HTTP_TIMEOUT_S)
            except REQUEST_ERRORS as exc:
                traffic.served.append(Served(traffic.now(), server.name, tenant, len(ids),
                                             error=f"{type(exc).__name__}: {exc}"))
                continue
        report = load_report(response)
        traffic.served.append(Served(traffic.now(), server.name, tenant, len(ids),
                                     report.get("claimed", 0), report.get("reused", 0),
                                     time.monotonic() - sent))


def run_check(traffic: Traffic, number: int) -> Check:
    """One check, with the engines to itself (see the module docstring)."""
    from kvshare.bench.servers import load_report
    from kvshare.connector.scheduler import STORE_ARG
    from kvshare.remote.client import DaemonUnavailable

    stored_on, checked_on = traffic.servers[number % 2], traffic.servers[(number + 1) % 2]
    # A stride prime to most lengths walks the whole list, far from the last check's family.
    ids = traffic.check_prompts[(number * 7) % len(traffic.check_prompts)]
    tenant = f"check-{number}"
    check = Check(tenant, traffic.now(), stored_on.name, checked_on.name, len(ids), "error")
    tokens = traffic.args.check_tokens

    def ask(server, salt: str, store: bool) -> dict[str, Any]:
        return server.complete(ids, salt, max_tokens=tokens, xargs={STORE_ARG: int(store)},
                               return_token_ids=True, timeout_s=HTTP_TIMEOUT_S)

    try:
        if load_report(ask(stored_on, tenant, store=True)).get("claimed", 0):
            check.outcome = "reference_claimed"
            return check
        if not wait_for_entry(traffic.client, tenant):
            check.outcome = "not_indexed"
            return check
        repeat = ask(checked_on, tenant, store=False)
        full = ask(checked_on, f"{tenant}-full", store=False)
    except (*REQUEST_ERRORS, DaemonUnavailable):
        return check
    report = load_report(repeat)
    check.claimed, check.reused = report.get("claimed", 0), report.get("reused", 0)
    check.answer = repeat["choices"][0]["token_ids"]
    check.full_compute = full["choices"][0]["token_ids"]
    if check.claimed != STEP_TOKENS or load_report(full).get("claimed", 0):
        check.outcome = "other_split"
        return check
    check.first_difference = first_difference(check.answer, check.full_compute)
    check.outcome = "match" if check.first_difference is None else "mismatch"
    return check


def wait_for_entry(client, tenant: str) -> bool:
    """Until the daemon's index holds an entry of ``tenant`` (False after COMMIT_WAIT_S)."""
    deadline = time.monotonic() + COMMIT_WAIT_S
    while time.monotonic() < deadline:
        partitions = client.stats().index["partitions"]
        if any(name.rsplit("/", 1)[1] == tenant for name in partitions):
            return True
        time.sleep(0.05)  # polling a condition with a deadline
    return False


class Sampler:
    """Samples the processes and tiers every ``interval_s`` on its own thread."""

    def __init__(self, trees: list[ProcessTree], servers: list, chunks_dir: Path,
                 redis_client, daemon_client, started: float) -> None:
        self.trees, self.servers, self.chunks_dir = trees, servers, chunks_dir
        self.redis, self.daemon = redis_client, daemon_client
        self.started = started
        self.samples: list[Sample] = []
        self.skipped = 0

    def sample(self) -> Sample | None:
        """A new sample, or None (counted in ``skipped``) when the daemon or Redis did not
        answer: a gone process shows as a restart, a slow one must not end the run."""
        import redis

        from kvshare.remote.client import DaemonUnavailable

        rss: dict[str, int] = {}
        shared: dict[str, int] = {}
        fds: dict[str, int] = {}
        for tree in self.trees:
            tree.sample(rss, shared, fds)
        try:
            stats = self.daemon.stats()
            redis_stats, redis_memory = self.redis.info("stats"), self.redis.info("memory")
        except (DaemonUnavailable, redis.RedisError):
            self.skipped += 1
            return None
        evictions = {name: tier.evictions for name, tier in stats.tiers.items()
                     if name != "redis"}
        evictions["redis"] = int(redis_stats["evicted_keys"])
        evictions["index"] = int(stats.index["evicted_since_open"])
        shadow = {}
        for server in self.servers:
            with contextlib.suppress(RuntimeError, OSError):  # not exported yet, or down
                shadow[server.name] = int(server.metric(SHADOW_CHECKS_METRIC))
        sample = Sample(time.monotonic() - self.started, rss, fds,
                        directory_bytes(self.chunks_dir),
                        int(redis_memory["used_memory"]),
                        int(stats.index["entries"]), evictions, shared, shadow)
        self.samples.append(sample)
        return sample

    @property
    def restarts(self) -> list[str]:
        return sorted(label for tree in self.trees for label in tree.gone)


def run(args: argparse.Namespace) -> int:
    import psutil  # noqa: F401  (fail before minutes of start-up when it is missing)
    import redis
    import yaml

    from kvshare.bench.engine_config import base_config, parse_sets
    from kvshare.bench.hitrate import smollm2_kv_bytes_per_token
    from kvshare.bench.servers import DaemonProcess, Server, free_port, link_model, serve_options
    from kvshare.bench.workload import SIMILAR_MAX_COSINE_DISTANCE
    from kvshare.config import CONFIG_ENV, KVShareConfig
    from kvshare.model_assets import SMOLLM2_ALIAS, resolve_model_dir
    from kvshare.remote.client import DaemonClient
    from kvshare.storage.redis_server import RedisServer

    check_arguments(args)
    warmup_minutes = (args.warmup_minutes if args.warmup_minutes is not None
                      else WARMUP_SHARE * args.minutes)
    base = base_config(args.config, args.sets)
    sets = parse_sets(args.sets)
    prompts, families = stream_prompts(args, base, SIMILAR_MAX_COSINE_DISTANCE)
    bytes_per_token = smollm2_kv_bytes_per_token()
    mean_tokens = statistics.fmean(len(prompts[p]) for f in families for p in f)
    caps = sized_caps(int(mean_tokens * bytes_per_token), args.families,
                      base.chunk_tokens * bytes_per_token)
    caps = Caps(cpu_bytes=int(sets.get("cpu_bytes", caps.cpu_bytes)),
                disk_bytes=int(sets.get("disk_bytes", caps.disk_bytes)),
                redis_bytes=caps.redis_bytes,
                index_entries=int(sets.get("index_max_entries", caps.index_entries)))
    longest = max(map(len, prompts))
    split_length = STEP_TOKENS + 1 + (base.recompute_tail_tokens
                                      if base.recompute_tail_by == "vllm" else 0)
    check_prompts = [p[:split_length] for p in prompts if len(p) >= split_length]
    if not check_prompts:
        raise SystemExit(f"the checks need prompts of >= {split_length} tokens; none of "
                         f"--max-tokens {args.max_tokens} is that long")
    model_dir = resolve_model_dir(SMOLLM2_ALIAS, base.home_dir)
    print(f"soak: {args.minutes:g} min, {args.clients} clients, {len(families)} families "
          f"({sum(map(len, families))} prompts, mean {mean_tokens:.0f} tokens), "
          f"{args.families} at once; caps: cpu {caps.cpu_bytes >> 20} MiB, disk "
          f"{caps.disk_bytes >> 20} MiB, redis {caps.redis_bytes >> 20} MiB, index "
          f"{caps.index_entries} entries; warm-up {warmup_minutes:g} min")
    with tempfile.TemporaryDirectory(prefix="kvshare-soak-") as scratch, \
            RedisServer(maxmemory_bytes=caps.redis_bytes) as redis_server:
        root = Path(scratch)
        address = f"ipc://{root / 'daemon.sock'}"
        daemon_home = root / "daemon"
        defaults = KVShareConfig().to_dict()
        daemon_settings = {**{key: value for key, value in base.to_dict().items()
                              if value != defaults[key] and key not in ENGINE_ONLY_KEYS},
                           "metrics_port": 0, "cpu_bytes": caps.cpu_bytes,
                           "disk_bytes": caps.disk_bytes, "redis_url": redis_server.url,
                           "index_max_entries": caps.index_entries}
        (root / "daemon.yaml").write_text(yaml.safe_dump(
            {key: str(value) if isinstance(value, Path) else value
             for key, value in daemon_settings.items()}))
        daemon = DaemonProcess(daemon_home, address, root / "daemon.log",
                               config=root / "daemon.yaml")
        client = DaemonClient(address, timeout_ms=10_000)
        redis_client = redis.Redis.from_url(redis_server.url)
        servers: list[Server] = []
        try:
            daemon.wait_ready(client)
            config_file = args.config or os.environ.get(CONFIG_ENV)
            common = [SMOLLM2_ALIAS, "--host", "127.0.0.1", "--enforce-eager",
                      *(["--kvshare-config", str(config_file)] if config_file else []),
                      "--max-model-len", str(max(2048, longest + 64 + args.answer_tokens)),
                      "--max-num-batched-tokens", str(STEP_TOKENS),
                      "--kv-cache-memory-bytes", str(ENGINE_KV_BYTES)]
            for name in ("a", "b"):
                home = root / f"engine-{name}"
                link_model(home, SMOLLM2_ALIAS, model_dir)
                options = serve_options({**sets, "mode": "remote", "daemon_address": address,
                                         "home": str(home)})
                servers.append(Server(f"engine-{name}", free_port(), common + options,
                                      home / "serve.log"))
            for server in servers:
                server.wait_ready()
            redis_pid = int(redis_client.info("server")["process_id"])
            trees = [ProcessTree("daemon", daemon.process.pid),
                     ProcessTree("redis", redis_pid),
                     *(ProcessTree(s.name, s.process.pid) for s in servers)]
            started = time.monotonic()
            traffic = Traffic(servers, prompts, check_prompts,
                              family_stream(families, args.families), args, started,
                              started + 60.0 * args.minutes, client)
            sampler = Sampler(trees, servers, daemon_home / "chunks", redis_client, client, started)
            drive(traffic, sampler, args)
        finally:
            client.close()
            for server in servers:
                server.stop()
            daemon.stop()
            redis_client.close()
    minutes_run = min(args.minutes, (traffic.deadline - traffic.started) / 60)
    summary = analyse(sampler.samples, traffic.served, traffic.checks, caps, minutes_run,
                      warmup_minutes)
    summary.update(engine_restarts=len(sampler.restarts), restarted=sampler.restarts,
                   samples_skipped=sampler.skipped, minutes=minutes_run,
                   warmup_minutes=warmup_minutes, clients=args.clients,
                   families_at_once=args.families, caps=asdict(caps),
                   config_overrides=sets, processes=sorted({name for s in sampler.samples
                                                            for name in s.rss_bytes}))
    print_summary(summary)
    write_plot(args.plot, sampler.samples, summary, caps, warmup_minutes)
    summary.update(checks=[asdict(c) for c in traffic.checks],
                   served=[asdict(r) for r in traffic.served],
                   series=[asdict(s) for s in sampler.samples])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2))
    print(f"JSON written to {args.json}, plot to {args.plot}")
    return 0


def check_arguments(args: argparse.Namespace) -> None:
    """Exit naming the first bad option."""
    check_prompt_lengths(args)
    for name, value, low in (("--minutes", args.minutes, 0.5), ("--clients", args.clients, 1),
                             ("--families", args.families, 1),
                             ("--check-every", args.check_every, 2),
                             ("--check-tokens", args.check_tokens, 1),
                             ("--answer-tokens", args.answer_tokens, 1),
                             ("--sample-s", args.sample_s, 0.5)):
        if value < low:
            raise SystemExit(f"{name} must be >= {low}, got {value}")
    if args.warmup_minutes is not None and not 0 <= args.warmup_minutes < args.minutes:
        raise SystemExit(f"--warmup-minutes must be in [0, --minutes), got "
                         f"{args.warmup_minutes}")


def stream_prompts(args: argparse.Namespace, base, max_distance: float
                   ) -> tuple[list[list[int]], list[list[int]]]:
    """The similar stream's prompts in the length range (chat-template token ids) and their
    families (lists of positions in that list)."""
    from kvshare.bench.quality import chat_ids
    from kvshare.bench.workload import load_workload
    from kvshare.matching.embedder import make_embedder
    from kvshare.model_assets import load_tokenizer

    tokenizer = load_tokenizer(base.model)
    workload = load_workload(base, make_embedder(base.embedder, base.embed_max_chars),
                             tokenizer)
    chosen = [p for p in workload.similar_positions()
              if args.min_tokens <= len(workload.token_ids[p]) <= args.max_tokens]
    families = prompt_families(workload.embeddings[chosen], max_distance)
    prompts = [chat_ids(tokenizer, workload.texts[p]) for p in chosen]
    if not families:
        raise SystemExit(f"no two similar-stream prompts of {args.min_tokens}.."
                         f"{args.max_tokens} tokens are similar: widen the range")
    return prompts, families


def drive(traffic: Traffic, sampler: Sampler, args: argparse.Namespace) -> None:
    """Run the clients until the deadline, sampling every ``--sample-s`` with a progress bar."""
    from tqdm import tqdm

    threads = [threading.Thread(target=client_loop, args=(traffic,), daemon=True,
                                name=f"soak-client-{i}") for i in range(args.clients)]
    for thread in threads:
        thread.start()
    total_s = int(60 * args.minutes)
    with tqdm(total=total_s, desc="soak", unit="s") as bar:
        next_sample = traffic.started
        while any(thread.is_alive() for thread in threads):
            try:
                sampler.sample()
                done = traffic.served
                recent = done[-200:]
                bar.n = min(total_s, int(traffic.now()))
                bar.set_postfix(requests=len(done),
                                hit=f"{sum(r.hit for r in recent) / max(1, len(recent)):.2f}",
                                checks=len(traffic.checks),
                                wrong=sum(c.outcome == "mismatch" for c in traffic.checks),
                                errors=sum(bool(r.error) for r in done), refresh=False)
                bar.refresh()
                next_sample += args.sample_s
                time.sleep(max(0.0, next_sample - time.monotonic()))  # the sampling period
            except KeyboardInterrupt:  # stop early, keep what was measured
                print("\nsoak: interrupted; finishing the requests in flight")
                traffic.deadline = time.monotonic()
                for thread in threads:
                    thread.join()
    sampler.sample()


def print_summary(summary: dict[str, Any]) -> None:
    def percent(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:+.1f}%"

    print(f"\n{'process':<28} {'rss growth':>11} {'anonymous':>10} {'fd growth':>10}")
    for name in summary["processes"]:
        print(f"{name:<28} {percent(summary['rss_growth'].get(name)):>11} "
              f"{percent(summary['anonymous_rss_growth'].get(name)):>10} "
              f"{percent(summary['fd_growth'].get(name)):>10}")
    slope, slope_error = summary["hit_rate_slope"], summary["hit_rate_slope_stderr"]
    rows = [
        ("requests (failed)", f"{summary['requests']} ({summary['failed_requests']})"),
        ("hit rate after warm-up", percent(summary["hit_rate_after_warmup"]).lstrip("+")),
        ("reused share after warm-up",
         percent(summary["reused_share_after_warmup"]).lstrip("+")),
        ("hit rate slope", "n/a" if slope is None else f"{slope:+.4f} / min" + (
            "" if slope_error is None else f" (standard error {slope_error:.4f})")),
        ("disk max over cap", _bytes(summary["disk_max_over_cap"])),
        ("redis max over maxmemory", _bytes(summary["redis_max_over_maxmemory"])),
        ("index max over cap", str(summary["index_max_over_cap"])),
        ("evictions", ", ".join(f"{k} {v}" for k, v in summary["evictions"].items())),
        ("checks compared (wrong)", f"{summary['checks_compared']} "
                                    f"({summary['wrong_answers']})"),
        ("checks not compared", ", ".join(f"{k} {v}" for k, v in
                                          summary["checks_not_compared"].items())),
        ("engine restarts", f"{summary['engine_restarts']} {summary['restarted'] or ''}"),
    ]
    for label, value in rows:
        print(f"{label:<28} {value}")
    for name in summary["shadow_model_loaded_after_warmup"]:
        print(f"note: {name}'s first shadow check came after the warm-up; its worker loaded "
              "a copy of the model then (a step in its RSS growth, not a leak)")


def _bytes(value: float | None) -> str:
    return "n/a" if value is None else f"{value / (1 << 20):+.1f} MiB"


def write_plot(path: Path, samples: Sequence[Sample], summary: dict[str, Any], caps: Caps,
               warmup_minutes: float) -> None:
    """One panel per quantity, against minutes of traffic; dashed lines are caps, the dotted
    one the end of the warm-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s.t_s / 60 for s in samples]
    fig, axes = plt.subplots(3, 2, figsize=(13, 11))
    mib = 1 << 20
    (rss, fds), (disk, redis_ax), (index, hits) = axes
    for axis in (rss, fds):  # a dozen processes: more colours than the default cycle
        axis.set_prop_cycle(color=plt.get_cmap("tab20").colors)
    for name in summary["processes"]:
        pairs = [(m, s.rss_bytes[name] / mib, s.open_fds[name])
                 for m, s in zip(minutes, samples) if name in s.rss_bytes]
        rss.plot([p[0] for p in pairs], [p[1] for p in pairs], label=name)
        fds.plot([p[0] for p in pairs], [p[2] for p in pairs], label=name)
    rss.set(title="RSS per process", ylabel="MiB")
    fds.set(title="open file descriptors per process", ylabel="fds")
    rss.legend(fontsize=6, ncol=2)
    for axis, values, cap, title, unit in (
            (disk, [s.disk_bytes / mib for s in samples], caps.disk_bytes / mib,
             "disk tier file bytes vs disk_bytes", "MiB"),
            (redis_ax, [s.redis_used_bytes / mib for s in samples], caps.redis_bytes / mib,
             "Redis used_memory vs maxmemory", "MiB"),
            (index, [s.index_rows for s in samples], caps.index_entries,
             "daemon index rows vs index_max_entries", "entries")):
        axis.plot(minutes, values)
        axis.axhline(cap, linestyle="--", color="red", label="cap")
        axis.set(title=title, ylabel=unit)
        axis.legend(fontsize=7)
    per_minute = summary["hit_rate_per_minute"]
    hits.plot([r["minute"] + 0.5 for r in per_minute], [r["hit_rate"] for r in per_minute],
              marker="o")
    hits.set(title="hit rate per minute (kvshare claimed tokens)", ylabel="share of requests",
             ylim=(0, 1))
    for axis in axes.flat:
        axis.axvline(warmup_minutes, linestyle=":", color="gray")
        axis.set_xlabel("minutes of traffic")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
