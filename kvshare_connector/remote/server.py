"""The ``kvshare daemon``: one process per host that owns the cache for every vLLM instance.

It holds ONE :class:`~kvshare.catalog.LocalCatalog` (the single writer of the LanceDB
index) and ONE chunk store (the tiers ``kvshare.tiers_setup.build_store`` builds from
the config: CPU, disk, Redis), and serves them to connectors in ``mode: remote`` over
ZeroMQ (the calls of :mod:`kvshare.remote.protocol`).

Sockets and threads. A ROUTER socket listens at ``config.daemon_endpoint``; a ZeroMQ
proxy (C code, off the GIL) hands each request to one of ``daemon_threads`` worker
threads through an inproc DEALER, and their replies back to the caller. A worker decodes
the call, runs it against the catalog or the store, and sends the reply with the chunk
payloads as separate frames that point at the tensors' memory (no copy on send). The CPU
tier lives in a shared-memory arena (``build_store(shared_memory=True)``): a client on
this host that asks for it gets each CPU-tier hit as a range of that arena to map, and
no frame at all (see :mod:`kvshare.remote.protocol`).

Security. ``ipc://`` (the default) is a Unix socket created with mode 0600: only the
daemon's user can connect. ``tcp://`` is always CURVE-encrypted and authenticated: server
and client key pairs are derived from ``daemon_secret`` (:mod:`kvshare.remote.auth`) and
the ZAP handler admits only the client key of that secret, so a peer without it never
completes the handshake and learns nothing (its calls time out).

Life cycle (:class:`Daemon`): take ``<home>/daemon.lock`` (one daemon per home: the index
has one writer), open catalog and store, bind (refusing to start over a live daemon on
the same address, taking over a stale socket file), serve; in the background, drop the
index entries whose chunks the tiers no longer hold. ``close`` (SIGTERM, SIGINT) stops
taking calls, lets the calls being served finish and answer, then flushes the index
(``LocalCatalog.close``) and closes the store, so a restart on the same home finds its
entries and its disk and Redis chunks.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import zmq

from kvshare.catalog import LocalCatalog
from kvshare.config import KVShareConfig
from kvshare.heap import HeapTrimmer
from kvshare.remote import protocol as wire
from kvshare.remote.auth import curve_keys
from kvshare.storage.codec import ChunkCorruptError
from kvshare.storage.commit import lost_entries
from kvshare.storage.keys import KEY_BYTES
from kvshare.storage.memory_tier import SharedMemoryTier
from kvshare.storage.tiered_store import TieredStore
from kvshare.tiers_setup import build_store

logger = logging.getLogger(__name__)

POLL_MS = 100
"""How often an idle worker checks whether the daemon is stopping."""
REPLY_LINGER_MS = 1000
"""How long replies still queued at shutdown may take to leave."""


class DaemonStartError(RuntimeError):
    """The daemon cannot start here (another one is live, the address is taken...)."""


@dataclass
class _Handled:
    result: Any = None
    payloads: tuple[memoryview, ...] = ()


class DaemonService:
    """The daemon's calls on one catalog and one store, without sockets (thread-safe:
    catalog and store are).

    ``admin`` is the ``kvshare.admin.CacheAdmin`` of the same catalog and store, or None
    where that module is absent; only its ``REMOTE_METHODS`` are callable.
    ``metrics`` is a ``kvshare.metrics.CacheMetrics`` or None.
    """

    def __init__(self, config: KVShareConfig, catalog: LocalCatalog, store: TieredStore,
                 *, admin: object | None = None, metrics: Any = None) -> None:
        self.config = config
        self.catalog = catalog
        self.store = store
        self.admin = admin
        self.metrics = metrics
        self._shared_tier = next((tier for tier in getattr(store, "tiers", ())
                                  if isinstance(tier, SharedMemoryTier)), None)
        self._handlers: dict[type, Callable[[Any, list[zmq.Frame]], _Handled]] = {
            wire.Ping: self._ping, wire.Lookup: self._lookup, wire.Commit: self._commit,
            wire.Drop: self._drop, wire.RecordHits: self._record_hits,
            wire.ReportLoad: self._report_load, wire.Get: self._get, wire.Put: self._put,
            wire.Contains: self._contains, wire.Delete: self._delete, wire.Stats: self._stats,
            wire.Admin: self._admin,
        }

    def handle(self, call: wire.Call, payloads: list[zmq.Frame]) -> _Handled:
        return self._handlers[type(call)](call, payloads)

    # ------------------------------------------------------------------ catalog
    def _ping(self, call: wire.Ping, _: list) -> _Handled:
        return _Handled({"version": wire.PROTOCOL_VERSION, "pid": os.getpid(),
                         "address": self.config.daemon_endpoint})

    def _lookup(self, call: wire.Lookup, _: list) -> _Handled:
        started = time.perf_counter()
        result = self.catalog.lookup(call.model_id, call.text, call.token_ids, call.tenant,
                                     call.in_flight)
        if self.metrics is not None:
            self.metrics.observe_lookup(call.tenant, time.perf_counter() - started,
                                        result.plan.reused_tokens > 0)
        return _Handled(result)

    def _commit(self, call: wire.Commit, _: list) -> _Handled:
        self.catalog.commit(call.entries, call.kv_bytes_per_token)
        return _Handled()

    def _drop(self, call: wire.Drop, _: list) -> _Handled:
        self.catalog.drop(call.entry_ids)
        return _Handled()

    def _record_hits(self, call: wire.RecordHits, _: list) -> _Handled:
        self.catalog.record_hits(call.entry_ids)
        return _Handled()

    def _report_load(self, call: wire.ReportLoad, _: list) -> _Handled:
        self.catalog.report_load(call.outcome)
        if self.metrics is not None:
            o = call.outcome
            self.metrics.observe_load(o.tenant, o.claimed, o.reused, o.recomputed, o.fallback)
        return _Handled()

    # ------------------------------------------------------------------ store
    def _get(self, call: wire.Get, _: list) -> _Handled:
        """Hits of the shared-memory CPU tier go as their arena range to a client that
        asked for shared memory, and as a frame with the header stored with them (no
        checksum to compute) to others; every other hit as a frame."""
        answers: list[bytes | wire.SharedChunk | None] = []
        payloads = []
        for chunk in self.store.get(_checked_keys(call.keys)):
            if chunk is None:
                answers.append(None)
                continue
            shared = None if self._shared_tier is None else self._shared_tier.locate(chunk)
            if shared is not None and call.shared_memory:
                answers.append(wire.SharedChunk(shared.head, shared.path, shared.offset,
                                                shared.nbytes))
                continue
            if shared is not None:
                head = shared.head
                payload = self._shared_tier.arena.view(shared.offset, shared.nbytes).numpy().data
            else:
                (head,), (payload,) = wire.chunk_parts([chunk])
            answers.append(head)
            payloads.append(payload)
        return _Handled(answers, tuple(payloads))

    def _put(self, call: wire.Put, payloads: list[zmq.Frame]) -> _Handled:
        if len(payloads) != len(call.heads):
            raise ValueError(f"put names {len(call.heads)} chunks but carries "
                             f"{len(payloads)} payload frames; expected one per chunk")
        stored = [False] * len(call.heads)
        chunks, positions = [], []
        for i, (head, frame) in enumerate(zip(call.heads, payloads)):
            try:
                chunks.append(wire.chunk_from_parts(head, frame.buffer))
            except ChunkCorruptError as exc:
                logger.warning("kvshare daemon: refused a corrupt chunk from a client: %s", exc)
                continue
            positions.append(i)
        for i, ok in zip(positions, self.store.put(chunks)):
            stored[i] = ok
        return _Handled(stored)

    def _contains(self, call: wire.Contains, _: list) -> _Handled:
        return _Handled(self.store.contains(_checked_keys(call.keys)))

    def _delete(self, call: wire.Delete, _: list) -> _Handled:
        self.store.delete(_checked_keys(call.keys))
        return _Handled()

    def _stats(self, call: wire.Stats, _: list) -> _Handled:
        return _Handled(wire.DaemonStats(self.store.stats(), self.catalog.index.stats(),
                                         self.config.daemon_endpoint, os.getpid()))

    # ------------------------------------------------------------------ admin
    def _admin(self, call: wire.Admin, _: list) -> _Handled:
        if self.admin is None:
            raise RuntimeError("this daemon has no admin interface (kvshare.admin is missing)")
        allowed = getattr(type(self.admin), "REMOTE_METHODS", ())
        if call.method not in allowed:
            raise PermissionError(f"admin method {call.method!r} is not callable remotely; "
                                  f"expected one of {sorted(allowed)}")
        return _Handled(getattr(self.admin, call.method)(**call.kwargs))


def _checked_keys(keys: list[bytes]) -> list[bytes]:
    for key in keys:
        if len(key) != KEY_BYTES:
            raise ValueError(f"chunk key {key.hex()!r} is {len(key)} bytes; keys are "
                             f"{KEY_BYTES} bytes")
    return keys


class _Preamble(msgspec.Struct, array_like=True):
    """The envelope's first fields, readable whatever the call (for error replies)."""

    version: int
    request_id: int


_PREAMBLE = msgspec.msgpack.Decoder(_Preamble)


class DaemonServer:
    """ROUTER socket, proxy and worker threads in front of a :class:`DaemonService`."""

    def __init__(self, config: KVShareConfig, service: DaemonService) -> None:
        self.config = config
        self.service = service
        self.endpoint = config.daemon_endpoint
        self._ctx = zmq.Context()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._proxy: threading.Thread | None = None
        self._auth = None
        self._ipc_path: Path | None = None
        self._backend = f"inproc://kvshare-workers-{id(self)}"
        self._control = f"inproc://kvshare-control-{id(self)}"
        self._heap = HeapTrimmer()
        """Messages carry chunks of megabytes: the workers trim between them."""

    def start(self) -> None:
        """Bind and start serving; raises :class:`DaemonStartError` when it cannot."""
        frontend = self._ctx.socket(zmq.ROUTER)
        frontend.setsockopt(zmq.LINGER, REPLY_LINGER_MS)
        # ZeroMQ drops the connection of a peer whose frame exceeds this before buffering
        # it: a forged length cannot make the daemon allocate what the peer claims.
        frontend.setsockopt(zmq.MAXMSGSIZE, self.config.daemon_max_message_bytes)
        try:
            self._bind(frontend)
        except BaseException:
            frontend.close(linger=0)
            self._stop_auth()
            raise
        backend = self._ctx.socket(zmq.DEALER)
        backend.bind(self._backend)
        control = self._ctx.socket(zmq.PAIR)
        control.bind(self._control)
        self._proxy = threading.Thread(target=self._run_proxy, args=(frontend, backend, control),
                                       name="kvshare-daemon-proxy", daemon=True)
        self._proxy.start()
        for n in range(self.config.daemon_threads):
            thread = threading.Thread(target=self._work, name=f"kvshare-daemon-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _bind(self, frontend: zmq.Socket) -> None:
        if self.endpoint.startswith("ipc://"):
            self._ipc_path = Path(self.endpoint[len("ipc://"):])
            _take_over_stale_socket(self._ipc_path, self.endpoint)
            self._ipc_path.parent.mkdir(parents=True, exist_ok=True)
            previous = os.umask(0o177)  # the socket file is created 0600: this user only
            try:
                frontend.bind(self.endpoint)
            finally:
                os.umask(previous)
            return
        from zmq.auth.thread import ThreadAuthenticator

        keys = curve_keys(self.config.daemon_secret)
        self._auth = ThreadAuthenticator(self._ctx)
        self._auth.start()
        self._auth.configure_curve_callback(domain="*", credentials_provider=keys)
        frontend.curve_server = True
        frontend.curve_secretkey = keys.server_secret
        frontend.curve_publickey = keys.server_public
        try:
            frontend.bind(self.endpoint)
        except zmq.ZMQError as exc:
            raise DaemonStartError(f"cannot listen on {self.endpoint}: {exc.strerror} (is "
                                   "another kvshare daemon or program using it?)") from exc

    def _run_proxy(self, frontend: zmq.Socket, backend: zmq.Socket, control: zmq.Socket
                   ) -> None:
        try:
            zmq.proxy_steerable(frontend, backend, None, control)
        except zmq.ContextTerminated:
            pass
        finally:
            for sock in (frontend, backend, control):
                sock.close()

    def _work(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, REPLY_LINGER_MS)
        sock.connect(self._backend)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self._stopping.is_set():
                if not poller.poll(POLL_MS):
                    continue
                frames = sock.recv_multipart(copy=False)
                try:
                    reply = self._serve(frames)
                except Exception:  # a worker must outlive any message; the next one waits
                    logger.exception("kvshare daemon: dropped a message that failed to serve")
                    continue
                if reply is not None:
                    sock.send_multipart(reply, copy=False)
                del frames, reply
                self._heap.maybe_trim()
        finally:
            sock.close()

    def _serve(self, frames: list[zmq.Frame]) -> list | None:
        """``[identity, header, *payloads]`` -> ``[identity, reply header, *payloads]``."""
        if len(frames) < 2:
            logger.warning("kvshare daemon: dropped a message of %d frames", len(frames))
            return None
        identity, header, payloads = frames[0], frames[1].buffer, frames[2:]
        try:
            envelope = wire.ENVELOPE_DECODER.decode(header)
        except Exception as exc:  # forged input raises whatever its hooks raise (TypeError...)
            return self._undecodable(identity, header, exc)
        if envelope.version != wire.PROTOCOL_VERSION:
            return self._refuse(identity, envelope.request_id, _version_error(envelope.version))
        try:
            handled = self.service.handle(envelope.call, payloads)
            result = msgspec.Raw(wire.ENCODER.encode(handled.result))
        except (ValueError, TypeError, PermissionError) as exc:  # the call's own arguments
            return self._refuse(identity, envelope.request_id, f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            logger.exception("kvshare daemon: %s failed", type(envelope.call).__name__)
            return self._reply(identity, envelope.request_id, f"{type(exc).__name__}: {exc}")
        return [identity, wire.ENCODER.encode(wire.Reply(envelope.request_id, None, result)),
                *handled.payloads]

    def _undecodable(self, identity: zmq.Frame, header: memoryview, exc: Exception
                     ) -> list | None:
        try:
            preamble = _PREAMBLE.decode(header)
        except (msgspec.DecodeError, msgspec.ValidationError):
            logger.warning("kvshare daemon: dropped an unreadable request: %s", exc)
            return None
        if preamble.version != wire.PROTOCOL_VERSION:
            return self._refuse(identity, preamble.request_id, _version_error(preamble.version))
        return self._refuse(identity, preamble.request_id,
                            f"bad request: {type(exc).__name__}: {exc}")

    def _refuse(self, identity: zmq.Frame, request_id: int, error: str) -> list:
        """The error reply to a request the daemon will not run, logged in one line."""
        logger.warning("kvshare daemon: refused request %d: %s", request_id, error)
        return self._reply(identity, request_id, error)

    @staticmethod
    def _reply(identity: zmq.Frame, request_id: int, error: str) -> list:
        return [identity, wire.ENCODER.encode(wire.Reply(request_id, error, msgspec.Raw(
            wire.ENCODER.encode(None))))]

    def stop(self) -> None:
        """Stop taking calls; the calls being served finish and their replies leave."""
        self._stopping.set()
        for thread in self._threads:
            thread.join()
        if self._proxy is not None:
            control = self._ctx.socket(zmq.PAIR)
            control.connect(self._control)
            control.send(b"TERMINATE")
            self._proxy.join()
            control.close()
        self._stop_auth()
        self._ctx.term()
        if self._ipc_path is not None:
            self._ipc_path.unlink(missing_ok=True)

    def _stop_auth(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


def _version_error(version: int) -> str:
    return (f"protocol version {version} is not this daemon's ({wire.PROTOCOL_VERSION}); "
            "run the same kvshare version on both sides")


def _take_over_stale_socket(path: Path, endpoint: str) -> None:
    """Remove a socket file no daemon listens on; refuse when one does."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise DaemonStartError(f"{path} exists and is not a socket; remove it or set "
                               "daemon_address to another ipc:// path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        logger.info("kvshare daemon: removing the stale socket %s", path)
        path.unlink(missing_ok=True)
        return
    except FileNotFoundError:
        return
    finally:
        probe.close()
    raise DaemonStartError(f"another kvshare daemon is live on {endpoint}; stop it first "
                           "(or give this one another daemon_address or home)")


class Daemon:
    """Catalog, store, metrics and server of one ``kvshare daemon`` (module docstring).

    ``admin_factory(catalog, store)`` builds the admin object (default:
    ``kvshare.admin.CacheAdmin`` when that module exists).
    """

    def __init__(self, config: KVShareConfig,
                 admin_factory: Callable[[LocalCatalog, TieredStore], object] | None = None
                 ) -> None:
        self.config = config
        self._lock_file = _lock_home(config.home_dir)
        try:
            self.catalog = LocalCatalog(config)
            self.store = build_store(config, shared_memory=True)
        except BaseException:
            self._lock_file.close()
            raise
        self.metrics = None
        self._stop_metrics: Callable[[], None] | None = None
        self._reconcile: threading.Thread | None = None
        self.server = DaemonServer(config, DaemonService(
            config, self.catalog, self.store, admin=_make_admin(admin_factory, self.catalog,
                                                                self.store)))
        self._closed = False

    def start(self) -> None:
        """Bind and serve (returns at once; calls run on the server's threads)."""
        try:
            self.server.start()
            if self.config.metrics_port:
                self._start_metrics()
        except BaseException:
            self._close_storage()
            raise
        self._reconcile = threading.Thread(target=self._drop_entries_without_chunks,
                                           name="kvshare-daemon-reconcile", daemon=True)
        self._reconcile.start()
        tiers = ", ".join(f"{name} {_size(stats.capacity_bytes)}"
                          for name, stats in self.store.stats().items()) or "none"
        logger.info("kvshare daemon ready on %s (pid %d); tiers: %s; index: %d entries at %s",
                    self.config.daemon_endpoint, os.getpid(), tiers, len(self.catalog.index),
                    self.config.index_dir)

    def _start_metrics(self) -> None:
        from kvshare.metrics import CacheMetrics

        self.metrics = CacheMetrics(self.config.metrics_max_tenants,
                                    tier_stats=self.store.stats,
                                    index_entries=lambda: len(self.catalog.index))
        self._stop_metrics = self.metrics.serve(self.config.metrics_port)
        self.server.service.metrics = self.metrics
        logger.info("kvshare daemon: metrics on http://127.0.0.1:%d/metrics",
                    self.config.metrics_port)

    def _drop_entries_without_chunks(self) -> None:
        """The durable index entries whose chunks the tiers no longer hold are dropped."""
        missing = lost_entries(self.store, self.config.index_dir)
        if missing:
            self.catalog.drop(missing)
            if self.metrics is not None:
                self.metrics.observe_eviction("missing_chunks", len(missing))

    def wait_reconciled(self, timeout: float | None = None) -> bool:
        """Whether the start-up check of the index against the tiers has finished."""
        if self._reconcile is not None:
            self._reconcile.join(timeout)
        return self._reconcile is not None and not self._reconcile.is_alive()

    def close(self) -> None:
        """Stop taking calls, finish those in progress, flush the index, close the tiers."""
        if self._closed:
            return
        self._closed = True
        self.server.stop()
        if self._reconcile is not None:
            self._reconcile.join()
        self._close_storage()
        logger.info("kvshare daemon stopped; index flushed (%d entries)",
                    len(self.catalog.index))

    def _close_storage(self) -> None:
        if self._stop_metrics is not None:
            self._stop_metrics()
        try:
            self.catalog.close()
            self.store.close()
        finally:
            self._lock_file.close()


def _lock_home(home: Path):
    """Hold ``<home>/daemon.lock`` (flock) for the daemon's life: the index has one writer."""
    home.mkdir(parents=True, exist_ok=True)
    lock = open(home / "daemon.lock", "a+")  # noqa: SIM115 (held until close)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise DaemonStartError(f"another kvshare daemon (pid {holder}) serves {home}; "
                                   "stop it first or give this one another home") from exc
        raise
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def _make_admin(factory: Callable[[LocalCatalog, TieredStore], object] | None,
                catalog: LocalCatalog, store: TieredStore) -> object | None:
    if factory is None:
        try:
            from kvshare.admin import CacheAdmin
        except ModuleNotFoundError as exc:
            if exc.name != "kvshare.admin":
                raise
            return None
        factory = CacheAdmin
    return factory(catalog, store)


def _size(nbytes: int | None) -> str:
    if nbytes is None:
        return "(backend-managed)"
    return f"{nbytes / (1 << 30):.1f} GiB"

