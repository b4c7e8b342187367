"""What the daemon promises tenants and operators, through its real sockets: its config's
tenancy policy and quotas hold for every connector, and TCP traffic is encrypted."""

from __future__ import annotations

import socket
import threading

from remote_helpers import MODEL, SMOLLM2, daemon_config, edited, entry_for, wait_until_up

from kvshare.remote.client import DaemonClient, RemoteCatalog
from kvshare.remote.server import Daemon
from kvshare.storage.redis_server import free_port


def token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_the_daemon_applies_its_tenancy_and_quotas_to_every_connector(tmp_path, prompts,
                                                                       tokenizer):
    (text, ids), (other_text, other_ids) = prompts[0], prompts[1]
    config = daemon_config(tmp_path / "home", tenancy="groups",
                           tenant_groups={"partners": ["acme", "initech"]},
                           share_public_scope=False,
                           tenant_quota_bytes=(len(ids) + len(other_ids) - 1)
                           * SMOLLM2.bytes_per_token())
    served = Daemon(config)
    served.start()
    try:
        catalog = RemoteCatalog.connect(config)
        wait_until_up(catalog.client)
        first = entry_for(served.catalog.embedder, text, ids, scope="acme")
        catalog.commit([first], SMOLLM2.bytes_per_token())
        query = edited(text)
        reused = {tenant: catalog.lookup(MODEL, query, token_ids(tokenizer, query), tenant)
                  .plan.reused_tokens for tenant in ("acme", "initech", "globex")}
        assert reused["acme"] > 0 and reused["initech"] > 0 and reused["globex"] == 0
        # acme's second prompt takes it over its quota: its older entry goes, globex's stays.
        kept = entry_for(served.catalog.embedder, other_text, other_ids, scope="globex")
        catalog.commit([kept], SMOLLM2.bytes_per_token())
        second = entry_for(served.catalog.embedder, other_text, other_ids, scope="acme")
        catalog.commit([second], SMOLLM2.bytes_per_token())
        held = {entry.entry_id for entry in served.catalog.index.entries()}
        assert first.entry_id not in held and {second.entry_id, kept.entry_id} <= held
        catalog.close()
    finally:
        served.close()


class RecordingProxy:
    """A TCP relay between a client and the daemon that keeps every byte it relays."""

    def __init__(self, target_port: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target_port = target_port
        self.seen = bytearray()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                with self._lock:
                    self.seen += data
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


def test_tcp_traffic_is_encrypted(tmp_path, prompts, tokenizer):
    """A lookup's prompt and a stored entry's text cross the wire; neither appears in it."""
    port = free_port()
    secret = "correct horse battery staple"
    config = daemon_config(tmp_path / "home", daemon_address=f"tcp://127.0.0.1:{port}",
                           daemon_secret=secret)
    served = Daemon(config)
    served.start()
    proxy = RecordingProxy(port)
    try:
        client = DaemonClient(f"tcp://127.0.0.1:{proxy.port}", secret=secret,
                              timeout_ms=10_000)
        wait_until_up(client)
        catalog = RemoteCatalog(client)
        text, ids = prompts[2]
        entry = entry_for(served.catalog.embedder, text, ids, scope="acme")
        catalog.commit([entry], SMOLLM2.bytes_per_token())
        secret_words = "Zanzibar quartermaster ledger 4471"
        query = f"{secret_words} {text}"
        result = catalog.lookup(MODEL, query, token_ids(tokenizer, query), "acme")
        assert result.hits and result.hits[0].entry.text_preview == entry.text_preview
        client.close()
        seen = bytes(proxy.seen)
        assert len(seen) > 1000  # the calls did go through the relay
        assert secret_words.encode() not in seen
        assert entry.text_preview[:40].encode() not in seen
        assert entry.entry_id.encode() not in seen
    finally:
        proxy.close()
        served.close()
