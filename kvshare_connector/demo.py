"""``kvshare demo``: vLLM with and without kvshare on a short stream of real similar prompts.

The stream is made of real ShareGPT first user turns from the paper's *similar* stream:
``--pairs`` pairs of (earlier prompt, its similar later prompt), replayed as
earlier, later, earlier, later... in SmolLM2's chat template, one request at a time and
all in one (public) scope, as production traffic would arrive. The same stream runs
through vanilla vLLM (prefix caching on) and then through vLLM with the kvshare
connector on the embedded default (index and tiers in a fresh directory under
``<home>/demo``), each engine in its own child process.

Per request it prints the prompt's length, the share kvshare reused (vLLM's own prefix
hit plus claimed tokens kvshare loaded and did not recompute), the claimed tokens
kvshare's engine recomputed, both TTFTs, and whether the greedy answer matches vanilla
vLLM's (full compute); a summary table closes the run, with the requests whose fill fell
back to full recompute.

The kvshare engine runs with the config of ``--config`` (else ``$KVSHARE_CONFIG``) and a
fresh ``<home>/demo``, passed explicitly; ``KVSHARE_<KEY>`` variables reach neither engine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from kvshare.bench.engine_config import base_config, connector_config, ignored_environment
from kvshare.bench.reuse import RequestReuse
from kvshare.bench.workload import add_prompt_length_arguments, check_prompt_lengths
from kvshare.config import KVShareConfig

MAX_NEW_TOKENS = 32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", type=int, default=6, metavar="N",
                        help="similar-prompt pairs to replay: 2N requests (default: 6, "
                             "about 3 min on 2 CPU cores)")
    add_prompt_length_arguments(parser, 200, 1500)
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="also write every request's row and the summary as JSON")


@dataclass
class DemoRow:
    """One request of the stream on both engines."""

    index: int
    role: str
    """``earlier`` (first of its pair) or ``later`` (similar to the one before)."""
    prompt_tokens: int
    reused: float
    """Share of the prompt loaded and not recomputed: vLLM's prefix hit + claimed tokens
    kvshare loaded and did not recompute."""
    recomputed: int
    """Claimed tokens kvshare's selective-recompute engine computed (0 without a claim)."""
    fallback: bool
    """kvshare's selective fill failed and the claim was recomputed in full."""
    vanilla_ttft_s: float
    kvshare_ttft_s: float
    same_answer: bool
    """kvshare's greedy tokens equal vanilla vLLM's (full compute)."""
    rouge_l: float
    preview: str

    @property
    def speedup(self) -> float:
        return self.vanilla_ttft_s / self.kvshare_ttft_s


def run(args: argparse.Namespace) -> int:
    if args.pairs < 1:
        raise SystemExit(f"--pairs must be >= 1, got {args.pairs}")
    check_prompt_lengths(args)
    config = base_config(args.config)
    ignored = ignored_environment()
    if ignored:
        print(f"kvshare demo: ignoring {', '.join(ignored)} (the engines take their config "
              "from --config only)")
    print(f"kvshare demo: model {config.model}, embedder {config.embedder}, "
          f"home {config.home_dir}")
    texts, prompts = demo_stream(config, args)
    rows, connector = replay(config, texts, prompts)
    print_rows(rows)
    summary = summarize(rows)
    print()
    print(summary_table(summary))
    print(fallback_line(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "summary": summary, "fallbacks": {"vanilla": 0, "kvshare": fallbacks(rows)},
            "engines": {"vanilla": {"config": None}, "kvshare": {"config": connector}},
            "ignored_environment": ignored, "requests": [asdict(r) for r in rows]}, indent=2))
        print(f"JSON written to {args.json}")
    return 0


def demo_stream(config: KVShareConfig, args: argparse.Namespace
                ) -> tuple[list[str], list[list[int]]]:
    """Texts and chat-template token ids: earlier, later, earlier, later..."""
    from kvshare.bench.pairs import similar_pairs
    from kvshare.bench.quality import chat_ids
    from kvshare.bench.workload import load_workload
    from kvshare.matching.embedder import make_embedder
    from kvshare.model_assets import load_tokenizer

    tokenizer = load_tokenizer(config.model)
    workload = load_workload(config, make_embedder(config.embedder, config.embed_max_chars),
                             tokenizer)
    stream = workload.similar_positions()
    pairs = similar_pairs([workload.texts[p] for p in stream],
                          [workload.token_ids[p] for p in stream], workload.embeddings[stream],
                          args.pairs, min_tokens=args.min_tokens, max_tokens=args.max_tokens)
    if not pairs:
        raise SystemExit(f"no similar pair has {args.min_tokens}..{args.max_tokens} tokens")
    texts = [text for pair in pairs for text in (pair.earlier, pair.later)]
    return texts, [chat_ids(tokenizer, text) for text in texts]


def replay(config: KVShareConfig, texts: list[str], prompts: list[list[int]]
           ) -> tuple[list[DemoRow], dict]:
    """The stream through vanilla vLLM, then through vLLM + kvshare (fresh state); the rows
    and the kvshare engine's complete config."""
    from kvshare.bench.quality import rouge_l
    from kvshare.bench.vllm_runner import EngineSpec, Req, run_engine, warmup_requests
    from kvshare.model_assets import resolve_model_dir

    longest = max(map(len, prompts))
    spec_kwargs = dict(model_dir=str(resolve_model_dir(config.model, config.home_dir)),
                       max_num_batched_tokens=longest + 1,
                       max_model_len=max(2048, longest + 1 + MAX_NEW_TOKENS))
    requests = warmup_requests(prompts[0]) + [
        Req(f"r{i}", ids, MAX_NEW_TOKENS) for i, ids in enumerate(prompts)]
    print(f"{len(prompts)} requests ({min(map(len, prompts))}..{longest} tokens), "
          f"{MAX_NEW_TOKENS} greedy tokens each: vanilla vLLM first, then vLLM + kvshare")
    vanilla = {r.req_id: r for r in run_engine(EngineSpec("vanilla", **spec_kwargs), requests)}
    home = config.home_dir / "demo"
    shutil.rmtree(home, ignore_errors=True)  # every demo starts from a cold cache
    connector = connector_config(config, home=str(home))
    shared = {r.req_id: r for r in run_engine(
        EngineSpec("kvshare", connector=connector, **spec_kwargs), requests)}
    rows = []
    for i, ids in enumerate(prompts):
        v, k = vanilla[f"r{i}"], shared[f"r{i}"]
        reuse = RequestReuse.of(len(ids), k.num_cached_tokens, k.kvshare)
        rows.append(DemoRow(
            index=i, role="earlier" if i % 2 == 0 else "later", prompt_tokens=len(ids),
            reused=reuse.reused_fraction, recomputed=reuse.recomputed, fallback=reuse.fallback,
            vanilla_ttft_s=v.ttft_s, kvshare_ttft_s=k.ttft_s,
            same_answer=k.output_ids == v.output_ids, rouge_l=rouge_l(k.text, v.text),
            preview=" ".join(texts[i].split())[:40]))
    return rows, connector


def print_rows(rows: list[DemoRow]) -> None:
    header = (f"{'#':>2} {'role':<7} {'tokens':>6} {'reused':>6} {'recomp':>6} "
              f"{'vanilla':>8} {'kvshare':>8} {'speedup':>7}  {'answer':<11} prompt")
    print(header)
    print("-" * len(header))
    for r in rows:
        answer = "same" if r.same_answer else f"ROUGE {r.rouge_l:.2f}"
        if r.fallback:
            answer += " FALLBACK"
        print(f"{r.index:>2} {r.role:<7} {r.prompt_tokens:>6} {r.reused:>6.0%} "
              f"{r.recomputed:>6} {r.vanilla_ttft_s * 1000:>6.0f}ms {r.kvshare_ttft_s * 1000:>6.0f}"
              f"ms {r.speedup:>6.2f}x  {answer:<11} {r.preview}")


def summarize(rows: list[DemoRow]) -> dict:
    """Medians over requests that reused KV (>= 50% of the prompt) and over the others."""
    groups = {"reused": [r for r in rows if r.reused >= 0.5],
              "computed": [r for r in rows if r.reused < 0.5]}
    return {name: _group_summary(group) for name, group in groups.items()}


def _group_summary(group: list[DemoRow]) -> dict:
    if not group:
        return {"requests": 0, **dict.fromkeys(
            ("reused_mean", "vanilla_ttft_median_s", "kvshare_ttft_median_s",
             "speedup_median", "same_answer", "rouge_l_mean"))}
    return {
        "requests": len(group),
        "reused_mean": statistics.fmean(r.reused for r in group),
        "vanilla_ttft_median_s": statistics.median(r.vanilla_ttft_s for r in group),
        "kvshare_ttft_median_s": statistics.median(r.kvshare_ttft_s for r in group),
        "speedup_median": statistics.median(r.speedup for r in group),
        "same_answer": statistics.fmean(r.same_answer for r in group),
        "rouge_l_mean": statistics.fmean(r.rouge_l for r in group),
    }


def summary_table(summary: dict) -> str:
    from kvshare.bench.quality import format_or_dash as cell

    lines = ["| requests | n | reused | vanilla TTFT p50 | kvshare TTFT p50 | speedup p50 "
             "| same answer | ROUGE-L vs full |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    labels = {"reused": "kvshare reused >= 50%", "computed": "kvshare reused < 50%"}
    for name, row in summary.items():
        lines.append(
            f"| {labels[name]} | {row['requests']} | {cell(row['reused_mean'], '.0%')} | "
            f"{cell(row['vanilla_ttft_median_s'], '.0f', ' ms', scale=1000)} | "
            f"{cell(row['kvshare_ttft_median_s'], '.0f', ' ms', scale=1000)} | "
            f"{cell(row['speedup_median'], '.2f', 'x')} | {cell(row['same_answer'], '.0%')} | "
            f"{cell(row['rouge_l_mean'], '.3f')} |")
    return "\n".join(lines)


def fallbacks(rows: list[DemoRow]) -> int:
    """Requests whose kvshare fill fell back to full recompute."""
    return sum(r.fallback for r in rows)


def fallback_line(rows: list[DemoRow]) -> str:
    """The line under the summary table: fallbacks, said out loud when there are any."""
    count = fallbacks(rows)
    if not count:
        return "fallbacks: none"
    return (f"**fallbacks**: {count} of {len(rows)} kvshare requests fell back to full "
            "recompute (selective fill failed): " + ", ".join(f"#{r.index}" for r in rows
                                                               if r.fallback))
