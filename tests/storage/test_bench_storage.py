"""`kvshare bench storage` machinery on small chunks (the model forward is not run here)."""

import argparse

import redis
from kv_samples import make_chunks

from kvshare.bench import storage as bench
from kvshare.storage.codec import ChunkCodec


def test_interleaved_best_runs_passes_in_turn_after_a_warm_up():
    calls: list[str] = []
    durations = iter([0.5, 0.5, 3.0, 5.0, 1.0, 4.0, 2.0, 6.0])  # warm-up (ignored), a, b, a, b...

    def make_timed(name: str):
        def one_pass() -> float:
            calls.append(name)
            return next(durations)
        return one_pass

    assert bench.interleaved_best(3, make_timed("a"), make_timed("b")) == [1.0, 4.0]
    assert calls == ["a", "b"] * 4


def test_tier_benchmarks_report_ratios_and_clean_up(tmp_path, redis_server):
    chunks = make_chunks(64, 16)
    codecs = {"configured": ChunkCodec("zstd-byteplane"), "raw_codec": ChunkCodec("raw")}
    cpu = bench.bench_cpu(chunks, repeats=1)
    disk = bench.bench_disk(chunks, codecs, tmp_path, repeats=1)
    redis_result = bench.bench_redis(chunks, codecs, redis_server.url, repeats=1)
    assert cpu["get_time_vs_copy"] > 0 and cpu["ratio_vs_raw_put"] > 0
    for result in (disk, redis_result):
        for name in codecs:
            assert result[name]["ratio_vs_raw_put"] == (
                result[name]["put_GBps"] / result["raw_put_GBps"])
            assert result[name]["ratio_vs_raw_get"] > 0
    assert redis.Redis.from_url(redis_server.url).dbsize() == 0


def test_arguments_parse_with_their_defaults():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--json", "out.json"])
    assert (args.prompts, args.prompt_tokens, args.levels, args.repeats) == (2, 512, "1,3", 5)
    assert args.redis_url is None and str(args.json) == "out.json"
