"""``kvshare inspect``: every view on a real cache (an embedded home and a real daemon),
and plans keyed and claimed as the connector does."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest
import yaml
from real_cache import INVOICE, add_sample_entries, open_real_cache

from kvshare.cli import main
from kvshare.config import KVShareConfig
from kvshare.inspection import read_token_ids
from kvshare.matching.matcher import Matcher
from kvshare.model_assets import SMOLLM2_ALIAS, resolve_model_dir
from kvshare.model_identity import model_fingerprint
from kvshare.storage.index import EntryIndex, IndexEntry, new_entry_id

PROMPT = (
    "You are a careful accountant. Translate the following invoice into French, keep every "
    "total unchanged and list the line items in the original order. "
    + " ".join(f"Line {i}: {3 + i} units of part {100 + 7 * i} at {12 + i}.50 euros each."
               for i in range(12))
)


@pytest.fixture
def setup(tmp_path, wordllama, tokenizer):
    """A config whose home holds an index with PROMPT stored in tenant "acme", keyed by
    the model fingerprint as the connector keys it."""
    home = tmp_path / "home"
    model_dir = resolve_model_dir(SMOLLM2_ALIAS)
    config_path = tmp_path / "kvshare.yaml"
    config_path.write_text(yaml.safe_dump({"home": str(home), "model": str(model_dir)}))
    tokens = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    index = EntryIndex(home / "index", wordllama.dim)
    matcher = Matcher(index, wordllama, model_id=model_fingerprint(model_dir, home))
    stored = matcher.insert(tokenizer.decode(tokens), tokens, tenant="acme")
    index.close()
    return config_path, stored, tokens


def run_json(capsys, config_path, *argv) -> object:
    assert main(["--config", str(config_path), "inspect", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_views_as_json(setup, capsys):
    config_path, stored, tokens = setup
    stats = run_json(capsys, config_path, "stats")
    assert stats["entries"] == 1 and stats["tokens"] == len(tokens)
    assert stats["quality"] == []  # no shadow check scored in this home
    assert stats["by_depth"] == {"0": {"entries": 1, "tokens": len(tokens),
                                       "exact_tokens": len(tokens)}}
    listing = run_json(capsys, config_path, "list")
    assert [row["entry_id"] for row in listing] == [stored.entry_id]
    assert listing[0]["depth"] == 0 and listing[0]["exact_tokens"] == len(tokens)
    assert run_json(capsys, config_path, "list", "--scope", "globex") == []
    shown = run_json(capsys, config_path, "show", stored.entry_id)
    assert shown["token_ids"] == tokens and shown["depth"] == 0


def test_views_show_approximate_entries(setup, capsys, wordllama, tokenizer):
    config_path, stored, tokens = setup
    home = yaml.safe_load(config_path.read_text())["home"]
    with EntryIndex(f"{home}/index", wordllama.dim) as index:
        index.add([IndexEntry(new_entry_id(), stored.model_id, "acme", stored.embedding,
                              tokens[:100], depth=1, exact_tokens=40)])
    stats = run_json(capsys, config_path, "stats")
    assert stats["by_depth"] == {
        "0": {"entries": 1, "tokens": len(tokens), "exact_tokens": len(tokens)},
        "1": {"entries": 1, "tokens": 100, "exact_tokens": 40},
    }
    rows = {row["depth"]: row for row in run_json(capsys, config_path, "list")}
    assert rows[1]["exact_tokens"] == 40 and rows[1]["num_tokens"] == 100
    assert main(["--config", str(config_path), "inspect", "list"]) == 0
    cells = table_row(capsys.readouterr().out, rows[1]["entry_id"])
    assert cells[1:6] == ["acme", "100", "40", "1", "0"]  # tenant tokens exact depth hits


def test_stats_show_the_quality_gates_latest_scores(setup, capsys):
    """The scores a connector's gate wrote under the home, per model and scope, in the
    JSON and the table."""
    from kvshare.connector.quality_gate import GateSettings, QualityGate
    from kvshare.quality_scores import scores_path, write_scores

    config_path, _, _ = setup
    home = Path(yaml.safe_load(config_path.read_text())["home"])
    gate = QualityGate(GateSettings(min_top1=0.75, max_kl=0.1, window=4, floor=0.5,
                                    min_checks=2, reopen_checks=2))
    gate.record("acme", 1.0, 0.01)
    gate.record("", 0.9, 0.05)
    gate.record("globex", 0.1, 3.0)
    gate.record("globex", 0.3, 1.0)  # the model: 2 of 4 pass; globex: 0 of 2, closed
    model_id = "smollm2-135m-instruct@0123456789abcdef"
    write_scores(scores_path(home, model_id), gate.snapshot(model_id))
    [quality] = run_json(capsys, config_path, "stats")["quality"]
    assert quality["model_id"] == model_id
    assert quality["model"] == {"score": 0.5, "checks_in_window": 4, "checks": 4,
                                "gate": "open", "top1_mean": pytest.approx(0.575),
                                "kl_mean": pytest.approx(1.015)}
    assert quality["scopes"]["globex"]["gate"] == "closed"
    assert quality["scopes"]["globex"]["score"] == 0.0
    assert quality["scopes"]["acme"]["gate"] == "open"
    assert main(["--config", str(config_path), "inspect", "stats"]) == 0
    rows = {cells[1]: cells[2:6] for line in capsys.readouterr().out.splitlines()
            if (cells := [c.strip() for c in line.strip("│┃ ").split("│")])[0] == model_id}
    assert rows == {"<all>": ["open", "0.50", "4", "4"], "acme": ["open", "1.00", "1", "1"],
                    "<public>": ["open", "1.00", "1", "1"],
                    "globex": ["closed", "0.00", "2", "2"]}


def test_plan_of_the_stored_prompt_claims_all_but_the_tail(setup, capsys):
    config_path, _, tokens = setup
    config = KVShareConfig()
    plan = run_json(capsys, config_path, "plan", PROMPT, "--tenant", "acme")
    assert plan["num_tokens"] == len(tokens)
    assert plan["planned_reuse_tokens"] == len(tokens) - 1  # the last token is computed
    claimed = len(tokens) - 1 - config.recompute_tail_tokens  # vLLM prefills the tail
    assert plan["claim_tokens"] == plan["claim_planned_reuse"] == claimed
    # The stored prompt's own rows, verbatim: loaded, none recomputed.
    assert plan["claim_expected_reused"] == claimed


def test_token_ids_give_the_same_plan_as_text(setup, capsys, tmp_path):
    config_path, _, tokens = setup
    ids_file = tmp_path / "ids.json"
    ids_file.write_text(json.dumps(tokens))
    by_text = run_json(capsys, config_path, "plan", PROMPT, "--tenant", "acme")
    by_ids = run_json(capsys, config_path, "plan", "--token-ids", str(ids_file),
                      "--tenant", "acme")
    for plan in (by_text, by_ids):
        del plan["lookup_ms"]
    assert by_ids == by_text


def test_plan_sees_only_the_tenants_scopes(setup, capsys):
    config_path, _, _ = setup
    other = run_json(capsys, config_path, "plan", PROMPT, "--tenant", "globex")
    assert other["planned_reuse_tokens"] == other["claim_tokens"] == 0
    assert other["candidates"] == []


def test_entries_under_another_model_id_are_not_reused(tmp_path, wordllama, tokenizer,
                                                       capsys):
    """An index keyed by a path or an alias (as before fingerprints) shows no reuse."""
    home = tmp_path / "home"
    config_path = tmp_path / "kvshare.yaml"
    config_path.write_text(yaml.safe_dump({"home": str(home),
                                           "model": str(resolve_model_dir(SMOLLM2_ALIAS))}))
    tokens = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    with EntryIndex(home / "index", wordllama.dim) as index:
        Matcher(index, wordllama, model_id=SMOLLM2_ALIAS).insert(PROMPT, tokens)
    plan = run_json(capsys, config_path, "plan", PROMPT)
    assert plan["model_id"].startswith(SMOLLM2_ALIAS + "@")
    assert plan["planned_reuse_tokens"] == plan["claim_tokens"] == 0


def test_plan_text_says_what_the_connector_claims(setup, capsys):
    config_path, _, tokens = setup
    assert main(["--config", str(config_path), "inspect", "plan", PROMPT,
                 "--tenant", "acme"]) == 0
    claimed = len(tokens) - 1 - KVShareConfig().recompute_tail_tokens
    assert f"connector claims [0, {claimed}) = {claimed} tokens" in capsys.readouterr().out
    assert main(["--config", str(config_path), "inspect", "plan", PROMPT[:80],
                 "--tenant", "acme"]) == 0
    assert "connector claims nothing" in capsys.readouterr().out


@pytest.mark.parametrize(("content", "named"), [
    ("[1, 2", "not JSON"),
    ("{}", "non-empty JSON list"),
    ("[]", "non-empty JSON list"),
    ("[5, \"x\"]", "item 1 is 'x'"),
    ("[5, true]", "item 1 is True"),
    ("[5, -1]", "item 1 is -1; expected a token id in [0, 100)"),
])
def test_bad_token_ids_are_named(tmp_path, content, named):
    ids_file = tmp_path / "ids.json"
    ids_file.write_text(content)
    with pytest.raises(SystemExit, match=re.escape(named)):
        read_token_ids(ids_file, vocab_size=100)


def test_token_ids_beyond_the_vocabulary_are_refused(setup, tmp_path, tokenizer):
    config_path, _, _ = setup
    ids_file = tmp_path / "ids.json"
    ids_file.write_text(json.dumps([5, len(tokenizer)]))
    with pytest.raises(SystemExit, match=f"item 1 is {len(tokenizer)}; expected a token id"):
        main(["--config", str(config_path), "inspect", "plan", "--token-ids", str(ids_file)])


def test_plan_takes_text_or_token_ids_not_both(setup, tmp_path, capsys):
    config_path, _, _ = setup
    with pytest.raises(SystemExit) as excinfo:
        main(["--config", str(config_path), "inspect", "plan", PROMPT,
              "--token-ids", str(tmp_path / "ids.json")])
    assert excinfo.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit) as excinfo:
        main(["--config", str(config_path), "inspect", "plan"])
    assert excinfo.value.code == 2


def test_plan_help_names_both_prompt_forms(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["inspect", "plan", "--help"])
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    assert "--token-ids FILE" in out and "--tenant" in out and "fingerprint" in out


def test_errors_name_the_missing_thing(setup, tmp_path):
    config_path, _, _ = setup
    with pytest.raises(SystemExit, match="no-such-entry"):
        main(["--config", str(config_path), "inspect", "show", "no-such-entry"])
    with pytest.raises(SystemExit, match="no kvshare index at"):
        main(["inspect", "--home", str(tmp_path / "nowhere"), "stats"])
    with pytest.raises(SystemExit, match="a kvshare index lives in <home>/index"):
        main(["inspect", "--index-dir", str(tmp_path / "nowhere"), "stats"])


def table_row(out: str, first_cell: str) -> list[str]:
    """The cells of the rich table row that starts with ``first_cell``."""
    for line in out.splitlines():
        cells = [cell.strip() for cell in line.strip("│┃ ").split("│")]
        if cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{out}")


# ---------------------------------------------------------------- a real cache's views
@pytest.fixture
def real(tmp_path, wordllama, tokenizer):
    """A home whose disk tier holds SmolLM2-layout chunks of four entries: acme's invoice
    and its edit (sharing leading chunks), globex's invoice, a public trip. Flushed and
    closed, as a stopped vLLM leaves it."""
    cache = open_real_cache(tmp_path, wordllama)
    entries = add_sample_entries(cache, tokenizer)
    cache.close()
    return cache, entries, ["--config", str(cache.config_path), "inspect"]


def inspect_json(capsys, argv, *view) -> object:
    assert main([*argv, "--json", *view]) == 0
    return json.loads(capsys.readouterr().out)


def shared(entries) -> int:
    return sum(a.key == b.key for a, b in zip(entries["acme"][1], entries["acme_edit"][1]))


def distinct_chunks(entries, names=("acme", "acme_edit", "globex", "public")) -> int:
    return len({c.key for name in names for c in entries[name][1]})


def test_stats_list_show_on_a_real_home(real, capsys):
    cache, entries, argv = real
    stats = inspect_json(capsys, argv, "stats")
    assert stats["entries"] == 4
    acme = entries["acme"][0].num_tokens + entries["acme_edit"][0].num_tokens
    assert stats["tenants"]["acme"]["tokens"] == acme
    assert stats["tenants"]["acme"]["chunks"] == distinct_chunks(entries, ("acme", "acme_edit"))
    assert stats["tenants"]["acme"]["chunks"] == (
        len(entries["acme"][1]) + len(entries["acme_edit"][1]) - shared(entries))
    assert set(stats["tenants"]) == {"", "acme", "globex"}
    assert {key.rsplit("/", 1)[1] for key in stats["partitions"]} == {"<public>", "acme",
                                                                       "globex"}
    assert list(stats["tiers"]) == ["disk"]  # CPU tiers live inside serving processes
    assert stats["tiers"]["disk"]["chunks"] == distinct_chunks(entries)
    listing = inspect_json(capsys, argv, "list", "--scope", "acme")
    assert {row["entry_id"] for row in listing} == {entries[n][0].entry_id
                                                    for n in ("acme", "acme_edit")}
    assert inspect_json(capsys, argv, "list", "--limit", "1")[0]["entry_id"] == (
        entries["public"][0].entry_id)  # the most recently added
    entry, chunks = entries["globex"]
    shown = inspect_json(capsys, argv, "show", entry.entry_id)
    assert shown["chunk_keys"] == [c.key.hex() for c in chunks]
    assert shown["token_ids"] == entry.token_ids.tolist() and shown["scope"] == "globex"
    # The tables name the same figures.
    assert main([*argv, "stats"]) == 0
    out = capsys.readouterr().out
    assert table_row(out, "acme")[1:3] == ["2", str(acme)]
    assert stats["tenants"]["acme"]["kv_bytes"] == acme * 23040  # SmolLM2: B per token
    assert table_row(out, "acme")[5] == f"{acme * 23040 / 2**20:.1f} MiB"
    assert table_row(out, "disk")[1] == str(distinct_chunks(entries))


def test_evict_and_purge_on_a_real_home(real, capsys):
    cache, entries, argv = real
    acme, acme_chunks = entries["acme"]
    files = {name: [cache.chunk_file(c).exists() for c in entries[name][1]] for name in entries}
    assert all(all(held) for held in files.values())
    evicted = inspect_json(capsys, argv, "evict", acme.entry_id, "nope")
    assert evicted["evicted"] == [acme.entry_id] and evicted["missing"] == ["nope"]
    assert evicted["chunks_shared"] == shared(entries)
    assert evicted["deleted_by_tier"] == {"disk": len(acme_chunks) - shared(entries)}
    assert [cache.chunk_file(c).exists() for c in acme_chunks] == (
        [True] * shared(entries) + [False] * (len(acme_chunks) - shared(entries)))
    # The eviction is durable: a new inspect process no longer sees the entry.
    assert acme.entry_id not in {r["entry_id"] for r in inspect_json(capsys, argv, "list")}
    # purge asks first; without a terminal it needs --yes.
    with pytest.raises(SystemExit, match="pass --yes"):
        main([*argv, "purge", "--tenant", "acme"])
    purged = inspect_json(capsys, argv, "purge", "--tenant", "acme", "--yes")
    assert purged["evicted"] == [entries["acme_edit"][0].entry_id]
    assert purged["chunks_deleted"] == len(entries["acme_edit"][1])
    assert not any(cache.chunk_file(c).exists() for c in entries["acme_edit"][1])
    assert all(cache.chunk_file(c).exists()
               for name in ("globex", "public") for c in entries[name][1])
    stats = inspect_json(capsys, argv, "stats")
    assert set(stats["tenants"]) == {"", "globex"}
    assert stats["tiers"]["disk"]["chunks"] == distinct_chunks(entries, ("globex", "public"))
    assert main([*argv, "purge", "--tenant", "globex", "--yes"]) == 0
    assert "tenant globex: evicted 1 entries" in capsys.readouterr().out


def test_verify_on_a_real_home_removes_damage_and_what_depended_on_it(real, capsys):
    cache, entries, argv = real
    flipped = cache.chunk_file(entries["acme"][1][0])  # shared by both acme entries
    data = bytearray(flipped.read_bytes())
    data[len(data) // 3] ^= 0x04
    flipped.write_bytes(bytes(data))
    truncated = cache.chunk_file(entries["globex"][1][-1])
    truncated.write_bytes(truncated.read_bytes()[:-1])
    summary = inspect_json(capsys, argv, "verify", "--page-chunks", "2")
    assert summary["total"] == distinct_chunks(entries) and summary["pages"] >= 2
    assert sorted((d["tier"], d["key"]) for d in summary["damaged"]) == sorted(
        [("disk", flipped.stem), ("disk", truncated.stem)])
    assert sorted(summary["removed"]) == sorted(
        entries[name][0].entry_id for name in ("acme", "acme_edit", "globex"))
    assert not flipped.exists() and not truncated.exists()
    assert all(cache.chunk_file(c).exists() for c in entries["public"][1])
    assert [r["entry_id"] for r in inspect_json(capsys, argv, "list")] == [
        entries["public"][0].entry_id]
    # A clean scrub, as a table.
    assert main([*argv, "verify"]) == 0
    out = capsys.readouterr().out
    n = len(entries["public"][1])
    assert f"verified {n} of {n} chunks" in out and table_row(out, "disk")[1:3] == [str(n), "0"]
    assert "entries removed (a chunk lost from every tier): 0" in out


def test_writes_are_refused_while_a_daemon_serves_the_home(real, capsys):
    cache, entries, argv = real
    from kvshare.inspection import daemon_is_live

    path = cache.config.home_dir / "daemon.sock"
    assert not daemon_is_live(f"ipc://{path}")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    assert not daemon_is_live(f"ipc://{path}")  # a socket file nobody listens on: stale
    listener.listen()
    try:
        assert daemon_is_live(f"ipc://{path}")
        with pytest.raises(SystemExit, match=r"daemon is live at ipc://.*--daemon"):
            main([*argv, "evict", entries["acme"][0].entry_id])
        assert inspect_json(capsys, argv, "stats")["entries"] == 4  # reads still work
    finally:
        listener.close()


def test_help_says_who_writes_the_index(capsys):
    with pytest.raises(SystemExit):
        main(["inspect", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "No lock guards the index: its writer is whichever process serves the home" in out
    assert "refuses to write when a daemon answers" in out


# ---------------------------------------------------------------- through a real daemon
@pytest.fixture
def daemon(real):
    from kvshare.remote.server import Daemon

    cache, entries, argv = real
    import dataclasses

    config = dataclasses.replace(cache.config, metrics_port=0)
    running = Daemon(config)
    running.start()
    assert running.wait_reconciled(timeout=60)
    yield running, cache, entries, ["--config", str(cache.config_path), "inspect", "--daemon",
                                    config.daemon_endpoint]
    running.close()


def test_every_view_through_a_real_daemon(daemon, capsys, tokenizer):
    running, cache, entries, argv = daemon
    stats = inspect_json(capsys, argv, "stats")
    assert stats["entries"] == 4 and list(stats["tiers"]) == ["cpu", "disk"]
    assert stats["tenants"]["globex"] == inspect_json(
        capsys, argv[:-2], "--home", str(cache.config.home_dir), "stats")["tenants"]["globex"]
    globex = entries["globex"][0]
    assert inspect_json(capsys, argv, "show", globex.entry_id)["token_ids"] == (
        globex.token_ids.tolist())
    assert len(inspect_json(capsys, argv, "list", "--scope", "acme")) == 2
    plan = inspect_json(capsys, argv, "plan", INVOICE, "--tenant", "acme")
    assert plan["planned_reuse_tokens"] == len(tokenizer(INVOICE, add_special_tokens=False)
                                               ["input_ids"]) - 1
    evicted = inspect_json(capsys, argv, "evict", entries["acme"][0].entry_id)
    assert evicted["chunks_shared"] == shared(entries)
    assert evicted["deleted_by_tier"]["disk"] == len(entries["acme"][1]) - shared(entries)
    purged = inspect_json(capsys, argv, "purge", "--tenant", "acme", "--yes")
    assert purged["evicted"] == [entries["acme_edit"][0].entry_id]
    truncated = cache.chunk_file(entries["globex"][1][0])
    truncated.write_bytes(truncated.read_bytes()[:-7])
    summary = inspect_json(capsys, argv, "verify", "--page-chunks", "3")
    assert [d["key"] for d in summary["damaged"]] == [truncated.stem]
    assert summary["removed"] == [globex.entry_id]
    assert [e.entry_id for e in running.catalog.index.entries()] == [
        entries["public"][0].entry_id]
    with pytest.raises(SystemExit, match="no entry 'nope'"):
        main([*argv, "show", "nope"])


def test_an_absent_daemon_is_named(tmp_path, capsys):
    sock = tmp_path / "daemon.sock"
    with pytest.raises(SystemExit, match=f"daemon at ipc://{sock} did not answer"):
        main(["inspect", "--daemon", f"ipc://{sock}", "--timeout-ms", "200", "stats"])
