"""``kvshare inspect``: read-only views of the cache index.

``stats`` (entry and token counts per model/scope and per approximation depth), ``list``
(most recently used entries), ``show ENTRY_ID`` (one entry, its chunk keys and token
ids) and ``plan`` (what a prompt would reuse right now, run by run, and what the
connector would claim for it). Every view takes ``--json``. Opening the index never
writes to it, so this is safe beside a running connector; it sees what the connector
has flushed to LanceDB.

``plan`` agrees with the connector by construction: the same model id (the fingerprint
of the config's model directory), the same text to embed (the decoded token ids), the
same lookup (:class:`~kvshare.matching.matcher.Matcher` from the config) and the same
claim rule (:func:`~kvshare.matching.claim.decide_claim`), for a request without a vLLM
prefix-cache hit.
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
    views.add_parser("stats", help="entries and tokens per model, scope and depth")
    listing = views.add_parser("list", help="most recently used entries")
    listing.add_argument("--limit", type=int, default=20, help="rows to show (default: 20)")
    listing.add_argument("--scope", help="only this scope ('' is the public scope)")
    show = views.add_parser("show", help="one entry in full")
    show.add_argument("entry_id")
    plan = views.add_parser(
        "plan", help="what a prompt would reuse now, and what the connector would claim",
        description="Look a prompt up as the connector does and show the reuse plan and the "
        "claim (assuming no vLLM prefix-cache hit). The config's `model` must be the model "
        "vLLM serves: entries are keyed by its fingerprint. Requests to vLLM's chat API are "
        "chat-templated before the connector sees them; give their token ids with "
        "--token-ids to see exactly what the connector sees.")
    prompt = plan.add_mutually_exclusive_group(required=True)
    prompt.add_argument("text", nargs="?",
                        help="the prompt text, tokenized as is ('-' reads standard input)")
    prompt.add_argument("--token-ids", type=Path, metavar="FILE",
                        help="JSON list of the prompt's token ids ('-' reads standard input)")
    plan.add_argument("--tenant", default="",
                      help="the request's tenant, i.e. its cache_salt (default: public)")


def run(args: argparse.Namespace) -> int:
    from kvshare.matching.embedder import make_embedder
    from kvshare.storage.index import EntryIndex

    config = KVShareConfig.load(args.config)
    index_dir = args.index_dir or config.index_dir
    if not index_dir.is_dir():
        raise SystemExit(
            f"no kvshare index at {index_dir} (set --index-dir or `home` in the config)")
    # The connector's embedder, cache directory included, so plans embed identically.
    embedder = make_embedder(config.embedder, config.embed_max_chars,
                             cache_dir=config.home_dir / "wordllama")
    index = EntryIndex(index_dir, embedder.dim)
    if args.view == "stats":
        data = _stats(index)
        text = json.dumps(data, indent=2)
    elif args.view == "list":
        entries = [e for e in index.entries() if args.scope is None or e.scope == args.scope]
        entries.sort(key=lambda e: -max(e.last_hit_at, e.created_at))
        data = [_summary(e) for e in entries[: args.limit]]
        text = "\n".join(
            f"{d['entry_id']}  {d['scope'] or '<public>':<12} {d['num_tokens']:>6} tok "
            f"{d['exact_tokens']:>6} exact  depth {d['depth']}  {d['hit_count']:>4} hits  "
            f"{d['text_preview'][:60]!r}" for d in data
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


def _exact_tokens(entry) -> int:
    """Leading tokens of the entry whose KV is exact (``None`` in the entry: all)."""
    return entry.num_tokens if entry.exact_tokens is None else entry.exact_tokens


def _stats(index) -> dict:
    by_depth: dict[int, dict[str, int]] = {}
    for entry in index.entries():
        row = by_depth.setdefault(entry.depth, {"entries": 0, "tokens": 0, "exact_tokens": 0})
        row["entries"] += 1
        row["tokens"] += entry.num_tokens
        row["exact_tokens"] += _exact_tokens(entry)
    return {**index.stats(), "by_depth": {str(depth): row for depth, row in sorted(
        by_depth.items())}}


def _summary(entry) -> dict:
    return {
        "entry_id": entry.entry_id,
        "model_id": entry.model_id,
        "scope": entry.scope,
        "num_tokens": entry.num_tokens,
        "depth": entry.depth,
        "exact_tokens": _exact_tokens(entry),
        "hit_count": entry.hit_count,
        "created_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.created_at)),
        "chunks": len(entry.chunk_keys),
        "text_preview": entry.text_preview,
    }


def read_token_ids(path: Path, vocab_size: int) -> list[int]:
    """The JSON list of token ids in ``path`` ('-': standard input), checked."""
    raw = sys.stdin.read() if str(path) == "-" else path.read_text()
    try:
        ids = json.loads(raw)
    except ValueError as exc:
        raise SystemExit(f"--token-ids {path}: not JSON ({exc}); expected a list of ints"
                         ) from None
    if not isinstance(ids, list) or not ids:
        raise SystemExit(f"--token-ids {path}: expected a non-empty JSON list of token ids")
    for position, token in enumerate(ids):
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            raise SystemExit(f"--token-ids {path}: item {position} is {token!r}; expected a "
                             f"token id in [0, {vocab_size})")
    return ids


def _plan_view(args, config, index, embedder) -> tuple[dict, str]:
    from kvshare.matching.claim import decide_claim
    from kvshare.matching.matcher import Matcher
    from kvshare.model_assets import load_tokenizer, resolve_model_dir
    from kvshare.model_identity import model_fingerprint

    model_id = model_fingerprint(resolve_model_dir(config.model, config.home_dir),
                                 config.home_dir)
    tokenizer = load_tokenizer(config.model, str(config.home_dir))
    if args.token_ids is not None:
        token_ids = read_token_ids(args.token_ids, len(tokenizer))
    else:
        text = sys.stdin.read() if args.text == "-" else args.text
        token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # The connector sees token ids and embeds their decoding; so does this view.
    result = Matcher.from_config(config, index, embedder, model_id).lookup(
        tokenizer.decode(token_ids), token_ids, args.tenant)
    plan = result.plan
    claim = decide_claim(plan, 0, config)
    expected_reused = claim.expected_reused(config.rho)
    data = {
        "model_id": model_id,
        "num_tokens": plan.num_tokens,
        "planned_reuse_tokens": plan.reused_tokens,
        "planned_reuse_fraction": plan.reuse_fraction,
        "planned_recompute_tokens": plan.recompute_tokens,
        "runs": [vars(run) for run in plan.runs],
        "candidates": [{"entry_id": h.entry.entry_id, "distance": h.distance,
                        "depth": h.entry.depth} for h in result.hits],
        "claim_tokens": claim.num_claimed,
        "claim_planned_reuse": claim.planned_reuse,
        "claim_expected_reused": expected_reused,
        "lookup_ms": result.total_ms,
    }
    lines = [f"{plan.num_tokens} tokens: plan reuses {plan.reused_tokens} "
             f"({plan.reuse_fraction:.1%}), recomputes {plan.recompute_tokens}; "
             f"lookup {result.total_ms:.1f} ms"]
    lines += [f"  [{r.dst_start:>6}, {r.dst_end:>6}) <- {r.entry_id} @ {r.src_start}"
              for r in plan.runs]
    if claim.num_claimed:
        lines.append(
            f"connector claims [{claim.start}, {claim.end}) = {claim.num_claimed} tokens: "
            f"{claim.planned_reuse} from entries, {expected_reused} expected reused at "
            f"rho={config.rho} (no vLLM prefix hit assumed)")
    else:
        lines.append(
            f"connector claims nothing: it needs a plan reusing >= "
            f"{config.min_reuse_fraction:.0%} of the prompt and >= {config.min_reuse_tokens} "
            f"tokens, some outside the prompt's last {config.recompute_tail_tokens + 1}")
    return data, "\n".join(lines)
