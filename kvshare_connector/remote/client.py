"""Connector-side clients of the ``kvshare daemon`` (``mode: remote``).

:class:`DaemonClient` sends one call and waits for its reply, never longer than
``daemon_timeout_ms``; :class:`RemoteCatalog` and :class:`RemoteStore` put the
``Catalog`` and ``ChunkStore`` interfaces on top, so the scheduler and the worker do not
know whether the cache is in their process or in the daemon.

Failure semantics (the daemon is a cache: when it is away, vLLM runs as if kvshare were
not there):

* nothing blocks longer than the timeout: a call to a daemon that is down, was never
  started, is hung or refuses our credentials raises :class:`DaemonUnavailable` after at
  most ``daemon_timeout_ms`` (``IMMEDIATE`` keeps requests out of queues of connections
  that do not exist, so none is sent late to a daemon that appears afterwards);
* ZeroMQ reconnects by itself, so a daemon started (or restarted) later is used by the
  same client, without restarting vLLM;
* :class:`RemoteCatalog` raises (the scheduler then claims nothing, or logs the lost
  commit); :class:`RemoteStore` reads failures as misses and "not stored", with one log
  line when the daemon becomes unreachable and one when it is back, not one per call.

Threads. ZeroMQ sockets are not thread-safe, so each calling thread gets its own DEALER
socket. Every request carries an id; a reply to an earlier call that timed out is
discarded when it arrives late.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import zmq

from kvshare.catalog import LoadOutcome
from kvshare.config import KVShareConfig
from kvshare.matching.matcher import LookupResult
from kvshare.remote import protocol as wire
from kvshare.remote.auth import curve_keys
from kvshare.storage.chunk import KVChunk
from kvshare.storage.codec import ChunkCorruptError
from kvshare.storage.index import IndexEntry
from kvshare.storage.keys import ChunkKey
from kvshare.storage.shm_arena import ArenaMapping
from kvshare.storage.tier import TierStats

logger = logging.getLogger(__name__)

PUT_FLOOR_BYTES_PER_S = 20e6
"""A put may take ``daemon_timeout_ms`` plus its bytes at this rate (a daemon writing
through a compressing disk tier on a busy host) before it counts as failed."""


class DaemonUnavailable(ConnectionError):
    """The daemon did not answer in time: down, not started yet, hung, or (TCP) refusing
    this client's credentials. The caller behaves as if nothing were cached."""


class DaemonCallError(RuntimeError):
    """The daemon answered that the call failed; the message is the daemon's error."""


class DaemonClient:
    """Calls to one daemon; see the module docstring. Thread-safe."""

    def __init__(self, endpoint: str, *, secret: str = "", timeout_ms: int = 2000) -> None:
        if not endpoint.startswith(("ipc://", "tcp://")):
            raise ValueError(f"daemon endpoint {endpoint!r} is neither ipc://PATH nor "
                             "tcp://HOST:PORT")
        if timeout_ms < 1:
            raise ValueError(f"timeout_ms={timeout_ms} must be >= 1")
        self.endpoint = endpoint
        self.timeout_ms = timeout_ms
        self._keys = curve_keys(secret) if endpoint.startswith("tcp://") else None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._ctx: zmq.Context | None = None
        self._pid = 0
        self._sockets: list[zmq.Socket] = []

    @classmethod
    def from_config(cls, config: KVShareConfig) -> DaemonClient:
        return cls(config.daemon_endpoint, secret=config.daemon_secret,
                   timeout_ms=config.daemon_timeout_ms)

    # ------------------------------------------------------------------ calls
    def call(self, call: wire.Call, payloads: Sequence[memoryview] = (),
             timeout_ms: int | None = None) -> tuple[Any, list[zmq.Frame]]:
        """Send ``call`` (with chunk ``payloads``) and return its result and the reply's
        payload frames; raises :class:`DaemonUnavailable` after ``timeout_ms`` (default
        the client's) and :class:`DaemonCallError` when the daemon reports a failure."""
        timeout_ms = self.timeout_ms if timeout_ms is None else timeout_ms
        deadline = time.monotonic() + timeout_ms / 1e3
        sock = self._socket()
        request_id = next(self._ids)
        header = wire.ENCODER.encode(wire.Envelope(wire.PROTOCOL_VERSION, request_id, call))
        sock.setsockopt(zmq.SNDTIMEO, timeout_ms)
        try:
            sock.send_multipart([header, *payloads], copy=False)
        except zmq.Again:
            raise self._unavailable(call, timeout_ms) from None
        while True:
            remaining_ms = (deadline - time.monotonic()) * 1e3
            if remaining_ms <= 0 or not sock.poll(max(1, int(remaining_ms)), zmq.POLLIN):
                raise self._unavailable(call, timeout_ms)
            frames = sock.recv_multipart(copy=False)
            reply = wire.REPLY_DECODER.decode(frames[0].buffer)
            if reply.request_id != request_id:
                continue  # the late answer to a call of this thread that timed out
            if reply.error is not None:
                raise DaemonCallError(f"kvshare daemon at {self.endpoint}: "
                                      f"{type(call).__name__.lower()} failed: {reply.error}")
            return wire.decode_result(type(call).RESULT, reply.result), frames[1:]

    def ping(self, timeout_ms: int | None = None) -> dict[str, Any]:
        """The daemon's protocol version, pid and address."""
        return self.call(wire.Ping(), timeout_ms=timeout_ms)[0]

    def stats(self, timeout_ms: int | None = None) -> wire.DaemonStats:
        return self.call(wire.Stats(), timeout_ms=timeout_ms)[0]

    def admin(self, method: str, *, timeout_ms: int | None = None, **kwargs: Any) -> Any:
        """Call ``method`` of the daemon's ``CacheAdmin`` (one of its ``REMOTE_METHODS``)
        with msgpack-able ``kwargs``; admin work may need a longer ``timeout_ms``."""
        return self.call(wire.Admin(method, kwargs), timeout_ms=timeout_ms)[0]

    def _unavailable(self, call: wire.Call, timeout_ms: int) -> DaemonUnavailable:
        return DaemonUnavailable(
            f"kvshare daemon at {self.endpoint} did not answer {type(call).__name__.lower()} "
            f"within {timeout_ms} ms (not running, hung, or refusing this client's secret)")

    # ------------------------------------------------------------------ sockets
    def _socket(self) -> zmq.Socket:
        """This thread's DEALER socket (a new context after a fork)."""
        sock = getattr(self._local, "sock", None)
        if sock is not None and self._pid == os.getpid():
            return sock
        with self._lock:
            if self._ctx is None or self._pid != os.getpid():
                self._ctx, self._pid, self._sockets = zmq.Context(), os.getpid(), []
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            if self._keys is not None:
                sock.curve_serverkey = self._keys.server_public
                sock.curve_publickey = self._keys.client_public
                sock.curve_secretkey = self._keys.client_secret
            sock.connect(self.endpoint)
            self._sockets.append(sock)
        self._local.sock = sock
        return sock

    def close(self) -> None:
        """Close every thread's socket; calls after this open new ones."""
        with self._lock:
            ctx, sockets = self._ctx, self._sockets
            self._ctx, self._sockets = None, []
            self._local = threading.local()
        if ctx is not None and self._pid == os.getpid():
            for sock in sockets:
                sock.close(linger=0)
            ctx.term()


class RemoteCatalog:
    """:class:`kvshare.catalog.Catalog` of the daemon: every call is a round trip and
    raises :class:`DaemonUnavailable` / :class:`DaemonCallError` when it fails."""

    def __init__(self, client: DaemonClient) -> None:
        self.client = client

    @classmethod
    def connect(cls, config: KVShareConfig) -> RemoteCatalog:
        """Never contacts the daemon: a connector starts whether or not it is up."""
        return cls(DaemonClient.from_config(config))

    def lookup(self, model_id: str, text: str, token_ids: Sequence[int], tenant: str,
               in_flight: Sequence[IndexEntry] = ()) -> LookupResult:
        return self.client.call(wire.Lookup(model_id, text, np.asarray(token_ids, np.int32),
                                            tenant, list(in_flight)))[0]

    def commit(self, entries: Sequence[IndexEntry], kv_bytes_per_token: int) -> None:
        if entries:
            self.client.call(wire.Commit(list(entries), kv_bytes_per_token))

    def drop(self, entry_ids: Iterable[str]) -> None:
        ids = list(entry_ids)
        if ids:
            self.client.call(wire.Drop(ids))

    def record_hits(self, entry_ids: Iterable[str]) -> None:
        ids = list(entry_ids)
        if ids:
            self.client.call(wire.RecordHits(ids))

    def report_load(self, outcome: LoadOutcome) -> None:
        self.client.call(wire.ReportLoad(outcome))

    def close(self) -> None:
        self.client.close()


class RemoteStore:
    """:class:`kvshare.storage.tiered_store.ChunkStore` of the daemon: like a tier, a
    failure reads as misses and "not stored", logged once per outage. Chunks read are
    verified (checksum over header and payload) and view the reply's frames, or, with
    ``shared_memory`` (the default on ``ipc://``: the daemon is on this host and runs as
    this user), the daemon's shared-memory arena, mapped once and read in place.

    A chunk read from the arena is guaranteed unchanged for ``GRACE_S`` seconds
    (:mod:`kvshare.storage.shm_arena`) after the get: callers copy what they need out
    of it at once (the worker copies a fetched chunk's rows into the fill right away)
    and must clone a chunk they keep longer.
    """

    def __init__(self, client: DaemonClient, *, shared_memory: bool | None = None,
                 max_message_bytes: int | None = None) -> None:
        """``max_message_bytes``: the daemon's ``daemon_max_message_bytes`` (None: unknown);
        a chunk larger than it is not sent, since the daemon would drop the connection."""
        local = client.endpoint.startswith("ipc://")
        if shared_memory and not local:
            raise ValueError(f"shared_memory=True needs an ipc:// daemon on this host, not "
                             f"{client.endpoint}")
        self.client = client
        self.shared_memory = local if shared_memory is None else shared_memory
        self._arena: ArenaMapping | None = None
        self._arena_lock = threading.Lock()
        self._healthy = True
        self._health_lock = threading.Lock()
        self.max_message_bytes = max_message_bytes
        self._warned_oversized = False

    @classmethod
    def connect(cls, config: KVShareConfig, *, shared_memory: bool | None = None
                ) -> RemoteStore:
        """Never contacts the daemon: a connector starts whether or not it is up."""
        return cls(DaemonClient.from_config(config), shared_memory=shared_memory,
                   max_message_bytes=config.daemon_max_message_bytes)

    def put(self, chunks: Sequence[KVChunk]) -> list[bool]:
        fits = [i for i, chunk in enumerate(chunks)
                if self.max_message_bytes is None or chunk.nbytes <= self.max_message_bytes]
        if len(fits) < len(chunks) and not self._warned_oversized:
            self._warned_oversized = True
            largest = max(chunk.nbytes for chunk in chunks)
            logger.warning("kvshare: a chunk of %d bytes exceeds daemon_max_message_bytes=%d; "
                           "such chunks are not stored (raise it, or lower chunk_tokens)",
                           largest, self.max_message_bytes)
        stored = [False] * len(chunks)
        if not fits:
            return stored
        heads, payloads = wire.chunk_parts([chunks[i] for i in fits])
        nbytes = sum(payload.nbytes for payload in payloads)
        # Puts come from the write-behind thread, never a request's path: a large prompt
        # on a busy daemon may take longer than a lookup is allowed to.
        answer = self._call(wire.Put(heads), payloads, timeout_ms=self.client.timeout_ms
                            + int(nbytes * 1e3 / PUT_FLOOR_BYTES_PER_S))
        if answer is not None:
            for i, ok in zip(fits, answer[0]):
                stored[i] = ok
        return stored

    def get(self, keys: Sequence[ChunkKey]) -> list[KVChunk | None]:
        if not keys:
            return []
        answer = self._call(wire.Get(list(keys), shared_memory=self.shared_memory))
        if answer is None:
            return [None] * len(keys)
        heads, frames = answer
        if sum(isinstance(head, bytes) for head in heads) != len(frames) \
                or len(heads) != len(keys):
            logger.error("kvshare: the daemon answered a get of %d keys with %d headers and %d "
                         "payloads; reading misses", len(keys), len(heads), len(frames))
            return [None] * len(keys)
        payloads = iter(frames)
        found: list[KVChunk | None] = []
        for head in heads:
            if head is None:
                found.append(None)
            elif isinstance(head, wire.SharedChunk):
                found.append(self._mapped(head))
            else:
                found.append(self._verified(head, next(payloads).buffer))
        return found

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        if not keys:
            return []
        held = self._call(wire.Contains(list(keys)))
        return [False] * len(keys) if held is None else held[0]

    def delete(self, keys: Sequence[ChunkKey]) -> None:
        if keys:
            self._call(wire.Delete(list(keys)))

    def stats(self) -> dict[str, TierStats]:
        """The daemon's tiers, fastest first; empty while it is unreachable."""
        stats = self._call(wire.Stats())
        return {} if stats is None else stats[0].tiers

    def close(self) -> None:
        self.client.close()

    @staticmethod
    def _verified(head: bytes, payload: memoryview) -> KVChunk | None:
        try:
            return wire.chunk_from_parts(head, payload)
        except ChunkCorruptError as exc:
            logger.warning("kvshare: a chunk from the daemon failed verification (%s); "
                           "reading a miss", exc)
            return None

    def _mapped(self, shared: wire.SharedChunk) -> KVChunk | None:
        """The chunk at its arena range, verified there (no copy); None when the range
        does not verify or the arena cannot be mapped."""
        try:
            payload = self._arena_at(shared.arena).bytes_at(shared.offset, shared.nbytes)
        except FileNotFoundError:
            return None  # the daemon stopped and removed its arena since it answered
        except (OSError, ValueError) as exc:
            self.shared_memory = False
            logger.warning("kvshare: cannot read the daemon's shared memory (%s); chunks come "
                           "through the socket from now on", exc)
            return None
        return self._verified(shared.head, payload)

    @property
    def arena_path(self) -> str | None:
        """The daemon's arena this store last read chunks through; None before the first
        shared-memory hit (and always without ``shared_memory``)."""
        arena = self._arena
        return None if arena is None else arena.path

    def _arena_at(self, path: str) -> ArenaMapping:
        """The mapping of the daemon's arena ``path``; a new path (the daemon restarted)
        replaces the old mapping, which lives on while chunks still view it."""
        with self._arena_lock:
            if self._arena is None or self._arena.path != path:
                self._arena = ArenaMapping(path)
            return self._arena

    def _call(self, call: wire.Call, payloads: Sequence[memoryview] = (),
              timeout_ms: int | None = None) -> tuple[Any, list[zmq.Frame]] | None:
        """The call's answer, or None (logged once per outage) when it failed."""
        try:
            answer = self.client.call(call, payloads, timeout_ms)
        except (DaemonUnavailable, DaemonCallError) as exc:
            with self._health_lock:
                was_healthy, self._healthy = self._healthy, False
            if was_healthy:
                logger.warning("kvshare: the daemon's chunk store failed (%s); reading misses "
                               "until it answers again", exc)
            return None
        if not self._healthy:
            with self._health_lock:
                was_healthy, self._healthy = self._healthy, True
            if not was_healthy:
                logger.info("kvshare: the daemon's chunk store at %s answers again",
                            self.client.endpoint)
        return answer
