"""Two real vLLM servers (``kvshare serve``, CPU) on one ``kvshare daemon``.

The module starts a daemon subprocess and two servers in ``mode: remote`` on it, as users
run them (one command each), once: about two minutes of both cores. The tests run in
file order; the last one kills the daemon (SIGKILL, mid-stream) and starts it again.
"""

from __future__ import annotations

import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from remote_helpers import DaemonProcess, daemon_config, wait_until_up
from serving import Server, free_port, manifest, start_server

from kvshare.model_assets import SMOLLM2_ALIAS
from kvshare.remote.client import DaemonClient

pytestmark = pytest.mark.engine

MAX_TOKENS = 4


def complete(server: Server, prompt: str, tenant: str) -> dict:
    return server.post("/v1/completions", {
        "model": SMOLLM2_ALIAS, "prompt": prompt, "max_tokens": MAX_TOKENS,
        "temperature": 0.0, "cache_salt": tenant})


def report(response: dict) -> dict | None:
    return (response.get("kv_transfer_params") or {}).get("kvshare")


def reused(response: dict) -> int:
    found = report(response)
    return 0 if found is None else found.get("reused", 0)


def answer(response: dict) -> str:
    return response["choices"][0]["text"]


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a Prometheus text page, parsed by prometheus_client's parser."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(page: dict, name: str, **labels: str) -> float:
    return sum(value for (sample, sample_labels), value in page.items()
               if sample == name and set(labels.items()) <= set(sample_labels))


class Fleet:
    """The daemon and the two servers of this module."""

    def __init__(self, tmp_path_factory) -> None:
        self.metrics_port = free_port()
        self.daemon_home = tmp_path_factory.mktemp("daemon-home")
        self.config = daemon_config(self.daemon_home, metrics_port=self.metrics_port,
                                    cpu_bytes=256 << 20, disk_bytes=2 << 30)
        self.daemon = DaemonProcess(self.config, self.daemon_home / "daemon.yaml").start()
        self.client = DaemonClient.from_config(self.config)
        wait_until_up(self.client)
        self.servers = [self._start_server(tmp_path_factory, name) for name in ("a", "b")]
        for server in self.servers:
            server.wait_ready()

    def _start_server(self, tmp_path_factory, name: str) -> Server:
        args = ["serve", SMOLLM2_ALIAS, "--port", str(free_port()), "--host", "127.0.0.1",
                "--enforce-eager", "--max-model-len", "2048",
                "--kv-cache-memory-bytes", str(256 << 20),
                "--kvshare-set", "mode=remote",
                "--kvshare-set", f"daemon_address={self.config.daemon_endpoint}",
                "--kvshare-set", "share_public_scope=false"]
        return start_server(args, tmp_path_factory.mktemp(f"server-{name}"))

    def daemon_metrics(self) -> dict:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as response:
            return samples(response.read().decode())

    def entries_of(self, tenant: str) -> int:
        partitions = self.client.stats().index["partitions"]
        return sum(p["entries"] for name, p in partitions.items()
                   if name.rsplit("/", 1)[1] == tenant)

    def wait_for_entries(self, tenant: str, count: int, timeout_s: float = 120.0) -> None:
        """Until the daemon indexes ``count`` entries of ``tenant``: an engine answers a
        request before its prompt's chunks are written and committed, and only then can
        another engine find it (the first engine finds it at once, as in flight)."""
        deadline = time.monotonic() + timeout_s
        while self.entries_of(tenant) < count:
            assert time.monotonic() < deadline, f"{tenant} has no {count} entries in time"
            time.sleep(0.05)  # polling a condition with a deadline, not synchronising

    def restart_daemon(self) -> None:
        self.daemon = DaemonProcess(self.config, self.daemon_home / "daemon.yaml").start()
        wait_until_up(self.client)

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        self.client.close()
        if self.daemon.proc.poll() is None:
            self.daemon.terminate()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    started = Fleet(tmp_path_factory)
    yield started
    started.close()


def test_a_prompt_prefilled_on_one_engine_is_reused_on_the_other(fleet):
    a, b = fleet.servers
    before = fleet.daemon_metrics()
    assert report(complete(a, manifest("Ingrid Dahl", 0), "acme")) is None
    fleet.wait_for_entries("acme", 1)
    on_b = complete(b, manifest("Tomas Berg", 900), "acme")
    assert reused(on_b) > 300 and not report(on_b)["fallback"], report(on_b)
    after = fleet.daemon_metrics()
    # The daemon's counters moved with what the engines did.
    assert (total(after, "kvshare_lookups_total", tenant="acme", outcome="hit")
            > total(before, "kvshare_lookups_total", tenant="acme", outcome="hit"))
    assert (total(after, "kvshare_reused_tokens_total", tenant="acme")
            - total(before, "kvshare_reused_tokens_total", tenant="acme")) == reused(on_b)
    assert total(after, "kvshare_index_entries") >= 1


def test_vllm_metrics_count_the_connectors_reuse(fleet):
    _, b = fleet.servers
    page = samples(b.get_text("/metrics"))
    assert total(page, "vllm:kvshare_reused_tokens_total") > 0


def test_another_tenant_never_receives_the_kv_across_engines(fleet):
    a, b = fleet.servers
    complete(a, manifest("Aiko Sato", 0), "initech")
    fleet.wait_for_entries("initech", 1)
    assert report(complete(b, manifest("Rafael Lima", -700), "globex")) is None
    assert reused(complete(b, manifest("Rafael Lima", -700), "initech")) > 300


def test_the_daemon_killed_mid_stream_leaves_both_engines_serving_full_compute(fleet):
    """SIGKILL while both engines serve a stream: every request is answered; those not
    filled from reused KV answer exactly as full compute (a tenant with nothing to reuse)
    does; after a restart the engines reuse again, chunks from the daemon's disk tier."""
    a, b = fleet.servers
    complete(a, manifest("Lena Vogel", 0), "hooli")
    fleet.wait_for_entries("hooli", 1)
    prompts = [(server, manifest(f"Sender {i}", 50 * i), "hooli")
               for i in range(6) for server in (a, b)]
    answers: list[dict | None] = [None] * len(prompts)
    first_answered = threading.Event()

    def stream() -> None:
        for i, (server, prompt, tenant) in enumerate(prompts):
            answers[i] = complete(server, prompt, tenant)
            first_answered.set()

    sender = threading.Thread(target=stream)
    sender.start()
    assert first_answered.wait(timeout=300)
    fleet.daemon.kill()
    sender.join(timeout=600)
    assert not sender.is_alive() and all(answers), "a request was not answered"
    for (server, prompt, _), served in zip(prompts, answers):
        if report(served) is None:
            assert answer(served) == answer(complete(server, prompt, "fresh-tenant"))
    # Down: nothing is claimed, and vLLM answers as full compute.
    down = complete(b, manifest("Nora Quist", 300), "hooli")
    assert report(down) is None
    assert answer(down) == answer(complete(b, manifest("Nora Quist", 300), "fresh-2"))

    fleet.restart_daemon()
    # Each engine reconnects on its own within ZeroMQ's reconnect interval: a request
    # that raced it claims nothing, so a few similar prompts are given the chance.
    again = [complete(server, manifest(f"Olaf Lund {i}", 600), "hooli")
             for i in range(3) for server in (a, b)]
    assert max(map(reused, again)) > 300, [report(r) for r in again]
    assert all(server.healthy() for server in fleet.servers)
