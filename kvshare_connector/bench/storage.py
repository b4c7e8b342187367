"""``kvshare bench storage``: codec and tier throughput on real SmolLM2 KV chunks.

The KV comes from a real forward pass (transformers, bf16, ``use_cache=True``) of the
configured model over real ShareGPT first turns, cut into ``chunk_tokens``-token chunks
exactly as kvshare stores them. Every tier is compared with a raw baseline measured in
the same run on the same chunks:

  ========  ============================================  ===============================
  tier      baseline put                                  baseline get
  ========  ============================================  ===============================
  cpu       ``torch.empty_like`` + ``copy_``              the same plain copy
  disk      one file per chunk: ``write`` + ``fsync``     ``open`` + ``read``
  redis     redis-py ``SET`` of the tensor's bytes        redis-py ``GET``
  ========  ============================================  ===============================

Disk reads are cold: every file's page-cache pages are dropped (``POSIX_FADV_DONTNEED``)
before each read pass, for the baseline and the tier alike, since a disk tier that fits
in the page cache would be a CPU tier. Throughputs count logical (uncompressed) KV bytes,
so a tier that compresses is credited with the bytes it delivers, not the bytes it moves.
Baseline and tier passes run interleaved and the fastest of ``--repeats`` counts; glibc
is told to reuse freed memory (``steady_allocator``) so page faults do not decide copies.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from kvshare.config import KVShareConfig
from kvshare.storage.chunk import KVChunk, split_prompt_kv
from kvshare.storage.codec import ChunkCodec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", type=int, default=2, metavar="N",
                        help="ShareGPT prompts to run through the model (default: 2; each "
                             "costs one bf16 prefill on the CPU, the bulk of the run)")
    parser.add_argument("--prompt-tokens", type=int, default=512, metavar="T",
                        help="tokens kept per prompt; shorter prompts are skipped (default: 512)")
    parser.add_argument("--levels", default="1,3", metavar="L,L",
                        help="zstd levels to compare (default: 1,3)")
    parser.add_argument("--repeats", type=int, default=5, metavar="R",
                        help="timed passes per measurement; the fastest counts (default: 5)")
    parser.add_argument("--redis-url", metavar="URL",
                        help="Redis to measure (default: start a private redis-server)")
    parser.add_argument("--disk-dir", type=Path, metavar="DIR",
                        help="directory for the disk measurements (default: a temp dir)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON")


# -- real KV ------------------------------------------------------------------------------
def real_kv_chunks(config: KVShareConfig, prompts: int, prompt_tokens: int) -> list[KVChunk]:
    """Chunks of the model's bf16 KV for the first ShareGPT prompts of >= prompt_tokens."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from kvshare.data.sharegpt import first_user_turns
    from kvshare.model_assets import load_tokenizer, resolve_model_dir

    tokenizer = load_tokenizer(config.model)
    token_lists: list[list[int]] = []
    seen: set[str] = set()
    for text in first_user_turns():
        if text in seen:
            continue
        seen.add(text)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= prompt_tokens:
            token_lists.append(ids[:prompt_tokens])
            if len(token_lists) == prompts:
                break
    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(config.model),
                                                 dtype=torch.bfloat16).eval()
    chunks: list[KVChunk] = []
    for ids in tqdm(token_lists, desc="prefill (bf16, CPU)", unit="prompt"):
        with torch.inference_mode():
            cache = model(torch.tensor([ids]), use_cache=True).past_key_values
        # Each layer holds [batch=1, kv_heads, tokens, head_dim]; chunks want
        # [layers, 2, tokens, kv_heads, head_dim].
        kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])
        kv = kv.permute(0, 1, 3, 2, 4).contiguous()
        chunks += [KVChunk(c.header, c.kv.contiguous())
                   for c in split_prompt_kv(config.model, kv, ids, config.chunk_tokens,
                                               scope="")]
    return chunks


# -- timing -------------------------------------------------------------------------------
def interleaved_best(repeats: int, *passes: Callable[[], float]) -> list[float]:
    """Fastest seconds of each pass, run interleaved (A B A B ...) after one warm-up round.

    Each pass times only its own work and returns the seconds. Interleaving exposes the
    baseline and the tier to the same machine state; taking the fastest pass (timeit's
    convention) discards the time other processes stole, which only ever adds.
    """
    for one_pass in passes:
        one_pass()
    times: list[list[float]] = [[] for _ in passes]
    for _ in range(repeats):
        for column, one_pass in zip(times, passes):
            column.append(one_pass())
    return [min(column) for column in times]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def steady_allocator() -> None:
    """Make glibc keep and reuse freed chunk-sized blocks (no-op elsewhere).

    By default a 6 MB tensor is mmap'ed or its pages trimmed after free, so the next
    pass page-faults them in again, or not, depending on what ran before: that, not the
    copy, decided the CPU-tier figures (0.1x to 10x in the same run). With blocks up to
    32 MiB served from the heap and no trimming, every pass reuses warm pages.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 1 << 30)


def _raw_bytes(chunk: KVChunk) -> memoryview:
    """The chunk tensor's bytes, flat and uncopied: what the raw baselines move."""
    return chunk.kv.reshape(-1).view(torch.uint8).numpy().data


# -- codecs ---------------------------------------------------------------------------------
def bench_codecs(chunks: list[KVChunk], levels: list[int], threads: int,
                 repeats: int) -> list[dict]:
    """Ratio and encode/decode speed of every codec and level on the same chunks."""
    variants = [("raw", 1, threads)] + [
        (compression, level, threads) for compression in ("zstd", "zstd-byteplane")
        for level in levels
    ]
    if threads > 1:  # what one core does, for comparison with the parallel figure
        variants += [("zstd-byteplane", level, 1) for level in levels]
    rows = []
    for compression, level, n_threads in variants:
        codec = ChunkCodec(compression, level=level, threads=n_threads)
        rows.append({"codec": compression, "level": level if compression != "raw" else None,
                     "threads": n_threads, **_bench_codec(codec, chunks, repeats)})
        codec.close()
    return rows


def _bench_codec(codec: ChunkCodec, chunks: list[KVChunk], repeats: int) -> dict:
    total = sum(c.nbytes for c in chunks)
    encoded = [codec.encode(c) for c in chunks]
    encode_s, decode_s = interleaved_best(
        repeats,
        lambda: timed(lambda: [codec.encode(c) for c in chunks]),
        lambda: timed(lambda: [codec.decode(e) for e in encoded]),
    )
    return {"ratio": total / sum(len(e) for e in encoded),
            "encode_GBps": gbps(total, encode_s), "decode_GBps": gbps(total, decode_s)}


# -- tiers ----------------------------------------------------------------------------------
def bench_cpu(chunks: list[KVChunk], repeats: int) -> dict:
    from kvshare.storage.memory_tier import MemoryTier

    total = sum(c.nbytes for c in chunks)
    keys = [c.key for c in chunks]
    tier = MemoryTier.cpu(2 * total)
    tier.put(chunks)
    copy_s, put_s, get_s = interleaved_best(
        4 * repeats,  # passes of a few ms: more of them to find undisturbed ones
        lambda: timed(lambda: [torch.empty_like(c.kv).copy_(c.kv) for c in chunks]),
        lambda: timed(lambda: MemoryTier.cpu(2 * total).put(chunks)),
        lambda: timed(lambda: tier.get(keys)),
    )
    return {"raw_put_GBps": gbps(total, copy_s), "raw_get_GBps": gbps(total, copy_s),
            "put_GBps": gbps(total, put_s), "get_GBps": gbps(total, get_s),
            "ratio_vs_raw_put": copy_s / put_s, "ratio_vs_raw_get": copy_s / get_s,
            "get_time_vs_copy": get_s / copy_s}


def _drop_page_cache(directory: Path) -> None:
    for path in directory.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_disk(chunks: list[KVChunk], codecs: dict[str, ChunkCodec], root: Path,
               repeats: int) -> dict:
    from kvshare.storage.disk_tier import DiskTier

    total = sum(c.nbytes for c in chunks)
    keys = [c.key for c in chunks]
    raw_dir = root / "raw"

    def raw_put() -> float:
        shutil.rmtree(raw_dir, ignore_errors=True)
        raw_dir.mkdir(parents=True)

        def write_all() -> None:
            for c in chunks:
                with open(raw_dir / c.key.hex(), "wb", buffering=0) as f:
                    f.write(_raw_bytes(c))
                    os.fsync(f.fileno())
        return timed(write_all)

    def raw_get() -> float:
        _drop_page_cache(raw_dir)

        def read_all() -> None:
            for c in chunks:
                with open(raw_dir / c.key.hex(), "rb", buffering=0) as f:
                    f.read()
        return timed(read_all)

    def tier_put(name: str) -> Callable[[], float]:
        def one_pass() -> float:
            shutil.rmtree(root / name, ignore_errors=True)
            tier = DiskTier(root / name, 4 * total, codecs[name])
            return timed(lambda: tier.put(chunks))
        return one_pass

    def tier_get(name: str) -> Callable[[], float]:
        def one_pass() -> float:
            tier = DiskTier(root / name, 4 * total, codecs[name])  # as after a restart
            _drop_page_cache(root / name)
            return timed(lambda: tier.get(keys))
        return one_pass

    names = list(codecs)
    puts = interleaved_best(repeats, raw_put, *(tier_put(name) for name in names))
    gets = interleaved_best(repeats, raw_get, *(tier_get(name) for name in names))
    result: dict = {"raw_put_GBps": gbps(total, puts[0]), "raw_get_GBps": gbps(total, gets[0])}
    for name, put_s, get_s in zip(names, puts[1:], gets[1:]):
        result[name] = {"put_GBps": gbps(total, put_s), "get_GBps": gbps(total, get_s)}
    return _with_ratios(result)


def bench_redis(chunks: list[KVChunk], codecs: dict[str, ChunkCodec], url: str,
                repeats: int) -> dict:
    import redis

    from kvshare.storage.redis_tier import RedisTier

    total = sum(c.nbytes for c in chunks)
    keys = [c.key for c in chunks]
    client = redis.Redis.from_url(url)
    tiers = {name: RedisTier(url, codec, key_prefix=f"bench:{name}:".encode())
             for name, codec in codecs.items()}

    def raw_put() -> float:
        client.delete(*(b"bench:raw:" + key for key in keys))
        return timed(lambda: [client.set(b"bench:raw:" + c.key, _raw_bytes(c)) for c in chunks])

    def raw_get() -> float:
        return timed(lambda: [client.get(b"bench:raw:" + key) for key in keys])

    def tier_put(tier: RedisTier) -> Callable[[], float]:
        def one_pass() -> float:
            tier.delete(keys)
            return timed(lambda: tier.put(chunks))
        return one_pass

    def tier_get(tier: RedisTier) -> Callable[[], float]:
        return lambda: timed(lambda: tier.get(keys))

    puts = interleaved_best(repeats, raw_put, *(tier_put(t) for t in tiers.values()))
    gets = interleaved_best(repeats, raw_get, *(tier_get(t) for t in tiers.values()))
    result: dict = {"raw_put_GBps": gbps(total, puts[0]), "raw_get_GBps": gbps(total, gets[0])}
    for (name, tier), put_s, get_s in zip(tiers.items(), puts[1:], gets[1:]):
        stats = tier.stats()
        if stats.errors or stats.misses:
            raise RuntimeError(f"Redis tier {name} failed during the benchmark: "
                               f"{stats.misses} misses, last error {stats.last_error!r}")
        result[name] = {"put_GBps": gbps(total, put_s), "get_GBps": gbps(total, get_s)}
        tier.delete(keys)
        tier.close()
    client.delete(*(b"bench:raw:" + key for key in keys))
    return _with_ratios(result)


def _with_ratios(result: dict) -> dict:
    for name in [k for k, v in result.items() if isinstance(v, dict)]:
        result[name]["ratio_vs_raw_put"] = result[name]["put_GBps"] / result["raw_put_GBps"]
        result[name]["ratio_vs_raw_get"] = result[name]["get_GBps"] / result["raw_get_GBps"]
    return result


# -- command ----------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from kvshare.storage.redis_server import RedisServer

    if args.prompts < 1 or args.repeats < 1:
        raise SystemExit(
            f"--prompts and --repeats must be >= 1, got {args.prompts}, {args.repeats}")
    config = KVShareConfig.load(args.config)
    if args.redis_url and args.redis_url.startswith("redis+cluster://"):
        raise SystemExit(f"--redis-url {args.redis_url}: the storage benchmark measures one "
                         "Redis server (its raw baseline is a plain client); give one node's "
                         "redis:// URL")
    steady_allocator()
    # The configured level is always measured: the headline figures are about it.
    levels = sorted({int(level) for level in args.levels.split(",") if level} | {config.zstd_level})
    started = time.perf_counter()
    chunks = real_kv_chunks(config, args.prompts, args.prompt_tokens)
    if not chunks:
        raise SystemExit(f"no ShareGPT prompt has {args.prompt_tokens} tokens")
    total = sum(c.nbytes for c in chunks)
    print(f"{len(chunks)} chunks of {config.chunk_tokens} tokens from {args.prompts} prompts: "
          f"{total / 1e6:.1f} MB of {chunks[0].kv.dtype} KV "
          f"({chunks[0].header.layout.bytes_per_token()} B/token)")

    configured = ChunkCodec(config.compression, level=config.zstd_level,
                            threads=config.codec_threads)
    codecs = {"configured": configured, "raw_codec": ChunkCodec("raw")}
    server = None if args.redis_url else RedisServer().start()
    disk_root = Path(tempfile.mkdtemp(prefix="kvshare-bench-", dir=args.disk_dir))
    steps = tqdm(total=4, desc="benchmarks", unit="step")
    try:
        codec_rows = bench_codecs(chunks, levels, config.codec_threads, args.repeats)
        steps.update()
        cpu = bench_cpu(chunks, args.repeats)
        steps.update()
        disk = bench_disk(chunks, codecs, disk_root, args.repeats)
        steps.update()
        redis_result = bench_redis(chunks, codecs, args.redis_url or server.url, args.repeats)
        steps.update()
    finally:
        steps.close()
        shutil.rmtree(disk_root, ignore_errors=True)
        if server is not None:
            server.close()

    def codec_row(compression: str, level: int, threads: int) -> dict:
        return next(r for r in codec_rows
                    if (r["codec"], r["level"], r["threads"]) == (compression, level, threads))

    byteplane = codec_row("zstd-byteplane", config.zstd_level, config.codec_threads)
    plain = codec_row("zstd", config.zstd_level, config.codec_threads)
    tiers = {"cpu": cpu}
    for name, measured in (("disk", disk), ("redis", redis_result)):
        tiers[name] = {
            **measured["configured"],
            "raw_put_GBps": measured["raw_put_GBps"], "raw_get_GBps": measured["raw_get_GBps"],
            "raw_codec": measured["raw_codec"],
        }
    result = {
        "compression_ratio_byteplane": byteplane["ratio"],
        "compression_ratio_plain": plain["ratio"],
        "decompress_GBps": byteplane["decode_GBps"],
        "compress_GBps": byteplane["encode_GBps"],
        "configured_codec": repr(configured),
        "tiers": tiers,
        "codecs": codec_rows,
        "chunks": len(chunks),
        "chunk_tokens": config.chunk_tokens,
        "kv_bytes": total,
        "model": config.model,
        "machine": f"{os.cpu_count()}-core {platform.machine()}, "
                   f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
                   f"torch threads {torch.get_num_threads()}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["kvshare", *sys.argv[1:]]),
        "seconds": time.perf_counter() - started,
    }
    configured.close()
    _print_tables(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"JSON written to {args.json}")
    return 0


def _print_tables(result: dict) -> None:
    print("\n| codec | level | threads | ratio | encode GB/s | decode GB/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in result["codecs"]:
        print(f"| {r['codec']} | {r['level'] or '-'} | {r['threads']} | {r['ratio']:.3f} | "
              f"{r['encode_GBps']:.2f} | {r['decode_GBps']:.2f} |")
    print(f"\nTiers ({result['configured_codec']}; GB/s of KV; ratio = tier / raw baseline)")
    print("| tier | raw put | tier put | put ratio | raw get | tier get | get ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, t in result["tiers"].items():
        rows = [(name, t)]
        if "raw_codec" in t:
            rows.append((f"{name} (raw codec)", t["raw_codec"]))
        for label, r in rows:
            print(f"| {label} | {t['raw_put_GBps']:.2f} | {r['put_GBps']:.2f} | "
                  f"{r['ratio_vs_raw_put']:.2f}x | {t['raw_get_GBps']:.2f} | {r['get_GBps']:.2f} | "
                  f"{r['ratio_vs_raw_get']:.2f}x |")
    print(f"CPU tier get time / plain copy time: {result['tiers']['cpu']['get_time_vs_copy']:.2f}")
    print(f"byte-plane ratio {result['compression_ratio_byteplane']:.3f} vs plain zstd "
          f"{result['compression_ratio_plain']:.3f}; "
          f"decompress {result['decompress_GBps']:.2f} GB/s")
