"""``kvshare serve``: argument handling, then the README's command end to end over HTTP.

The engine tests start the server with the command README.md shows (the fenced block
after :data:`README_MARKER`, parsed here so that the two cannot drift apart), changed
only in what a test must change: ``--port`` becomes a free port, ``--host 127.0.0.1``
keeps the server off other interfaces, ``KVSHARE_HOME`` is a fresh directory (whose
``models/`` links to this machine's converted SmolLM2, which is not converted again), and
``--enforce-eager`` (:data:`TEST_ONLY_ARGS`) skips vLLM's compilation: vLLM keys its
compile cache by the model path, which is new in every test home, so the compiled mode
users run would compile again at each run (about 3 minutes of both cores) and leave one
more cache entry in ~/.cache/vllm, while kvshare's lookup, fill, report and tenant
scoping are the same in both modes.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
from pathlib import Path
from typing import Any

import pytest
from serving import STOP_DEADLINE_S, Server, free_port, manifest, start_server

from kvshare import serve
from kvshare.cli import main
from kvshare.config import CONFIG_ENV
from kvshare.model_assets import SMOLLM2_ALIAS

README = Path(__file__).resolve().parents[1] / "README.md"
README_MARKER = "<!-- kvshare serve command: tests/test_serve.py starts exactly this -->"
TEST_ONLY_ARGS = ["--host", "127.0.0.1", "--enforce-eager"]
"""Added to the README's command; see the module docstring."""


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kvshare serve")
    serve.add_arguments(parser)
    args = parser.parse_args(argv)
    args.config = None  # kvshare's global --config
    return args


# ---------------------------------------------------------------- arguments (no engine)
def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["serve", "--help"])
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    assert "kvshare serve smollm2-135m-instruct --port 8000" in out
    assert "cache_salt" in out and "--kvshare-set" in out


def test_vllm_arguments_pass_through_in_order_around_kvshare_options():
    args = parse([SMOLLM2_ALIAS, "--port", "8123", "--kvshare-set", "rho=0.25",
                  "--max_model_len=2048", "--kvshare-set", "check_layers=1,2", "--seed", "-1",
                  "--enforce-eager"])
    options, command = serve.resolve_setup(args, {"VLLM_CPU_NUM_OF_RESERVED_CPU": "2"})
    argv = command.argv
    assert argv[argv.index("--model") + 1].endswith(SMOLLM2_ALIAS)
    assert argv[argv.index("--served-model-name") + 1] == SMOLLM2_ALIAS
    assert argv[-6:] == ["--port", "8123", "--max_model_len=2048", "--seed", "-1",
                         "--enforce-eager"]
    assert argv[argv.index("--shutdown-timeout") + 1] == str(serve.SHUTDOWN_TIMEOUT_S)
    transfer = json.loads(argv[argv.index("--kv-transfer-config") + 1])
    assert transfer["kv_connector_module_path"] == "kvshare.connector"
    assert transfer["kv_load_failure_policy"] == "recompute"
    assert transfer["kv_connector_extra_config"] == {"rho": 0.25, "check_layers": [1, 2]}
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in command.env  # the caller's 2 is kept
    assert options.no_warmup is False
    assert shlex.split(command.shell_line())[-len(argv):] == argv


def test_defaults_only_where_the_user_set_nothing(tmp_path):
    model = tmp_path / "model"
    plain = serve.build_command(model, None, [], {}, {}, has_cuda=False)
    assert plain.argv[plain.argv.index("--gpu-memory-utilization") + 1] == "0.3"
    assert plain.env == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}
    mine = serve.build_command(model, None, ["--gpu_memory_utilization=0.5",
                                             "--shutdown-timeout", "60"], {},
                               {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}, has_cuda=False)
    assert mine.argv.count("--gpu-memory-utilization") == 0 and mine.env == {}
    assert mine.argv.count("--shutdown-timeout") == 1
    cuda = serve.build_command(model, None, [], {}, {}, has_cuda=True)
    assert "--gpu-memory-utilization" not in cuda.argv and cuda.env == {}


def test_config_file_reaches_the_connector_and_is_checked_first(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("top_k: 4\n")
    _, command = serve.resolve_setup(parse(["--kvshare-config", str(good), SMOLLM2_ALIAS]), {})
    assert command.env[CONFIG_ENV] == str(good)
    bad = tmp_path / "bad.yaml"
    bad.write_text("top_kk: 4\n")
    with pytest.raises(SystemExit, match="'top_kk'"):
        main(["serve", SMOLLM2_ALIAS, "--kvshare-config", str(bad)])


@pytest.mark.parametrize(("argv", "named"), [
    ([SMOLLM2_ALIAS, "--kvshare-set", "rhoo=0.2"], "'rhoo'"),
    ([SMOLLM2_ALIAS, "--kvshare-set", "rho=2"], "rho=2.0"),
    ([SMOLLM2_ALIAS, "--kvshare-set", "rho"], "'rho' is not KEY=VALUE"),
    ([SMOLLM2_ALIAS, "--kv-transfer-config", "{}"], "--kv-transfer-config is set by kvshare"),
    ([SMOLLM2_ALIAS, "--model", "x"], "--model is set by kvshare"),
    (["/no/such/model"], "'/no/such/model'"),
])
def test_bad_input_stops_before_vllm_and_names_the_value(argv, named):
    with pytest.raises(SystemExit, match=named):
        main(["serve", *argv])


# ---------------------------------------------------------------- the server (engine)
def readme_serve_command() -> list[str]:
    """The command in the fenced block after the README's marker, as argv."""
    text = README.read_text()
    assert README_MARKER in text, f"README.md lost the marker {README_MARKER!r}"
    block = text.split(README_MARKER, 1)[1].split("```", 2)[1]
    body = block.split("\n", 1)[1].replace("\\\n", " ")
    return shlex.split(body)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    command = readme_serve_command()
    assert command[:2] == ["kvshare", "serve"] and "--port" in command, command
    args = list(command[1:])  # after "kvshare"
    args[args.index("--port") + 1] = str(free_port())
    running = start_server(args + TEST_ONLY_ARGS, tmp_path_factory.mktemp("serve-home"))
    running.wait_ready()
    yield running
    running.stop()


def chat(server: Server, content: str, tenant: str) -> dict[str, Any]:
    return server.post("/v1/chat/completions", {
        "model": SMOLLM2_ALIAS, "messages": [{"role": "user", "content": content}],
        "max_tokens": 4, "temperature": 0.0, "cache_salt": tenant})


def complete(server: Server, prompt: str, tenant: str) -> dict[str, Any]:
    return server.post("/v1/completions", {
        "model": SMOLLM2_ALIAS, "prompt": prompt, "max_tokens": 4, "temperature": 0.0,
        "cache_salt": tenant})


def kvshare_report(response: dict[str, Any]) -> dict[str, Any] | None:
    return (response.get("kv_transfer_params") or {}).get("kvshare")


def assert_reused(response: dict[str, Any]) -> None:
    report = kvshare_report(response)
    assert report is not None, f"not claimed: {response.get('kv_transfer_params')}"
    assert report["claimed"] > 0, report
    assert "reused" in report, f"the load report has no 'reused' field: {report}"
    assert report["reused"] > 0 and not report["fallback"], report
    # The load report's quality fields travel over HTTP too.
    assert report["gate"] == "open" and isinstance(report["shadow"], bool), report
    assert "source_depth" in report, report


@pytest.mark.engine
def test_start_up_prints_the_command_and_warms_the_fill(server):
    output = server.output()
    line = next(line for line in output.splitlines() if serve.SERVER_MODULE in line)
    argv = shlex.split(line)
    transfer = json.loads(argv[argv.index("--kv-transfer-config") + 1])
    assert transfer["kv_connector"] == "KVShareConnector"
    warmup = next(line for line in output.splitlines() if "warm-up:" in line)
    assert "kvshare filled" in warmup, warmup


@pytest.mark.engine
def test_a_tenant_reuses_only_its_own_similar_prompts_chat(server):
    first, similar = manifest("Ingrid Dahl", 0), manifest("Tomas Berg", 900)
    assert kvshare_report(chat(server, first, "acme")) is None  # nothing to reuse yet
    other = chat(server, similar, "globex")
    assert other["usage"]["prompt_tokens"] >= 600
    assert kvshare_report(other) is None, "globex reused acme's KV"
    # The same prompt in acme is claimed: acme's entry was there, globex may not see it.
    assert_reused(chat(server, similar, "acme"))


@pytest.mark.engine
def test_completions_report_reuse_of_a_similar_prompt(server):
    complete(server, manifest("Aiko Sato", 0), "initech")
    assert_reused(complete(server, manifest("Rafael Lima", -700), "initech"))


@pytest.mark.engine
def test_sigterm_stops_everything_after_writing_the_index(server, capsys):
    """Last in this module: it stops the shared server.

    A prompt answered just before SIGTERM is in the index afterwards: the engine shuts
    down in order (with vLLM's default ``--shutdown-timeout 0`` it is killed at once and
    the last entries are lost)."""
    complete(server, manifest("Lena Vogel", 0), "hooli")
    group = server.vllm_group()
    assert serve.live_group_members(group), "vLLM's process group is already empty"
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=STOP_DEADLINE_S) == 0
    output = server.output()
    assert "kvshare serve: stopping vLLM" in output
    assert "force killing" not in output  # vLLM's words when it kills EngineCore
    assert serve.live_group_members(group) == []
    assert main(["inspect", "--index-dir", str(server.home / "index"), "--json", "stats"]) == 0
    scopes = {key.rsplit("/", 1)[1] for key in json.loads(capsys.readouterr().out)["partitions"]}
    assert {"hooli", "acme", "globex", serve.WARMUP_TENANT} <= scopes
