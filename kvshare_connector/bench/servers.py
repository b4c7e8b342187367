"""Real processes for the benchmarks that run vLLM servers on one shared daemon.

``kvshare bench cross-instance`` and ``kvshare bench soak`` start a ``kvshare daemon`` and
``kvshare serve`` engines in ``mode: remote`` as users run them, as subprocesses of the
benchmark. Their environment drops every ``KVSHARE_<KEY>`` variable: what a benchmark
records as their config is what it passed them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kvshare.storage.redis_server import free_port

__all__ = ["DaemonProcess", "Server", "environment", "free_port", "link_model",
           "load_report", "serve_options"]
START_DEADLINE_S = 900.0
"""Seconds a ``kvshare serve`` may take to print that it is ready (compile, warm-up)."""
DAEMON_START_S = 120.0
SERVED_MODEL = "smollm2-135m-instruct"
"""The name ``kvshare serve`` gives the SmolLM2 alias in vLLM's API."""


def environment() -> dict[str, str]:
    """This process's environment without ``KVSHARE_<KEY>`` variables (``KVSHARE_HOME``,
    which locates files, stays)."""
    return {name: value for name, value in os.environ.items()
            if not name.startswith("KVSHARE_") or name == "KVSHARE_HOME"}


class DaemonProcess:
    """A ``kvshare daemon`` subprocess on ``home``, its output in ``log``."""

    def __init__(self, home: Path, address: str, log: Path, config: Path | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.address = address
        self._log = log.open("w")
        command = [sys.executable, "-m", "kvshare.cli", "daemon", "--home", str(home),
                   "--address", address]
        if config is not None:
            command += ["--config", str(config)]
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**environment(), **(env or {})})

    def wait_ready(self, client) -> None:
        """Ping through ``client`` (a :class:`kvshare.remote.client.DaemonClient`) until the
        daemon answers; raises if it exits or does not answer within ``DAEMON_START_S``."""
        from kvshare.remote.client import DaemonUnavailable

        deadline = time.monotonic() + DAEMON_START_S
        while True:
            try:
                client.ping(timeout_ms=500)
                return
            except DaemonUnavailable:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the daemon did not start") from None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=120)
        self._log.close()


class Server:
    """A ``kvshare serve`` subprocess and the requests a benchmark sends it."""

    def __init__(self, name: str, port: int, args: Sequence[str], log: Path) -> None:
        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        with log.open("w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kvshare.cli", "serve", *args, "--port", str(port)],
                stdout=out, stderr=subprocess.STDOUT, env=environment(),
                start_new_session=True)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_DEADLINE_S
        while "kvshare serve: ready on" not in self.log.read_text(errors="replace"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"server {self.name} did not start:\n{tail}")
            time.sleep(1.0)  # polling a condition with a deadline

    def metric(self, name: str) -> float:
        """The value of the first sample of ``name`` on the server's ``/metrics``."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=60) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(name):
                    return float(line.rsplit(" ", 1)[1])
        raise RuntimeError(f"server {self.name} exports no {name}")

    def complete(self, token_ids: Sequence[int], tenant: str, *, max_tokens: int,
                 xargs: Mapping[str, Any] | None = None, timeout_s: float = 600.0,
                 **fields: Any) -> dict[str, Any]:
        """A greedy completion of ``token_ids`` in tenant ``tenant`` (its ``cache_salt``);
        ``xargs`` go to vLLM's ``vllm_xargs``, ``fields`` into the request body."""
        body = {"model": SERVED_MODEL, "prompt": list(token_ids), "max_tokens": max_tokens,
                "temperature": 0.0, "cache_salt": tenant, **fields}
        if xargs:
            body["vllm_xargs"] = dict(xargs)
        request = urllib.request.Request(self.url + "/v1/completions",
                                         data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=120)


def link_model(home: Path, alias: str, model_dir: Path) -> None:
    """Give a fresh kvshare home the converted model, so a server does not convert it again."""
    (home / "models").mkdir(parents=True, exist_ok=True)
    (home / "models" / alias).symlink_to(model_dir)


def serve_options(settings: Mapping[str, Any]) -> list[str]:
    """``--kvshare-set KEY=VALUE`` for each setting."""
    return [arg for key, value in settings.items() for arg in ("--kvshare-set", f"{key}={value}")]


def load_report(response: Mapping[str, Any]) -> dict[str, Any]:
    """The response's kvshare load report; empty when kvshare claimed nothing."""
    return (response.get("kv_transfer_params") or {}).get("kvshare") or {}
