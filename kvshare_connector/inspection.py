"""``kvshare inspect``: read-only views of the cache index.

``stats`` (entry and token counts per model/scope), ``list`` (most recently used
entries), ``show ENTRY_ID`` (one entry, its chunk keys and token ids) and ``plan TEXT``
(what a prompt would reuse right now, run by run). Every view takes ``--json``. Opening
the index never writes to it, so this is safe beside a running connector.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from kvshare.config import KVShareConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index-dir", type=Path,
                        help="index directory (default: <home>/index from the config)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    views = parser.add_subparsers(dest="view", metavar="VIEW", required=True)
    views.add_parser("stats", help="entries and tokens per model and scope")
    listing = views.add_parser("list", help="most recently used entries")
    listing.add_argument("--limit", type=int, default=20, help="rows to show (default: 20)")
    listing.add_argument("--scope", help="only this scope ('' is the public scope)")
    show = views.add_parser("show", help="one entry in full")
    show.add_argument("entry_id")
    plan = views.add_parser("plan", help="what a prompt would reuse now")
    plan.add_argument("text", help="the prompt text ('-' reads standard input)")
    plan.add_argument("--tenant", default="", help="the request's tenant (cache_salt)")


def run(args: argparse.Namespace) -> int:
    from kvshare.matching.embedder import make_embedder
    from kvshare.storage.index import EntryIndex

    config = KVShareConfig.load(args.config)
    index_dir = args.index_dir or config.index_dir
    if not index_dir.is_dir():
        raise SystemExit(
            f"no kvshare index at {index_dir} (set --index-dir or `home` in the config)")
    embedder = make_embedder(config.embedder, config.embed_max_chars)
    index = EntryIndex(index_dir, embedder.dim)
    if args.view == "stats":
        data = index.stats()
        text = json.dumps(data, indent=2)
    elif args.view == "list":
        entries = [e for e in index.entries() if args.scope is None or e.scope == args.scope]
        entries.sort(key=lambda e: -max(e.last_hit_at, e.created_at))
        data = [_summary(e) for e in entries[: args.limit]]
        text = "\n".join(
            f"{d['entry_id']}  {d['scope'] or '<public>':<12} {d['num_tokens']:>6} tok "
            f"{d['hit_count']:>4} hits  {d['text_preview'][:60]!r}" for d in data
        ) or "(no entries)"
    elif args.view == "show":
        found = index.get([args.entry_id])
        if not found:
            raise SystemExit(f"no entry {args.entry_id!r} in {index_dir}")
        entry = found[0]
        data = {**_summary(entry), "chunk_keys": entry.chunk_keys,
                "token_ids": entry.token_ids.tolist()}
        text = json.dumps(data, indent=2)
    else:
        data, text = _plan_view(args, config, index, embedder)
    print(json.dumps(data, indent=2) if args.json else text)
    return 0


def _summary(entry) -> dict:
    return {
        "entry_id": entry.entry_id,
        "model_id": entry.model_id,
        "scope": entry.scope,
        "num_tokens": entry.num_tokens,
        "hit_count": entry.hit_count,
        "created_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.created_at)),
        "chunks": len(entry.chunk_keys),
        "text_preview": entry.text_preview,
    }


def _plan_view(args, config, index, embedder) -> tuple[dict, str]:
    from kvshare.matching.matcher import Matcher
    from kvshare.model_assets import load_tokenizer

    text = sys.stdin.read() if args.text == "-" else args.text
    tokens = load_tokenizer(config.model)(text, add_special_tokens=False)["input_ids"]
    result = Matcher.from_config(config, index, embedder, config.model).lookup(
        text, tokens, args.tenant)
    plan = result.plan
    data = {
        "num_tokens": plan.num_tokens,
        "reused_tokens": plan.reused_tokens,
        "reuse_fraction": plan.reuse_fraction,
        "recompute_tokens": plan.recompute_tokens,
        "runs": [vars(run) for run in plan.runs],
        "candidates": [{"entry_id": h.entry.entry_id, "distance": h.distance} for h in result.hits],
        "lookup_ms": result.total_ms,
    }
    lines = [f"{plan.num_tokens} tokens: reuse {plan.reused_tokens} ({plan.reuse_fraction:.1%}), "
             f"recompute {plan.recompute_tokens}; lookup {result.total_ms:.1f} ms"]
    lines += [f"  [{r.dst_start:>6}, {r.dst_end:>6}) <- {r.entry_id} @ {r.src_start}"
              for r in plan.runs]
    return data, "\n".join(lines)
