"""Bad input (issue 12): every malformed value, message or prompt gets a clear error that
names it, or a safe path on which nothing is reused.

Covered elsewhere and not repeated here: the config's own parsing errors
(``tests/test_config.py``), the connector's vLLM checks
(``tests/connector/test_config_checks.py``), damaged chunk bytes (``tests/storage``) and
a corrupt payload frame sent to the daemon (``tests/remote/test_daemon.py``). This module
extends them to the daemon's command line, absurd capacities, model architectures,
tenant names, chunks of another model or format version, forged daemon messages, and
edge-case prompts through one real vLLM server.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import zmq

TESTS = Path(__file__).resolve().parents[1]
for helpers in ("", "remote", "storage"):  # serving, remote_helpers, kv_samples (by name)
    sys.path.insert(0, str(TESTS / helpers))

from kv_samples import SMALL, random_kv  # noqa: E402
from remote_helpers import (  # noqa: E402
    MODEL,
    SMOLLM2,
    DaemonProcess,
    daemon_config,
    entry_for,
    wait_until_up,
)

from kvshare.catalog import LocalCatalog  # noqa: E402
from kvshare.config import MAX_INT64, ConfigError, KVShareConfig  # noqa: E402
from kvshare.remote import protocol as wire  # noqa: E402
from kvshare.remote.client import DaemonClient, RemoteCatalog, RemoteStore  # noqa: E402
from kvshare.storage.chunk import split_prompt_kv  # noqa: E402
from kvshare.storage.codec import ChunkCodec  # noqa: E402
from kvshare.storage.commit import fetch_entry_chunks  # noqa: E402
from kvshare.storage.disk_tier import SUFFIX, DiskTier  # noqa: E402
from kvshare.storage.keys import chunk_keys  # noqa: E402
from kvshare.storage.memory_tier import MemoryTier  # noqa: E402
from kvshare.storage.tiered_store import TieredStore  # noqa: E402

REPORT = (
    "Quarterly report for Northwind Traders. Revenue grew 12% to $4.1M while costs fell "
    "3%. The board approved the new warehouse in Lyon and asked the CFO to present the "
    "hiring plan for the logistics team at the next meeting. Summarise the key risks, the "
    "open questions for the auditors and the three decisions the board must take next."
)


# ------------------------------------------------------------------ config and capacities
@pytest.mark.parametrize(("content", "named"), [
    ("top_k: [1\n", "is not valid YAML"),
    ("top_kk: 3\n", "unknown kvshare config key 'top_kk'"),
    ("top_k: many\n", "top_k='many' is not a valid int"),
    ("cpu_bytes: 12 parsecs\n", "cpu_bytes='12 parsecs' is not a valid int"),
])
def test_the_daemon_refuses_a_bad_config_file_naming_it_without_a_traceback(
        tmp_path, content, named):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    done = subprocess.run([sys.executable, "-m", "kvshare.cli", "daemon", "--config", str(path),
                           "--home", str(tmp_path / "home")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert named in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "home" / "daemon.sock").exists()  # it never started


TEN_EB = 10 * 10**18


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("cpu_bytes", -1, "cpu_bytes=-1 is invalid: expected >= 0"),
    ("cpu_bytes", TEN_EB, f"cpu_bytes={TEN_EB} is invalid: expected a 64-bit integer"),
    ("cpu_bytes", 1 << 60, "cpu_bytes=1152921504606846976 is invalid: expected at most this "
                           "host's memory"),
    ("disk_bytes", TEN_EB, f"disk_bytes={TEN_EB} is invalid"),
    ("disk_bytes", "12 parsecs", "disk_bytes='12 parsecs' is not a valid int"),
    ("gpu_bytes", -(1 << 30), "gpu_bytes=-1073741824 is invalid: expected >= 0"),
    ("save_queue_bytes", "1 GiB", "save_queue_bytes='1 GiB' is not a valid int"),
    ("tenant_quota_bytes", -5, "tenant_quota_bytes=-5 is invalid: expected >= 0"),
    ("index_max_entries", 0, "index_max_entries=0 is invalid: expected >= 1"),
    ("chunk_tokens", 0, "chunk_tokens=0 is invalid: expected >= 1"),
    ("daemon_max_message_bytes", 0, "daemon_max_message_bytes=0 is invalid"),
    ("daemon_max_message_bytes", TEN_EB, "daemon_max_message_bytes=10000000000000000000 is "
                                         "invalid"),
])
def test_absurd_capacities_are_errors_naming_the_key(key, value, expected):
    with pytest.raises(ConfigError) as raised:
        KVShareConfig.from_dict({key: value})
    assert expected in str(raised.value)
    with pytest.raises(ConfigError, match=key):  # the same through the environment
        KVShareConfig.load(environ={f"KVSHARE_{key.upper()}": str(value)})


def test_zero_capacities_turn_tiers_off_and_the_largest_integer_is_accepted(tmp_path):
    from kvshare.tiers_setup import build_store

    config = KVShareConfig(home=str(tmp_path), cpu_bytes=0, disk_bytes=0)
    assert build_store(config).tiers == []
    assert KVShareConfig(disk_bytes=MAX_INT64).disk_bytes == MAX_INT64


# ------------------------------------------------------------------ model architecture
def test_an_unsupported_architecture_stops_the_connector_naming_it(tmp_path):
    from vllm.config import ModelConfig

    from kvshare.connector.connector import check_model_architecture
    from kvshare.model_assets import resolve_model_dir

    smollm2 = resolve_model_dir("smollm2-135m-instruct")
    check_model_architecture(ModelConfig(model=str(smollm2)))  # LlamaForCausalLM
    mamba = tmp_path / "mamba"
    mamba.mkdir()
    for path in smollm2.iterdir():
        if path.suffix != ".safetensors":  # vLLM reads the config, not the weights
            shutil.copy(path, mamba / path.name)
    config = json.loads((mamba / "config.json").read_text())
    config.update(architectures=["MambaForCausalLM"], model_type="mamba")
    (mamba / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="MambaForCausalLM.*supports LlamaForCausalLM"):
        check_model_architecture(ModelConfig(model=str(mamba)))


# ------------------------------------------------------------------ tenant names
ODD_TENANTS = [
    "",  # the public scope
    "t" * 10_000,
    "租户-🙂-ünïcødé",
    "a/b",
    "../../etc/passwd",
    "a\x00b",
    "a' OR '1'='1",
    "a",  # a prefix of the injection above
    "%",
    "*",
]


def _sources(catalog: LocalCatalog, tokenizer, text: str, tenant: str) -> set[str]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return set(catalog.lookup(MODEL, text, ids, tenant).plan.source_entries)


def test_odd_tenant_names_see_only_their_own_entries_across_a_restart(
        tmp_path, wordllama, tokenizer):
    config = KVShareConfig(home=str(tmp_path), share_public_scope=False)
    catalog = LocalCatalog(config, embedder=wordllama)
    ids = tokenizer(REPORT, add_special_tokens=False)["input_ids"]
    owned = {tenant: entry_for(wordllama, REPORT, ids, scope=tenant) for tenant in ODD_TENANTS}
    catalog.commit(list(owned.values()), SMOLLM2.bytes_per_token())
    for tenant, entry in owned.items():
        assert _sources(catalog, tokenizer, REPORT, tenant) == {entry.entry_id}, tenant
    catalog.close()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["index"]  # no path per tenant

    reopened = LocalCatalog(config, embedder=wordllama)  # every name round-trips LanceDB
    try:
        assert {e.scope: e.entry_id for e in reopened.index.entries()} == {
            tenant: entry.entry_id for tenant, entry in owned.items()}
        injected = owned["a' OR '1'='1"].entry_id
        reopened.drop([injected])
        assert _sources(reopened, tokenizer, REPORT, "a' OR '1'='1") == set()
        for tenant, entry in owned.items():
            if tenant != "a' OR '1'='1":
                assert _sources(reopened, tokenizer, REPORT, tenant) == {entry.entry_id}
        assert _sources(reopened, tokenizer, REPORT, "a' OR '1'='2") == set()  # nobody's
    finally:
        reopened.close()


def test_odd_tenant_names_never_reach_chunk_paths(tmp_path):
    tier = DiskTier(tmp_path / "chunks", 1 << 30, ChunkCodec("raw"))
    kv = random_kv(SMALL, 40)
    for tenant in ("../../escape", "a/b", "a\x00b", "租户"):
        tier.put(split_prompt_kv(MODEL, kv, list(range(40)), 16, scope=tenant))
    files = sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*") if path.is_file())
    assert len(files) == 4 * 3
    assert all(path.parent == Path("chunks") and path.suffix == ".kvc"
               and len(path.stem) == 32 for path in files)
    tier.close()


# ------------------------------------------------------------------ foreign chunks
@pytest.fixture
def store(tmp_path) -> Iterator[TieredStore]:
    tiered = TieredStore([MemoryTier.cpu(64 << 20),
                          DiskTier(tmp_path / "chunks", 64 << 20, ChunkCodec("zstd-byteplane"))])
    yield tiered
    tiered.close()


TOKENS = list(range(100, 140))


def _chunk_file(root: Path, key: bytes) -> Path:
    """Where the disk tier keeps a chunk (its documented layout)."""
    return root / f"{key.hex()}{SUFFIX}"


def test_a_chunk_of_another_model_is_never_served(store, tmp_path):
    kv = random_kv(SMALL, len(TOKENS))
    other = split_prompt_kv("other-model", kv, TOKENS, 16, scope="")
    assert store.put(other) == [True] * 3
    ours = chunk_keys(MODEL, TOKENS, 16, scope="")
    assert store.get(ours) == [None] * 3  # same tokens, same layout, another model: a miss
    assert fetch_entry_chunks(store, ours, TOKENS, 16, SMALL) == {}  # all recomputed
    # Its file put under our key (a copied or renamed disk tier) is refused too.
    root = store.tiers[1].root
    shutil.copy(_chunk_file(root, other[0].key), _chunk_file(root, ours[0]))
    reopened = DiskTier(root, 64 << 20, ChunkCodec("zstd-byteplane"))
    assert reopened.contains([ours[0]]) == [True]  # the file is there ...
    assert reopened.get([ours[0]]) == [None]  # ... and never served


def test_a_chunk_of_another_format_version_is_refused_and_recomputed(store):
    chunks = split_prompt_kv(MODEL, random_kv(SMALL, len(TOKENS)), TOKENS, 16, scope="")
    disk = store.tiers[1]
    assert disk.put(chunks) == [True] * 3
    path = _chunk_file(disk.root, chunks[1].key)
    data = bytearray(path.read_bytes())
    assert data[:4] == b"KVSC"
    data[4:6] = (int.from_bytes(data[4:6], "little") + 1).to_bytes(2, "little")
    path.write_bytes(bytes(data))
    fetched = fetch_entry_chunks(TieredStore([disk]), [c.key for c in chunks], TOKENS, 16, SMALL)
    assert sorted(fetched) == [0, 2]  # chunk 1's tokens are recomputed
    assert not path.exists()  # the unreadable file is dropped, not read again


# ------------------------------------------------------------------ forged daemon messages
@pytest.fixture
def daemon_process(tmp_path):
    """A real daemon subprocess on ipc:// with one worker thread (so a forged message that
    killed it would stop all serving) and the smallest allowed message size."""
    config = daemon_config(tmp_path / "home", daemon_threads=1,
                           daemon_max_message_bytes=1 << 20)
    process = DaemonProcess(config, tmp_path / "daemon.yaml").start()
    client = DaemonClient.from_config(config)
    try:
        wait_until_up(client)
        yield process, client
    finally:
        client.close()
        process.kill()


class RawPeer:
    """A DEALER socket that sends whatever frames it is given to the daemon."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def reply(self, timeout_ms: int = 10_000) -> tuple[wire.Reply, list[bytes]] | None:
        if not self.sock.poll(timeout_ms, zmq.POLLIN):
            return None
        frames = self.sock.recv_multipart()
        return wire.REPLY_DECODER.decode(frames[0]), frames[1:]

    def ping(self, request_id: int) -> wire.Reply:
        """A valid ping; the daemon's one worker answers in order, so earlier messages
        were answered (or dropped) before this one."""
        self.send(wire.ENCODER.encode(wire.Envelope(wire.PROTOCOL_VERSION, request_id,
                                                    wire.Ping())))
        answer = self.reply()
        assert answer is not None, "the daemon stopped answering"
        return answer[0]

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def _ndarray_ext(dtype: str, shape: tuple[int, ...], raw: bytes) -> msgspec.msgpack.Ext:
    return msgspec.msgpack.Ext(wire.NDARRAY_EXT, msgspec.msgpack.encode((dtype, shape, raw)))


def test_forged_messages_are_refused_or_dropped_and_the_daemon_keeps_serving(daemon_process):
    process, client = daemon_process
    peer = RawPeer(process.config.daemon_endpoint)
    try:
        peer.send(b"\xc1 not msgpack at all")  # garbage: dropped
        peer.send(bytes([0x93, 0x02, 0x07, 0xdb, 0xff, 0xff, 0xff, 0xff]) + b"x")  # claims 4 GB
        assert peer.ping(1).request_id == 1  # nothing answered the two above

        peer.send(msgspec.msgpack.encode([1, 2, ["ping"]]))  # an older protocol
        answer, _ = peer.reply()
        assert answer.request_id == 2
        assert answer.error == ("protocol version 1 is not this daemon's "
                                f"({wire.PROTOCOL_VERSION}); run the same kvshare version on "
                                "both sides")

        bad_calls = {
            3: (["launch_missiles"], "bad request"),
            4: (["lookup", MODEL, "text", _ndarray_ext("garbage", (3,), b"abc"), "t", []],
                "bad request: TypeError: data type 'garbage' not understood"),
            5: (["lookup", MODEL, "text", _ndarray_ext("<i4", (1 << 40,), b"abcd"), "t", []],
                "bad request: ValueError"),
            6: (["contains", [b"short"]], "chunk key '73686f7274' is 5 bytes"),
            7: (["admin", "_delete", {"entry_ids": ["x"]}], "PermissionError"),
        }
        for request_id, (call, error) in bad_calls.items():
            peer.send(msgspec.msgpack.encode([wire.PROTOCOL_VERSION, request_id, call]))
            answer, _ = peer.reply()
            assert answer.request_id == request_id and error in answer.error, answer

        # A chunk header claiming far more bytes than its frame carries.
        kv = random_kv(SMOLLM2, 16)
        (chunk,) = split_prompt_kv(MODEL, kv, list(range(16)), 16, scope="")
        (head,), (payload,) = wire.chunk_parts([chunk])
        put = wire.ENCODER.encode(wire.Envelope(wire.PROTOCOL_VERSION, 8, wire.Put([head])))
        peer.send(put, bytes(payload)[:1000])
        answer, _ = peer.reply()
        assert answer.error is None
        assert wire.decode_result(list[bool], answer.result) == [False]  # refused, not stored
        peer.send(wire.ENCODER.encode(wire.Envelope(wire.PROTOCOL_VERSION, 9,
                                                    wire.Put([head, head]))), bytes(payload))
        answer, _ = peer.reply()
        assert "put names 2 chunks but carries 1 payload frames" in answer.error
        assert peer.ping(10).request_id == 10
    finally:
        peer.close()
    assert client.ping()["version"] == wire.PROTOCOL_VERSION  # a real client, still served
    log = process.log.read_text()
    assert log.count("dropped an unreadable request") == 2, log
    assert log.count("refused request") == 7, log
    assert "Traceback" not in log, log


def test_an_oversized_frame_is_cut_off_before_the_daemon_reads_it(daemon_process, caplog):
    process, client = daemon_process
    peer = RawPeer(process.config.daemon_endpoint)
    try:
        header = wire.ENCODER.encode(wire.Envelope(wire.PROTOCOL_VERSION, 1, wire.Put([b"x"])))
        peer.send(header, bytes(2 << 20))  # 2 MiB > daemon_max_message_bytes
        assert peer.reply(timeout_ms=2000) is None
    finally:
        peer.close()
    assert client.ping()["version"] == wire.PROTOCOL_VERSION
    assert client.stats().tiers["cpu"].chunks == 0
    # A connector with the same config never sends such a frame: the chunk is not stored.
    store = RemoteStore.connect(process.config)
    kv = random_kv(SMOLLM2, 80)
    big, small = split_prompt_kv(MODEL, kv, list(range(80)), 64, scope="")
    assert big.nbytes > process.config.daemon_max_message_bytes > small.nbytes
    with caplog.at_level(logging.WARNING, logger="kvshare.remote.client"):
        assert store.put([big, small]) == [False, True]
    assert "exceeds daemon_max_message_bytes=1048576" in caplog.text
    assert store.contains([big.key, small.key]) == [False, True]
    store.close()


def test_another_tenants_entry_is_never_reused_through_the_daemon(daemon_process, wordllama,
                                                                  tokenizer):
    process, client = daemon_process
    catalog = RemoteCatalog(client)
    ids = tokenizer(REPORT, add_special_tokens=False)["input_ids"]
    acme = entry_for(wordllama, REPORT, ids, scope="acme")
    catalog.commit([acme], SMOLLM2.bytes_per_token())
    assert set(catalog.lookup(MODEL, REPORT, ids, "acme").plan.source_entries) == {
        acme.entry_id}
    # Another tenant asks for the same prompt, then names acme's entry as its own in flight.
    for in_flight in ([], [acme]):
        result = catalog.lookup(MODEL, REPORT, ids, "mallory", in_flight)
        assert result.plan.reused_tokens == 0 and result.hits == []
    catalog.record_hits(["no-such-entry"])  # unknown ids change nothing
    catalog.drop(["no-such-entry", "' OR '1'='1"])
    assert set(catalog.lookup(MODEL, REPORT, ids, "acme").plan.source_entries) == {
        acme.entry_id}


# ------------------------------------------------------------------ prompts, one real engine
MAX_MODEL_LEN = 512


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from serving import free_port, start_server

    running = start_server(
        ["serve", "smollm2-135m-instruct", "--port", str(free_port()), "--host", "127.0.0.1",
         "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN), "--no-warmup",
         # A fixed KV cache (a few max-length requests): vLLM CPU then does not ask for a
         # share of host memory, which other processes on a shared machine may hold.
         "--kv-cache-memory-bytes", str(64 << 20),
         "--kvshare-set", "share_public_scope=false"],
        tmp_path_factory.mktemp("bad-prompts"))
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


def _complete(server, token_ids: list[int], tenant: str, **extra) -> dict:
    """``/v1/completions`` of ``token_ids``: the answer, or ``{"http_error": status, ...}``."""
    try:
        return server.post("/v1/completions", {
            "model": "smollm2-135m-instruct", "prompt": token_ids, "max_tokens": 1,
            "temperature": 0.0, "cache_salt": tenant, **extra})
    except urllib.error.HTTPError as exc:
        return {"http_error": exc.code, "body": exc.read().decode(errors="replace")}


def _claimed(answer: dict) -> int:
    report = (answer.get("kv_transfer_params") or {}).get("kvshare")
    return 0 if report is None else report["claimed"]


def _first_token(answer: dict) -> str:
    return answer["choices"][0]["text"]


def _edit(ids: list[int], at: int, tokens: list[int]) -> list[int]:
    return ids[:at] + tokens + ids[at + len(tokens):]


def _long_prompt(tokenizer, num_tokens: int) -> list[int]:
    ids = tokenizer((REPORT + " ") * 40, add_special_tokens=False)["input_ids"]
    assert len(ids) >= num_tokens
    return ids[:num_tokens]


@pytest.mark.engine
def test_an_empty_prompt_and_one_beyond_max_model_len_get_clear_errors(server, tokenizer):
    empty = _complete(server, [], "edge-empty")
    assert empty.get("http_error") == 400 and "BadRequestError" in empty["body"], empty
    too_long = _complete(server, _long_prompt(tokenizer, MAX_MODEL_LEN + 1), "edge-too-long")
    assert too_long.get("http_error") == 400, too_long
    assert f"{MAX_MODEL_LEN + 1}" in too_long["body"] and f"{MAX_MODEL_LEN}" in \
        too_long["body"], too_long  # vLLM names the prompt's length and the limit
    assert server.healthy()


@pytest.mark.engine
def test_a_one_token_prompt_is_answered_as_by_full_compute(server, tokenizer):
    one = tokenizer("Hello", add_special_tokens=False)["input_ids"][:1]
    answers = [_complete(server, one, tenant) for tenant in ("edge-one", "edge-one",
                                                             "edge-one-fresh")]
    assert all(_claimed(answer) == 0 for answer in answers)  # nothing to claim in one token
    assert len({_first_token(answer) for answer in answers}) == 1


@pytest.mark.engine
def test_a_max_length_prompt_is_claimed_and_answers_as_full_compute(server, tokenizer):
    base = _long_prompt(tokenizer, MAX_MODEL_LEN - 1)  # with one generated token: the limit
    edit = _edit(base, MAX_MODEL_LEN // 2, tokenizer(" Berlin", add_special_tokens=False)
                 ["input_ids"])
    _complete(server, base, "edge-max")
    filled = _complete(server, edit, "edge-max", vllm_xargs={"kvshare_rho": 1.0})
    assert "http_error" not in filled, filled
    assert _claimed(filled) > 0, filled.get("kv_transfer_params")
    assert not filled["kv_transfer_params"]["kvshare"]["fallback"]
    assert _first_token(filled) == _first_token(_complete(server, edit, "edge-max-fresh"))


@pytest.mark.engine
def test_token_ids_that_decode_to_invalid_utf8_are_served(server, tokenizer):
    # Byte-level BPE tokens of lone UTF-8 bytes: 0xE2 starts a 3-byte sequence that never
    # ends, 0x80 is a continuation byte with nothing to continue.
    broken = tokenizer.convert_tokens_to_ids(["â", "Ģ", "Ģ", "â"])
    assert "\ufffd" in tokenizer.decode(broken)
    base = _long_prompt(tokenizer, 300)
    base = base[:100] + broken + base[100:200] + broken + base[200:]
    edit = _edit(base, 150, broken[:2])
    first = _complete(server, base, "edge-utf8")
    assert "http_error" not in first, first
    filled = _complete(server, edit, "edge-utf8", vllm_xargs={"kvshare_rho": 1.0})
    assert "http_error" not in filled, filled
    assert _claimed(filled) > 0, filled.get("kv_transfer_params")
    assert _first_token(filled) == _first_token(_complete(server, edit, "edge-utf8-fresh"))
    assert server.healthy()


def test_a_tenant_that_is_not_utf8_claims_and_stores_nothing():
    """A lone surrogate in ``cache_salt`` (reachable through Python's ``LLM.generate``)
    cannot be held by the index, chunk keys or msgpack: such a request takes the
    no-reuse path instead of poisoning the index's writes."""
    from types import SimpleNamespace

    from kvshare.connector.scheduler import KVShareScheduler, _RequestState, encodable

    assert encodable("acme") and encodable("é/..'") and not encodable("\ud800bad")
    request = SimpleNamespace(request_id="r", cache_salt="\ud800bad",
                              prompt_token_ids=list(range(100)), sampling_params=None)
    state = _RequestState(request, request.cache_salt, 100)
    assert KVShareScheduler._lookup_ready(None, state) and state.gave_up
    assert state.lookup is None and state.result is None  # no lookup, so no claim or save
