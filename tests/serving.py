"""``kvshare serve`` in a subprocess, for tests: start it, wait until it is ready, talk
HTTP to it, stop it. Each server gets its own ``KVSHARE_HOME`` whose ``models/`` links to
this machine's converted SmolLM2 (which is not converted again)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvshare import serve
from kvshare.config import CONFIG_ENV
from kvshare.model_assets import SMOLLM2_ALIAS

START_DEADLINE_S = 900.0
"""vLLM start (model load, compilation), /health and the warm-up, on 2 busy CPU cores."""
STOP_DEADLINE_S = 2 * (serve.SHUTDOWN_TIMEOUT_S + serve.STOP_MARGIN_S)


@dataclass
class Server:
    process: subprocess.Popen
    base_url: str
    home: Path
    """``KVSHARE_HOME`` of the server: its index is ``home / "index"``."""
    log: Path

    def post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(self.base_url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.loads(response.read())

    def get_text(self, path: str) -> str:
        with urllib.request.urlopen(self.base_url + path, timeout=30) as response:
            return response.read().decode()

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def vllm_group(self) -> int:
        line = next(line for line in self.output().splitlines() if "process group" in line)
        return int(line.rsplit("process group ", 1)[1].rstrip(")"))

    def wait_ready(self) -> None:
        """Until "ready" (after the warm-up, whose requests would otherwise share the
        engine with the test's) and healthy; fails if the server exits or is late."""
        deadline = time.monotonic() + START_DEADLINE_S
        while not ("kvshare serve: ready on" in self.output() and self.healthy()):
            assert self.process.poll() is None, f"kvshare serve exited:\n{self.output()[-4000:]}"
            assert time.monotonic() < deadline, f"not ready in time:\n{self.output()[-4000:]}"
            time.sleep(1.0)  # polling a condition with a deadline, not synchronising

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            return self.process.wait(timeout=STOP_DEADLINE_S)
        return self.process.returncode


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: list[str], home: Path, env: dict[str, str] | None = None) -> Server:
    """``kvshare ARGS`` (``args`` after "kvshare", with ``--port``) in ``home``, niced."""
    from kvshare.model_assets import resolve_model_dir

    port = args[args.index("--port") + 1]
    (home / "models").mkdir(parents=True, exist_ok=True)
    link = home / "models" / SMOLLM2_ALIAS
    if not link.exists():
        link.symlink_to(resolve_model_dir(SMOLLM2_ALIAS))
    full_env = {**os.environ, "KVSHARE_HOME": str(home), **(env or {})}
    full_env.pop(CONFIG_ENV, None)
    log = home / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen(["nice", "-n", "10", sys.executable, "-m", "kvshare.cli",
                                    *args], stdout=out, stderr=subprocess.STDOUT, env=full_env,
                                   start_new_session=True)
    return Server(process, f"http://127.0.0.1:{port}", home, log)


def manifest(sender: str, changed_weight: int) -> str:
    """About 800 tokens; two calls differ in the sender (first sentence) and one weight."""
    lines = [f"This is {sender} from the port office. Check the shipping manifest below and "
             "tell me which containers exceed their declared weight."]
    for row in range(32):
        weight = 12000 + 350 * row + (changed_weight if row == 20 else 0)
        lines.append(f"Container C{4100 + row}: declared {weight} kg, measured "
                     f"{weight + 40 * (row % 5) - 60} kg, destination dock {row % 9}.")
    return "\n".join(lines)
