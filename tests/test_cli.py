"""The kvshare command line: help for every command, inspection views as JSON."""

from __future__ import annotations

import json

import pytest

from kvshare.cli import main
from kvshare.matching.matcher import Matcher
from kvshare.storage.index import EntryIndex

PROMPT = "Translate the following invoice into French and keep the totals unchanged: " * 3


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--help"], "bench"),
        (["bench", "hitrate", "--help"], "--requests"),
        (["bench", "lookup", "--help"], "--entries"),
        (["inspect", "--help"], "plan"),
        (["demo", "--help"], "--pairs"),
    ],
)
def test_every_command_has_help(argv, expected, capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    assert excinfo.value.code == 0
    assert expected in capsys.readouterr().out


@pytest.fixture
def index_dir(tmp_path, wordllama, tokenizer):
    index = EntryIndex(tmp_path / "index", wordllama.dim)
    matcher = Matcher(index, wordllama, model_id="smollm2-135m-instruct")
    tokens = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    stored = matcher.insert(PROMPT, tokens, tenant="acme")
    index.close()
    return tmp_path / "index", stored, len(tokens)


def run_json(capsys, *argv) -> object:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_views_as_json(index_dir, capsys):
    path, stored, num_tokens = index_dir
    stats = run_json(capsys, "inspect", "--index-dir", str(path), "--json", "stats")
    assert stats["entries"] == 1 and stats["tokens"] == num_tokens
    listing = run_json(capsys, "inspect", "--index-dir", str(path), "--json", "list")
    assert [row["entry_id"] for row in listing] == [stored.entry_id]
    shown = run_json(capsys, "inspect", "--index-dir", str(path), "--json", "show", stored.entry_id)
    assert shown["token_ids"] == stored.token_ids.tolist()
    plan = run_json(capsys, "inspect", "--index-dir", str(path), "--json", "plan", PROMPT,
                    "--tenant", "acme")
    assert plan["reused_tokens"] == num_tokens - 1
    other = run_json(capsys, "inspect", "--index-dir", str(path), "--json", "plan", PROMPT,
                     "--tenant", "globex")
    assert other["reused_tokens"] == 0


def test_inspect_errors_name_the_missing_thing(index_dir, tmp_path):
    path, _, _ = index_dir
    with pytest.raises(SystemExit, match="no-such-entry"):
        main(["inspect", "--index-dir", str(path), "show", "no-such-entry"])
    with pytest.raises(SystemExit, match="no kvshare index at"):
        main(["inspect", "--index-dir", str(tmp_path / "nowhere"), "stats"])
