"""The kvshare command line: help for every command (inspect's views: test_inspection.py)."""

from __future__ import annotations

import pytest

from kvshare.cli import main


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--help"], "bench"),
        (["bench", "hitrate", "--help"], "--requests"),
        (["bench", "lookup", "--help"], "--entries"),
        (["inspect", "--help"], "plan"),
        (["demo", "--help"], "--pairs"),
        (["bench", "gpu", "--help"], "--tokens"),
    ],
)
def test_every_command_has_help(argv, expected, capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    assert excinfo.value.code == 0
    assert expected in capsys.readouterr().out


def test_a_missing_bench_package_names_the_extra(monkeypatch):
    import kvshare.bench.hitrate as hitrate

    def run(args):
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")

    monkeypatch.setattr(hitrate, "run", run)
    with pytest.raises(SystemExit, match=r"'matplotlib' from the bench extra.*kvshare\[bench\]"):
        main(["bench", "hitrate"])
