"""kvshare configuration: one typed object, layered like LMCache's.

Precedence, lowest first: dataclass defaults < YAML file (path in ``KVSHARE_CONFIG``
or passed explicitly) < vLLM ``kv_connector_extra_config`` < ``KVSHARE_<FIELD>``
environment variables. Unknown keys and ill-typed values are errors that name the key,
because a silently ignored typo in a cache config shows up weeks later as a low hit rate.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvshare.storage.redis_url import SERVER_SCHEMES, URL_FORMS, is_cluster_url, parse_cluster_url

ENV_PREFIX = "KVSHARE_"
CONFIG_ENV = "KVSHARE_CONFIG"


CODECS = ("raw", "zstd", "zstd-byteplane")
"""Chunk payload encodings (``kvshare.storage.codec``)."""
MAX_INT64 = (1 << 63) - 1
"""The largest value of any integer key (about 9.2 EB): byte counts go to C calls, numpy
and msgpack as signed 64-bit integers."""
MIN_MESSAGE_BYTES = 1 << 20
"""The smallest ``daemon_max_message_bytes``: a lookup's header alone may take hundreds of
KB (the prompt's text and token ids)."""


class ConfigError(ValueError):
    """A config key is unknown or its value is invalid; the message names the key."""


def host_memory_bytes() -> int:
    """Physical memory of this host, in bytes (the ceiling of the CPU tier)."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_home() -> Path:
    """Where kvshare keeps its index, chunks and model conversions by default."""
    return Path(os.environ.get("KVSHARE_HOME", Path.home() / ".cache" / "kvshare"))


@dataclass
class KVShareConfig:
    """Every tunable of kvshare. Units are in the field names or docstrings."""

    # --- identity and scope -------------------------------------------------------
    model: str = "smollm2-135m-instruct"
    """Model whose KV is shared: a local model directory or a known alias."""
    home: str = ""
    """Root directory for kvshare state; empty means ``$KVSHARE_HOME`` or ~/.cache/kvshare."""
    share_public_scope: bool = True
    """Let tenants reuse entries of the public scope (``default_tenant``'s)."""
    default_tenant: str = ""
    """The scope of requests without a ``cache_salt``; empty is the public scope."""
    tenancy: str = "isolated"
    """Who reuses whose entries: ``isolated`` (a tenant its own, plus the public scope if
    ``share_public_scope``), ``groups`` (also every tenant of its ``tenant_groups``) or
    ``popular`` (also any entry that ``popular_min_tenants`` distinct tenants aligned to);
    see docs/security.md."""
    tenant_groups: dict[str, list[str]] = field(default_factory=dict)
    """``tenancy: groups``: group name -> its tenants; members reuse each other's entries."""
    popular_min_tenants: int = 3
    """``tenancy: popular``: distinct tenants whose prompts must align to an entry (its
    owner included) before other tenants may reuse it."""
    popular_min_reuse: float = 0.5
    """``tenancy: popular``: a prompt aligns to an entry when the entry alone would fill at
    least this share of the prompt's tokens."""
    tenant_quota_bytes: int = 0
    """KV bytes each tenant's entries may hold (their least recently used go first beyond
    it); 0 is unlimited."""

    # --- shared daemon ------------------------------------------------------------
    mode: str = "embedded"
    """``embedded`` (index and tiers inside each vLLM process) or ``remote`` (the connector
    asks the ``kvshare daemon`` at ``daemon_address``)."""
    daemon_address: str = ""
    """ZeroMQ address of the daemon: ``ipc://PATH`` or ``tcp://HOST:PORT``; empty is
    ``ipc://<home>/daemon.sock``. TCP requires ``daemon_secret``."""
    daemon_secret: str = ""
    """Shared secret of daemon and connectors over TCP: both derive ZeroMQ CURVE keys from
    it, so traffic is encrypted and a client without it cannot connect."""
    daemon_timeout_ms: int = 2000
    """A daemon call not answered within this is given up (the request claims nothing)."""
    daemon_threads: int = 2
    """Daemon threads serving calls."""
    daemon_max_message_bytes: int = 256 << 20
    """Largest message part (ZeroMQ frame) the daemon accepts; ZeroMQ disconnects a peer
    that sends a larger one before the daemon reads it. The largest legitimate part is one
    chunk's KV, ``chunk_tokens`` x the model's KV bytes per token: 5.9 MB for SmolLM2-135M
    and 84 MB for a 70B Llama (80 layers, 8 KV heads of 128, bf16) at 256 tokens."""
    metrics_port: int = 9401
    """The daemon's Prometheus ``/metrics`` port on 127.0.0.1; 0 disables it."""
    metrics_max_tenants: int = 32
    """Tenants with their own metric labels; the rest are counted as ``other``."""

    # --- embedding and retrieval ----------------------------------------------------
    embedder: str = "wordllama"
    """``wordllama`` (ships in its wheel) or a sentence-transformers model directory."""
    embed_max_chars: int = 4096
    """Only this many leading characters of a prompt are embedded (bounded cost)."""
    top_k: int = 8
    """Nearest entries fetched and aligned per lookup."""
    ann_index_min_rows: int = 20000
    """Build an ANN (IVF) vector index once the table holds this many rows."""
    index_flush_rows: int = 64
    """Entries buffered in memory (and searched there) before one batched LanceDB add."""
    index_max_entries: int = 100_000
    """Capacity of the entry index; the least recently used entries are dropped beyond it."""

    # --- alignment and reuse plan ---------------------------------------------------
    planner: str = "align"
    """``align`` (kvshare: token alignment, runs from several entries) or ``chunk256``
    (the CacheBlend/LMCache baseline: exact ``chunk_tokens`` chunks at any position)."""
    min_run_tokens: int = 8
    """Shortest run of equal tokens worth reusing; shorter matches are recomputed."""
    min_reuse_fraction: float = 0.5
    """A plan is claimed only if it reuses at least this share of the prompt."""
    min_reuse_tokens: int = 64
    """... and at least this many tokens."""

    # --- storage ----------------------------------------------------------------
    chunk_tokens: int = 256
    """Tokens per stored KV chunk (the last chunk of a prompt may be shorter)."""
    min_store_tokens: int = 32
    """Prompts shorter than this are not stored."""
    max_approx_depth: int = 1
    """Deepest approximation stored: a prompt filled from reused KV is stored with depth
    1 + its deepest source's depth (exactly computed prompts have depth 0) only up to this;
    0 stores exactly computed KV only."""
    save_queue_bytes: int = 1 << 30
    """Bytes of prompt KV waiting to be written to the tiers; a save beyond it waits
    (back-pressure) instead of growing memory."""
    cpu_bytes: int = 2 << 30
    """Byte capacity of the CPU tier (LRU)."""
    disk_dir: str = ""
    """Disk tier directory; empty means ``<home>/chunks``; ``none`` disables the tier."""
    disk_bytes: int = 20 << 30
    """Byte capacity of the disk tier (LRU)."""
    redis_url: str = ""
    """``redis://host:port/db`` (or ``unix://path``) enables the Redis tier on one server,
    ``redis+cluster://host:port[,host:port...]`` on a Redis Cluster (the nodes listed are
    where the client starts: it finds every master from them); empty disables it."""
    redis_ttl_s: int = 0
    """Expire Redis chunks after this many seconds; 0 keeps them until evicted."""
    compression: str = "zstd-byteplane"
    """Chunk payload encoding: ``raw``, ``zstd`` or ``zstd-byteplane``."""
    disk_compression: str = "zstd-byteplane"
    """The disk tier's encoding; empty means ``compression``. Raw moves chunks faster
    through the tier alone (``kvshare bench storage``: gets 0.91 vs 0.57 GB/s, puts 1.11
    vs 0.33 GB/s, raw vs zstd-byteplane), but serving pays for it: writing 1.46x more
    bytes in the background slowed the prefill of the requests running meanwhile
    (``kvshare bench ttft``, misses 1.14-1.18x vanilla with raw, 1.04x with
    zstd-byteplane, this 2-core VM). ``raw`` where the disk is fast and idle cores are
    plenty."""
    redis_compression: str = "raw"
    """The Redis tier's encoding; empty means ``compression``. ``raw`` because a localhost
    Redis moves bytes faster than the byte-plane encoder: gets at 0.91 vs 0.57 GB/s and
    puts at 1.30 vs 0.45 GB/s, raw vs zstd-byteplane. Choose ``zstd-byteplane`` for a Redis
    over a network slower than ~0.5 GB/s (e.g. 1-10 Gb/s links, where 1.46x fewer bytes
    pay) or when its ``maxmemory`` should hold more chunks."""
    zstd_level: int = 1
    """zstd level for the compressed encodings; 1 measured best on bf16 KV (ratio and speed)."""
    codec_threads: int = 2
    """Threads that (de)compress the blocks of one large chunk in parallel."""
    gpu_bytes: int = 0
    """Byte capacity of the GPU tier (device memory, LRU); 0 disables it. Skipped, with a
    warning, where CUDA is absent, so one file serves CPU and GPU hosts."""

    # --- selective recompute (DHD) ---------------------------------------------------
    rho: float = 0.15
    """Share of reused tokens recomputed by deviation at the check layers."""
    rho_mass: float = 0.0
    """0 keeps ``rho`` fixed. Above 0 the budget adapts per request: each check recomputes
    the fewest reused tokens whose scores cover this share of all their scores, between
    ``rho_min`` and ``rho_max`` of the reused tokens (a request's ``kvshare_rho`` still
    fixes its own)."""
    rho_min: float = 0.05
    """Least share of reused tokens an adaptive budget recomputes."""
    rho_max: float = 0.5
    """Largest share of reused tokens an adaptive budget recomputes."""
    check_layers: list[int] = field(default_factory=lambda: [1])
    """Layers at which fresh and reused K/V are compared."""
    select_by: str = "deviation"
    """How DHD ranks reused tokens at the check layers: ``deviation`` of fresh from reused
    K/V, ``attention`` the prompt's tail pays them, ``both`` (their product), ``rank``
    (the mean of their rank percentiles) or ``per_head`` (their product per KV head,
    summed); docs/selection.md compares them."""
    recompute_tail_tokens: int = 32
    """The prompt's last tokens always recomputed, whatever their deviation. They hold
    the chat template's generation prompt, which the first output token reads most; a
    reused copy of them summarises the *earlier* prompt at every layer above the first."""
    recompute_tail_by: str = "vllm"
    """Who computes the prompt's tail: ``vllm`` (the claim stops before it and vLLM
    prefills it attending to the filled KV) or ``kvshare`` (the fill recomputes it)."""

    # --- vLLM connector ----------------------------------------------------------------
    strict_prefix_cache: bool = False
    """Keep approximate (edited) KV out of vLLM's exact-prefix cache: the connector then
    requires ``--no-enable-prefix-caching`` (see docs/connector.md)."""
    fill_mode: str = "async"
    """How a claimed request is filled: ``async`` (vLLM's asynchronous load: the request
    waits while its fill advances a slice per engine step, so running
    requests keep decoding) or ``sync`` (the whole fill in the step that first schedules
    the request; every running request waits for it). See docs/connector.md."""
    fill_tokens_per_step: int = 256
    """``fill_mode: async``: the least fill work per engine step, in token-layers (one
    position through one decoder layer), shared by the fills in flight. A step's fills
    may do more: what vLLM's token budget leaves unused that step, times the model's
    layers. A fill advances whole layers, at least one per step."""
    max_fills_in_flight: int = 2
    """``fill_mode: async``: claimed requests filling at once; further claims wait (vLLM
    asks again next step) without taking KV blocks."""

    # --- shadow checks and the quality gate ---------------------------------------------
    shadow_sample_rate: float = 0.01
    """Share of claimed requests whose fill is also compared with full compute in the
    background (a shadow check, on the prompt's last 32 positions); 0 checks none, which
    leaves the gate open. Above 0 the worker loads the checks' own copy of the model's
    weights at start-up (see connector/shadow.py)."""
    shadow_min_top1: float = 0.75
    """A check passes when at least this share of the compared positions' most likely next
    token is full compute's ..."""
    shadow_max_kl: float = 0.1
    """... and the mean KL(full compute || fill) of their next-token distributions is at
    most this, in nats."""
    gate_window: int = 20
    """A model's or scope's quality score: the share of passing checks among its last this
    many."""
    gate_floor: float = 0.5
    """Claims of a model or scope stop while its score is below this; 0 never stops them."""
    gate_min_checks: int = 3
    """Checks a window must hold before its score can stop claims."""
    gate_reopen_checks: int = 3
    """Consecutive passing checks (of the claims it withholds) that reopen a stopped gate."""

    # --- cache-aware scheduler (``--scheduler-cls kvshare.scheduler.CacheAwareScheduler``)
    scheduler_max_extra_wait_s: float = 2.0
    """A waiting request that has waited this long is overtaken by no later arrival: from
    then on it is served first come, first served. 0 makes the scheduler FCFS."""
    scheduler_lookup_wait_s: float = 0.2
    """A request whose lookup still runs ranks as a miss; ranked first, it holds admission
    of the requests behind it until its lookup is done, at most this long after arrival
    (a lookup takes 2-10 ms on an idle host, longer beside busy engine threads)."""

    # --- decode correction (docs/decode-correction.md) -----------------------------------
    decode_correction: bool = False
    """Recompute, once per reused request while it decodes, the reused and not recomputed
    tokens that the new token's attention and the fill's deviation rank highest. Off until
    ``kvshare bench decode`` shows its targets met; a request's ``kvshare_decode_correction``
    extra arg (0/1) overrides it. Requests without reused tokens are never corrected."""
    decode_correction_share: float = 0.15
    """Tokens a correction recomputes, as a share of the fill's reused tokens (DHD's base
    for ``rho``)."""
    decode_correction_step: int = 1
    """The generated token whose queries score the candidates: 1 = the first; the
    correction runs before vLLM's forward of that token."""
    decode_correction_max_tokens_per_step: int = 256
    """Tokens all corrections of one engine step may recompute together; requests past it
    wait for a later step."""

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------
    @property
    def home_dir(self) -> Path:
        return Path(self.home) if self.home else default_home()

    @property
    def index_dir(self) -> Path:
        return self.home_dir / "index"

    @property
    def daemon_endpoint(self) -> str:
        """The daemon's ZeroMQ address, the default one filled in."""
        return self.daemon_address or f"ipc://{self.home_dir / 'daemon.sock'}"

    @property
    def disk_path(self) -> Path | None:
        if self.disk_dir.lower() == "none":
            return None
        return Path(self.disk_dir) if self.disk_dir else self.home_dir / "chunks"

    def validate(self) -> None:
        """Raise ConfigError naming the first out-of-range value."""
        for key, value in dataclasses.asdict(self).items():
            _require(isinstance(value, bool) or not isinstance(value, int)
                     or abs(value) <= MAX_INT64, key, value,
                     f"a 64-bit integer, at most {MAX_INT64}")
        _require(self.top_k >= 1, "top_k", self.top_k, "an integer >= 1")
        _require(self.embed_max_chars >= 16, "embed_max_chars", self.embed_max_chars, ">= 16")
        _require(self.ann_index_min_rows >= 256, "ann_index_min_rows",
                 self.ann_index_min_rows, ">= 256 (IVF training needs rows)")
        _require(self.index_flush_rows >= 1, "index_flush_rows", self.index_flush_rows, ">= 1")
        _require(self.planner in ("align", "chunk256"), "planner", self.planner,
                 "one of align, chunk256")
        _require(self.min_run_tokens >= 1, "min_run_tokens", self.min_run_tokens, ">= 1")
        _require(0.0 <= self.min_reuse_fraction <= 1.0, "min_reuse_fraction",
                 self.min_reuse_fraction, "in [0, 1]")
        _require(self.min_reuse_tokens >= 0, "min_reuse_tokens", self.min_reuse_tokens, ">= 0")
        _require(self.chunk_tokens >= 1, "chunk_tokens", self.chunk_tokens, ">= 1")
        _require(self.min_store_tokens >= 1, "min_store_tokens", self.min_store_tokens, ">= 1")
        _require(self.cpu_bytes >= 0, "cpu_bytes", self.cpu_bytes, ">= 0")
        _require(self.cpu_bytes <= host_memory_bytes(), "cpu_bytes", self.cpu_bytes,
                 f"at most this host's memory ({host_memory_bytes() / (1 << 30):.1f} GiB): "
                 "the CPU tier holds its chunks in RAM (0 turns it off)")
        _require(self.disk_bytes >= 0, "disk_bytes", self.disk_bytes, ">= 0")
        _require(self.redis_ttl_s >= 0, "redis_ttl_s", self.redis_ttl_s, ">= 0")
        for key in ("compression", "disk_compression", "redis_compression"):
            value = getattr(self, key)
            _require(value in CODECS or (value == "" and key != "compression"), key, value,
                     "one of " + ", ".join(CODECS) + ("" if key == "compression" else
                                                      " or empty (use compression)"))
        _require(self.tenancy in ("isolated", "groups", "popular"), "tenancy", self.tenancy,
                 "one of isolated, groups, popular")
        _require(self.popular_min_tenants >= 2, "popular_min_tenants",
                 self.popular_min_tenants, ">= 2 (one tenant alone must never unlock an entry)")
        _require(0.0 < self.popular_min_reuse <= 1.0, "popular_min_reuse",
                 self.popular_min_reuse, "in (0, 1]")
        _require(self.tenant_quota_bytes >= 0, "tenant_quota_bytes", self.tenant_quota_bytes,
                 ">= 0")
        _require(self.mode in ("embedded", "remote"), "mode", self.mode,
                 "one of embedded, remote")
        _require(self.daemon_address == ""
                 or self.daemon_address.startswith(("ipc://", "tcp://")), "daemon_address",
                 self.daemon_address, "empty, ipc://PATH or tcp://HOST:PORT")
        _require(not self.daemon_address.startswith("tcp://") or len(self.daemon_secret) >= 16,
                 "daemon_secret", "<hidden>" if self.daemon_secret else "",
                 "at least 16 characters when daemon_address is tcp://")
        _require(self.daemon_timeout_ms >= 1, "daemon_timeout_ms", self.daemon_timeout_ms,
                 ">= 1")
        _require(self.daemon_threads >= 1, "daemon_threads", self.daemon_threads, ">= 1")
        _require(MIN_MESSAGE_BYTES <= self.daemon_max_message_bytes <= MAX_INT64,
                 "daemon_max_message_bytes", self.daemon_max_message_bytes,
                 f"in [{MIN_MESSAGE_BYTES}, {MAX_INT64}] (a lookup's header alone may take "
                 "hundreds of KB)")
        _require(0 <= self.metrics_port <= 65535, "metrics_port", self.metrics_port,
                 "a port in [0, 65535] (0 disables)")
        _require(self.metrics_max_tenants >= 0, "metrics_max_tenants",
                 self.metrics_max_tenants, ">= 0")
        groups = self.tenant_groups
        _require(isinstance(groups, dict) and all(
            isinstance(name, str) and isinstance(members, list)
            and all(isinstance(m, str) for m in members) for name, members in groups.items()),
            "tenant_groups", groups, "a mapping of group name -> list of tenants")
        _require(1 <= self.zstd_level <= 22, "zstd_level", self.zstd_level, "in [1, 22]")
        _require(self.codec_threads >= 1, "codec_threads", self.codec_threads, ">= 1")
        _require(self.gpu_bytes >= 0, "gpu_bytes", self.gpu_bytes, ">= 0")
        _require(0.0 <= self.rho <= 1.0, "rho", self.rho, "in [0, 1]")
        _require(0.0 <= self.rho_mass <= 1.0, "rho_mass", self.rho_mass, "in [0, 1]")
        _require(0.0 <= self.rho_min <= 1.0, "rho_min", self.rho_min, "in [0, 1]")
        _require(self.rho_min <= self.rho_max <= 1.0, "rho_max", self.rho_max,
                 f"in [rho_min ({self.rho_min}), 1]")
        _require(self.recompute_tail_tokens >= 0, "recompute_tail_tokens",
                 self.recompute_tail_tokens, ">= 0")
        _require(self.select_by in ("deviation", "attention", "both", "rank", "per_head"),
                 "select_by", self.select_by, "one of deviation, attention, both, rank, per_head")
        _require(self.recompute_tail_by in ("vllm", "kvshare"), "recompute_tail_by",
                 self.recompute_tail_by, "one of vllm, kvshare")
        _require(self.fill_mode in ("async", "sync"), "fill_mode", self.fill_mode,
                 "one of async, sync")
        _require(self.fill_tokens_per_step >= 1, "fill_tokens_per_step",
                 self.fill_tokens_per_step, ">= 1")
        _require(self.max_fills_in_flight >= 1, "max_fills_in_flight",
                 self.max_fills_in_flight, ">= 1")
        _require(self.max_approx_depth >= 0, "max_approx_depth", self.max_approx_depth, ">= 0")
        _require(self.save_queue_bytes >= 0, "save_queue_bytes", self.save_queue_bytes, ">= 0")
        _require(self.index_max_entries >= 1, "index_max_entries", self.index_max_entries,
                 ">= 1")
        _require(all(layer >= 0 for layer in self.check_layers), "check_layers",
                 self.check_layers, "a list of layer indices >= 0")
        _check_redis_url(self.redis_url)
        _require(0.0 <= self.shadow_sample_rate <= 1.0, "shadow_sample_rate",
                 self.shadow_sample_rate, "in [0, 1]")
        _require(0.0 <= self.shadow_min_top1 <= 1.0, "shadow_min_top1", self.shadow_min_top1,
                 "in [0, 1]")
        _require(self.shadow_max_kl >= 0.0, "shadow_max_kl", self.shadow_max_kl, ">= 0")
        _require(self.gate_window >= 1, "gate_window", self.gate_window, ">= 1")
        _require(0.0 <= self.gate_floor <= 1.0, "gate_floor", self.gate_floor, "in [0, 1]")
        _require(1 <= self.gate_min_checks <= self.gate_window, "gate_min_checks",
                 self.gate_min_checks, f"in [1, gate_window ({self.gate_window})]")
        _require(self.gate_reopen_checks >= 1, "gate_reopen_checks", self.gate_reopen_checks,
                 ">= 1")
        for key in ("scheduler_max_extra_wait_s", "scheduler_lookup_wait_s"):
            _require(getattr(self, key) >= 0.0, key, getattr(self, key), "seconds >= 0")
        _require(0.0 < self.decode_correction_share <= 1.0, "decode_correction_share",
                 self.decode_correction_share, "in (0, 1]")
        _require(self.decode_correction_step >= 1, "decode_correction_step",
                 self.decode_correction_step, ">= 1")
        _require(self.decode_correction_max_tokens_per_step >= 1,
                 "decode_correction_max_tokens_per_step",
                 self.decode_correction_max_tokens_per_step, ">= 1")

    # ------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        overrides: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> KVShareConfig:
        """Build the config from file, explicit overrides and environment, in that order."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        path = path or environ.get(CONFIG_ENV)
        if path:
            values.update(_read_yaml(Path(path)))
        values.update(overrides or {})
        values.update(_from_environ(environ))
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> KVShareConfig:
        """Coerce and check every key; unknown keys are errors."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, raw in values.items():
            if key not in known:
                raise ConfigError(
                    f"unknown kvshare config key {key!r}; known keys: {', '.join(sorted(known))}"
                )
            kwargs[key] = _coerce(key, raw, _field_type(cls, key))
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_redis_url(url: str) -> None:
    """``redis_url`` is empty, one server's URL or a well-formed cluster URL."""
    if is_cluster_url(url):
        try:
            parse_cluster_url(url)
        except ValueError as exc:
            raise ConfigError(f"kvshare config redis_url is invalid: {exc}") from None
        return
    _require(url == "" or url.startswith(SERVER_SCHEMES), "redis_url", url, URL_FORMS)


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"kvshare config {key}={value!r} is invalid: expected {expected}")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"kvshare config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"kvshare config file {str(path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"kvshare config file {str(path)!r} must hold a mapping of keys")
    return data


def _from_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """``KVSHARE_TOP_K=4`` -> ``{"top_k": "4"}``; ``KVSHARE_CONFIG``/``KVSHARE_HOME`` excluded."""
    reserved = {CONFIG_ENV, "KVSHARE_HOME"}
    return {
        name[len(ENV_PREFIX):].lower(): value
        for name, value in environ.items()
        if name.startswith(ENV_PREFIX) and name not in reserved
    }


def _field_type(cls: type, key: str) -> Any:
    return typing.get_type_hints(cls)[key]


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _coerce(key: str, raw: Any, kind: Any) -> Any:
    """Turn YAML/env values into the field's type, or raise naming the key."""
    def fail() -> ConfigError:
        return ConfigError(f"kvshare config {key}={raw!r} is not a valid {_type_name(kind)}")

    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in _TRUE + _FALSE:
            return raw.lower() in _TRUE
        raise fail()
    if kind is int:
        if isinstance(raw, bool):
            raise fail()
        if isinstance(raw, int):
            return raw
        if isinstance(raw, str):
            try:
                return int(raw.replace("_", ""))
            except ValueError:
                raise fail() from None
        raise fail()
    if kind is float:
        if isinstance(raw, bool):
            raise fail()
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise fail() from None
    if kind is str:
        if isinstance(raw, (str, int, float)) and not isinstance(raw, bool):
            return str(raw)
        raise fail()
    if typing.get_origin(kind) is dict:
        _, value_kind = typing.get_args(kind)
        items = raw
        if isinstance(raw, str):  # env / --kvshare-set: JSON, e.g. '{"g": ["a", "b"]}'
            try:
                items = json.loads(raw)
            except ValueError:
                raise fail() from None
        if not isinstance(items, dict):
            raise fail()
        return {str(name): _coerce(key, value, value_kind) for name, value in items.items()}
    if typing.get_origin(kind) is list:
        (item_kind,) = typing.get_args(kind)
        items = raw
        if isinstance(raw, str):
            items = [part for part in raw.replace(" ", "").split(",") if part]
        if not isinstance(items, list):
            raise fail()
        return [_coerce(key, item, item_kind) for item in items]
    raise fail()


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", str(kind))
