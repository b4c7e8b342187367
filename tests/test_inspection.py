"""``kvshare inspect``: index views, and plans keyed and claimed as the connector does."""

from __future__ import annotations

import json
import re

import pytest
import yaml

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
    assert "    40 exact  depth 1" in capsys.readouterr().out


def test_plan_of_the_stored_prompt_claims_all_but_the_tail(setup, capsys):
    config_path, _, tokens = setup
    config = KVShareConfig()
    plan = run_json(capsys, config_path, "plan", PROMPT, "--tenant", "acme")
    assert plan["num_tokens"] == len(tokens)
    assert plan["planned_reuse_tokens"] == len(tokens) - 1  # the last token is computed
    claimed = len(tokens) - 1 - config.recompute_tail_tokens  # vLLM prefills the tail
    assert plan["claim_tokens"] == plan["claim_planned_reuse"] == claimed
    assert plan["claim_expected_reused"] == claimed - round(config.rho * claimed)


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
        main(["inspect", "--index-dir", str(tmp_path / "nowhere"), "stats"])
