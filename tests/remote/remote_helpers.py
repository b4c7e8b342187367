"""Helpers of the daemon tests: configs, entries, a daemon subprocess (imported by name)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from kvshare.config import KVShareConfig
from kvshare.remote.client import DaemonClient, DaemonUnavailable
from kvshare.storage.chunk import KVLayout
from kvshare.storage.index import IndexEntry, new_entry_id
from kvshare.storage.keys import chunk_keys

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "storage"))  # kv_samples

SMOLLM2 = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype=torch.bfloat16)
MODEL = "test-model"

FAST_TIMEOUT_MS = 500
"""Client timeout for calls expected to fail (a daemon down, a refused client)."""


def daemon_config(home: Path, **overrides) -> KVShareConfig:
    values = {"home": str(home), "metrics_port": 0, "cpu_bytes": 64 << 20,
              "disk_bytes": 256 << 20, "daemon_timeout_ms": 10_000, **overrides}
    return KVShareConfig(**values)


def wait_until_up(client: DaemonClient, timeout_s: float = 90.0) -> None:
    """Poll the daemon with pings until it answers (raises past the deadline)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping(timeout_ms=250)
            return
        except DaemonUnavailable:
            if time.monotonic() > deadline:
                raise


def entry_for(embedder, text: str, ids: list[int], scope: str = "") -> IndexEntry:
    """The entry the connector would index for this prompt (chunk keys included)."""
    entry_id = new_entry_id()
    keys = chunk_keys(MODEL, ids, 256, scope=scope, variant=entry_id)
    return IndexEntry(entry_id, MODEL, scope, embedder.embed([text])[0], ids, text,
                      [key.hex() for key in keys])


def edited(text: str) -> str:
    """A near-duplicate: one word in the middle swapped."""
    words = text.split(" ")
    words[len(words) // 2] = "Berlin"
    return " ".join(words)


class DaemonProcess:
    """``python -m kvshare.cli daemon --config FILE`` with a config written for it."""

    def __init__(self, config: KVShareConfig, config_path: Path) -> None:
        config_path.write_text(yaml.safe_dump(config.to_dict()))
        self.config = config
        self.config_path = config_path
        self.log = config_path.with_suffix(".log")
        self.proc: subprocess.Popen | None = None

    def start(self) -> DaemonProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVSHARE_")}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kvshare.cli", "daemon", "--config",
                 str(self.config_path)], stdout=log, stderr=subprocess.STDOUT, env=env)
        return self

    def terminate(self, timeout_s: float = 60.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
