"""A private ``redis-server`` subprocess on a free 127.0.0.1 port.

Used by the tests and ``kvshare bench storage`` so that neither needs a server set up
beforehand. Nothing is persisted (``--save ""``, ``--appendonly no``): a killed server
comes back empty, exactly like a flushed cache.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """Start, kill and restart one redis-server; the port stays the same across restarts.

    Args:
        maxmemory_bytes: Redis ``maxmemory`` (0 = unlimited); evicts ``allkeys-lru``.
        executable: path or name of ``redis-server``.
    """

    def __init__(self, maxmemory_bytes: int = 0, executable: str = "redis-server") -> None:
        found = shutil.which(executable)
        if found is None:
            raise FileNotFoundError(
                f"{executable!r} not found; install it (Debian: apt-get install redis-server)")
        self.executable = found
        self.maxmemory_bytes = maxmemory_bytes
        self.port = free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="kvshare-redis-"))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        """Start the server and return once it answers PING (or raise naming why not)."""
        if self.running:
            return self
        log = self._dir / "redis.log"
        self._proc = subprocess.Popen(
            [self.executable, "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self._dir),
             "--logfile", str(log), "--maxmemory", str(self.maxmemory_bytes),
             "--maxmemory-policy", "allkeys-lru"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        self._wait_for_ping(timeout_s, log)
        return self

    def _wait_for_ping(self, timeout_s: float, log: Path) -> None:
        assert self._proc is not None
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.2,
                             socket_timeout=0.5, retry=Retry(NoBackoff(), 0))
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if self._proc.poll() is not None:
                    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                    raise RuntimeError(
                        f"redis-server on port {self.port} exited with "
                        f"{self._proc.returncode}:\n{tail}")
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    self.kill()
                    raise TimeoutError(f"redis-server on port {self.port} did not answer PING "
                                       f"within {timeout_s} s")
                try:  # pause between attempts, ending early if the server dies
                    self._proc.wait(timeout=0.005)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL, as a crash would; the port is reused by the next ``start``."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def close(self) -> None:
        """Kill the server and remove its directory."""
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
