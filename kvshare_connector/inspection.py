"""``kvshare inspect``: look inside one cache, and maintain it.

The cache is either an embedded home (``--home``, default: the config's; its index under
``<home>/index`` and its disk and Redis tiers as the config names them) or a running
``kvshare daemon`` (``--daemon ADDR``). Either way every view is a call of
:class:`~kvshare.admin.CacheAdmin`: in this process for a home, in the daemon (through
``kvshare.remote.client.DaemonClient``) for a daemon, so both answer alike.

Views: ``stats`` (index totals, per tenant, per approximation depth, per tier, and the
quality gate's latest shadow-check scores per model and scope), ``list``
(most recently used entries), ``show ENTRY_ID``, ``plan`` (what a prompt would reuse now
and what the connector would claim), ``evict ID...``, ``purge --tenant T`` and ``verify``
(a checksum scrub of every chunk of every tier, page by page with a progress bar). Tables
by default (rich), ``--json`` for scripts.

Embedded homes: the read views open the index without writing to it, so they are safe
beside a running connector (they see what it has flushed). The write views (evict, purge,
verify) open the index for writing, and there is no lock: they refuse when a daemon
answers on the home's socket, and must not run while an embedded vLLM serves the home
(its own writes would bring evicted entries back).

``plan`` agrees with the connector by construction: the same model id (the fingerprint
of the config's model directory), the same text to embed (the decoded token ids), the
same lookup (the catalog's :class:`~kvshare.matching.matcher.Matcher`) and the same
claim rule (:func:`~kvshare.matching.claim.decide_claim`), for a request without a vLLM
prefix-cache hit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from kvshare.config import KVShareConfig

WRITE_VIEWS = frozenset({"evict", "purge", "verify"})
AdminCall = Callable[..., Any]
"""``call(method_name, **kwargs)``: one :class:`~kvshare.admin.CacheAdmin` call."""

DESCRIPTION = """\
Look inside one kvshare cache: an embedded home (--home, default: the config's) or a
running daemon (--daemon ADDR). Tables by default, --json for scripts.

Writes (evict, purge, verify) on an embedded home open its index for writing. No lock
guards the index: its writer is whichever process serves the home, a running embedded
vLLM (mode: embedded) or the kvshare daemon. inspect refuses to write when a daemon
answers on the home's socket (use --daemon then); stop embedded vLLM instances of the
home first, or their later index writes can bring evicted entries back."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--daemon", metavar="ADDR",
                       help="ask the kvshare daemon at ADDR: ipc://PATH or tcp://HOST:PORT "
                       "(a home's default is ipc://<home>/daemon.sock; tcp needs the "
                       "config's daemon_secret)")
    where.add_argument("--home", type=Path, metavar="DIR",
                       help="an embedded home: index DIR/index, tiers as the config names "
                       "them (default: the config's home)")
    where.add_argument("--index-dir", type=Path, metavar="DIR",
                       help="the index directory of a home, i.e. --home DIR/..")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--timeout-ms", type=int, default=60_000, metavar="MS",
                        help="give up a daemon call after MS (default: 60000)")
    views = parser.add_subparsers(dest="view", metavar="VIEW", required=True)
    views.add_parser("stats", help="entries, tokens and hits per tenant; depths; tiers")
    listing = views.add_parser("list", help="most recently used entries")
    listing.add_argument("--limit", type=int, default=20, help="rows to show (default: 20)")
    listing.add_argument("--scope", help="only this tenant ('' is the public scope)")
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
    evict = views.add_parser(
        "evict", help="drop entries and the chunks no other entry references")
    evict.add_argument("entry_ids", nargs="+", metavar="ENTRY_ID")
    purge = views.add_parser(
        "purge", help="drop every entry of a tenant and the chunks no other entry references")
    purge.add_argument("--tenant", required=True,
                       help="the tenant (a cache_salt; '' is the public scope)")
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    verify = views.add_parser(
        "verify", help="read every chunk of every tier and check its checksum; drop the "
        "damaged ones and the entries that lose a chunk")
    verify.add_argument("--page-chunks", type=int, default=32, metavar="N",
                        help="chunks read per call (default: 32)")


def run(args: argparse.Namespace) -> int:
    config = _config(args)
    if args.view == "plan":
        data = _plan(args, config)
    else:
        with _admin(args, config) as call:
            data = _VIEWS[args.view](args, call)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        _PRINTERS[args.view](data)
    return 0


# ------------------------------------------------------------------------ the cache
def _config(args: argparse.Namespace) -> KVShareConfig:
    config = KVShareConfig.load(args.config)
    home = args.home
    if args.index_dir is not None:
        if args.index_dir.name != "index":
            raise SystemExit(f"--index-dir {args.index_dir}: a kvshare index lives in "
                             "<home>/index; give that directory, or --home <home>")
        home = args.index_dir.parent
    return config if home is None else dataclasses.replace(config, home=str(home))


@contextmanager
def _admin(args: argparse.Namespace, config: KVShareConfig) -> Iterator[AdminCall]:
    """The admin calls of the daemon (``--daemon``) or of the embedded home."""
    if args.daemon is not None:
        with _daemon_admin(args.daemon, config, args.timeout_ms) as call:
            yield call
        return
    from kvshare.admin import CacheAdmin
    from kvshare.catalog import LocalCatalog
    from kvshare.tiers_setup import build_store

    if not config.index_dir.is_dir():
        raise SystemExit(f"no kvshare index at {config.index_dir} (set --home, or `home` in "
                         "the config)")
    writes = args.view in WRITE_VIEWS
    if writes and daemon_is_live(config.daemon_endpoint):
        raise SystemExit(
            f"a kvshare daemon is live at {config.daemon_endpoint} and owns this home's "
            f"index; run `kvshare inspect --daemon {config.daemon_endpoint} {args.view} ...`")
    catalog = LocalCatalog(config, read_only=not writes)
    store = build_store(config, serving=False)
    admin = CacheAdmin(catalog, store)
    try:
        yield lambda name, **kwargs: _local_call(admin, name, kwargs)
    finally:
        store.close()
        if writes:  # flushes the removals; read views leave the index files untouched
            catalog.close()


def _local_call(admin: Any, name: str, kwargs: dict[str, Any]) -> Any:
    try:
        return getattr(admin, name)(**kwargs)
    except (KeyError, ValueError) as exc:
        raise SystemExit(exc.args[0] if exc.args else str(exc)) from None


@contextmanager
def _daemon_admin(address: str, config: KVShareConfig, timeout_ms: int) -> Iterator[AdminCall]:
    from kvshare.remote.client import DaemonCallError, DaemonClient, DaemonUnavailable

    client = DaemonClient(address, secret=config.daemon_secret, timeout_ms=timeout_ms)

    def call(name: str, **kwargs: Any) -> Any:
        try:
            return client.admin(name, timeout_ms=timeout_ms, **kwargs)
        except (DaemonCallError, DaemonUnavailable) as exc:
            raise SystemExit(str(exc)) from None

    try:
        yield call
    finally:
        client.close()


def daemon_is_live(endpoint: str) -> bool:
    """Whether something accepts connections at a daemon endpoint (``ipc://PATH``: a
    listening Unix socket; ``tcp://HOST:PORT``: a listening port). A stale socket file
    left by a dead daemon is not live."""
    scheme, _, where = endpoint.partition("://")
    if scheme == "ipc":
        if not Path(where).exists():
            return False
        family, target = socket.AF_UNIX, where
    else:
        host, _, port = where.rpartition(":")
        host = host.strip("[]")
        # A bind address (every interface) is reached through the loopback.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        target = ("127.0.0.1" if host in ("*", "0.0.0.0") else host, int(port))
    with closing(socket.socket(family, socket.SOCK_STREAM)) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(target)
        except OSError:
            return False
    return True


# ------------------------------------------------------------------------ views
def _stats(args, call: AdminCall) -> dict:
    return call("stats")


def _list(args, call: AdminCall) -> list:
    return call("list_entries", scope=args.scope, limit=args.limit)


def _show(args, call: AdminCall) -> dict:
    return call("show", entry_id=args.entry_id)


def _evict(args, call: AdminCall) -> dict:
    return call("evict", entry_ids=args.entry_ids)


def _purge(args, call: AdminCall) -> dict:
    if not args.yes:
        entries = call("stats")["tenants"].get(args.tenant, {}).get("entries", 0)
        what = (f"purge deletes the {entries} entries of tenant {args.tenant!r} and the "
                "chunks no other entry references")
        if not sys.stdin.isatty():
            raise SystemExit(f"{what}; pass --yes to confirm (standard input is not a "
                             "terminal to ask on)")
        if input(f"{what}. Go on? [y/N] ").strip().lower() not in ("y", "yes"):
            raise SystemExit("purge cancelled")
    return call("purge", tenant=args.tenant)


def _verify(args, call: AdminCall) -> dict:
    """Every page of the scrub, with a progress bar on standard error."""
    from rich.console import Console
    from rich.progress import Progress

    if args.page_chunks < 1:
        raise SystemExit(f"--page-chunks {args.page_chunks}: expected >= 1")
    summary: dict[str, Any] = {"checked": 0, "checked_by_tier": {}, "damaged": [],
                               "removed": [], "total": None, "pages": 0}
    cursor = None
    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("verifying chunks", total=None)
        while True:
            page = call("verify_page", cursor=cursor, limit=args.page_chunks)
            if summary["total"] is None:
                summary["total"] = page["total"]
                progress.update(task, total=page["total"])
            summary["pages"] += 1
            summary["checked"] += page["checked"]
            for tier, checked in page["checked_by_tier"].items():
                summary["checked_by_tier"][tier] = summary["checked_by_tier"].get(tier, 0) + checked
            summary["damaged"] += page["damaged"]
            summary["removed"] += page["removed"]
            progress.advance(task, page["checked"])
            cursor = page["next_cursor"]
            if cursor is None:
                return summary


def _plan(args: argparse.Namespace, config: KVShareConfig) -> dict:
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
    with _admin(args, config) as call:
        return call("plan", model_id=model_id, text=tokenizer.decode(token_ids),
                    token_ids=list(token_ids), tenant=args.tenant)


_VIEWS: dict[str, Callable[[argparse.Namespace, AdminCall], Any]] = {
    "stats": _stats, "list": _list, "show": _show, "evict": _evict, "purge": _purge,
    "verify": _verify,
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


# ------------------------------------------------------------------------ tables
def _console():
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:  # piped: no width to fit, and entry ids must stay whole
        console = Console(highlight=False, width=200)
    return console


def _table(title: str, columns: list[str], rows: list[list[Any]]):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, justify="left" if column in _TEXT_COLUMNS else "right")
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    return table


_TEXT_COLUMNS = {"tenant", "tier", "entry", "key", "reason", "preview", "last used",
                 "field", "value", "healthy", "model", "gate", "updated"}


def _scope_name(scope: str) -> str:
    return scope or "<public>"


def _print_stats(data: dict) -> None:
    console = _console()
    console.print(f"{data['entries']} entries, {data['tokens']} prompt tokens "
                  f"(index {data['path']}, {data['pending_writes']} writes pending)")
    quota = data["tenant_quota_bytes"]
    console.print(_table(
        f"tenants (quota: {_size(quota) if quota else 'none'})",
        ["tenant", "entries", "tokens", "chunks", "stored tokens", "KV bytes", "hits"],
        [[_scope_name(scope), t["entries"], t["tokens"], t["chunks"], t["stored_tokens"],
          _size(t["kv_bytes"]), t["hits"]] for scope, t in data["tenants"].items()]))
    console.print(_table("approximation depth", ["depth", "entries", "tokens", "exact tokens"],
                         [[depth, d["entries"], d["tokens"], d["exact_tokens"]]
                          for depth, d in data["by_depth"].items()]))
    console.print(_table(
        "tiers", ["tier", "chunks", "bytes used", "capacity", "hits", "misses", "corrupt",
                  "errors", "healthy"],
        [[name, "?" if t["chunks"] < 0 else t["chunks"], _size(t["bytes_used"]),
          _size(t["capacity_bytes"]), t["hits"], t["misses"], t["corrupt"], t["errors"],
          "yes" if t["healthy"] else f"no: {t['last_error']}"]
         for name, t in data["tiers"].items()]))
    if data["quality"]:
        console.print(_table(
            "quality (shadow checks: the model's, then each scope's)",
            ["model", "tenant", "gate", "score", "in window", "checks", "top-1", "KL nats",
             "updated"],
            [[document["model_id"], tenant, domain["gate"], _share(domain["score"]),
              domain["checks_in_window"], domain["checks"], _share(domain["top1_mean"]),
              "-" if domain["kl_mean"] is None else f"{domain['kl_mean']:.4f}",
              _when(document["updated_at"])]
             for document in data["quality"]
             for tenant, domain in [("<all>", document["model"]),
                                    *((_scope_name(scope), scores) for scope, scores
                                      in document["scopes"].items())]]))
    else:
        console.print("quality: no shadow check scored yet")


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _print_list(data: list) -> None:
    if not data:
        print("(no entries)")
        return
    _console().print(_table(
        "entries, most recently used first",
        ["entry", "tenant", "tokens", "exact", "depth", "hits", "last used", "preview"],
        [[d["entry_id"], _scope_name(d["scope"]), d["num_tokens"], d["exact_tokens"],
          d["depth"], d["hit_count"], d["last_used_at"], d["text_preview"][:40]]
         for d in data]))


def _print_show(data: dict) -> None:
    fields = {key: value for key, value in data.items() if key not in ("chunk_keys",
                                                                         "token_ids")}
    fields["scope"] = _scope_name(fields["scope"])
    console = _console()
    console.print(_table(f"entry {data['entry_id']}", ["field", "value"],
                         [[key, value] for key, value in fields.items()]))
    console.print(_table("chunks", ["#", "key"],
                         [[i, key] for i, key in enumerate(data["chunk_keys"])]))
    console.print(f"{len(data['token_ids'])} token ids (--json prints them)")


def _print_plan(data: dict) -> None:
    lines = [f"{data['num_tokens']} tokens: plan reuses {data['planned_reuse_tokens']} "
             f"({data['planned_reuse_fraction']:.1%}), recomputes "
             f"{data['planned_recompute_tokens']}; lookup {data['lookup_ms']:.1f} ms"]
    lines += [f"  [{r['dst_start']:>6}, {r['dst_start'] + r['length']:>6}) <- "
              f"{r['entry_id']} @ {r['src_start']}" for r in data["runs"]]
    if data["claim_tokens"]:
        lines.append(
            f"connector claims [{data['claim_start']}, {data['claim_end']}) = "
            f"{data['claim_tokens']} tokens: {data['claim_planned_reuse']} from entries, "
            f"{data['claim_expected_reused']} expected reused at rho={data['rho']} "
            "(no vLLM prefix hit assumed)")
    else:
        lines.append(
            f"connector claims nothing: it needs a plan reusing >= "
            f"{data['min_reuse_fraction']:.0%} of the prompt and >= "
            f"{data['min_reuse_tokens']} tokens, some outside the prompt's last "
            f"{data['recompute_tail_tokens'] + 1}")
    print("\n".join(lines))


def _print_removal(data: dict) -> None:
    console = _console()
    head = f"tenant {_scope_name(data['tenant'])}: " if "tenant" in data else ""
    console.print(f"{head}evicted {len(data['evicted'])} entries; deleted "
                  f"{data['chunks_deleted']} chunks, kept {data['chunks_shared']} shared "
                  "with remaining entries")
    if data.get("missing"):
        console.print(f"not in the index: {', '.join(data['missing'])}")
    console.print(_table("chunks deleted per tier", ["tier", "chunks"],
                         [[name, n] for name, n in data["deleted_by_tier"].items()]))


def _print_verify(data: dict) -> None:
    console = _console()
    damaged_by_tier: dict[str, int] = {}
    for damage in data["damaged"]:
        damaged_by_tier[damage["tier"]] = damaged_by_tier.get(damage["tier"], 0) + 1
    console.print(_table(
        f"verified {data['checked']} of {data['total']} chunks", ["tier", "checked",
                                                                  "damaged (dropped)"],
        [[tier, checked, damaged_by_tier.get(tier, 0)]
         for tier, checked in data["checked_by_tier"].items()]))
    if data["damaged"]:
        console.print(_table("damaged chunks", ["tier", "key", "reason"],
                             [[d["tier"], d["key"], d["reason"]] for d in data["damaged"]]))
    console.print(f"entries removed (a chunk lost from every tier): {len(data['removed'])}"
                  + (f": {', '.join(data['removed'])}" if data["removed"] else ""))


def _size(nbytes: int | None) -> str:
    if nbytes is None:
        return "-"
    value, unit = float(nbytes), "B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            break
        value /= 1024
    return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"


_PRINTERS: dict[str, Callable[[Any], None]] = {
    "stats": _print_stats, "list": _print_list, "show": _print_show, "plan": _print_plan,
    "evict": _print_removal, "purge": _print_removal, "verify": _print_verify,
}
