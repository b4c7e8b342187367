"""The wire protocol between connectors and the ``kvshare daemon`` (ZeroMQ multipart).

A request is one DEALER message ``[header, *payloads]``; the daemon's ROUTER answers with
``[header, *payloads]`` on the same connection. Headers are msgpack (msgspec):

* request: :class:`Envelope` ``(version, request_id, call)``, ``call`` one of the tagged
  call structs below (``Lookup``, ``Get``, ...);
* reply: :class:`Reply` ``(request_id, error, result)``, ``result`` the call's return
  value encoded with the same rules (its type is the call's ``RESULT``).

Payload frames carry chunk KV only, one frame per chunk, in the order of the chunk
headers the message names (``Put.heads``, the ``Get`` reply's list): each chunk travels
as its codec header (``ChunkCodec.encode_parts`` with the raw codec, so checksummed) in
the msgpack header and its tensor bytes as a separate frame, sent without copying and
received as a view of the frame (``ChunkCodec.decode_parts``). The checksum covers both,
so a damaged frame is refused, never served.

Shared memory. A ``Get`` with ``shared_memory=True`` (a client on this host, same user,
that can map the daemon's arena) is answered, for each chunk the daemon's CPU tier
holds in its shared-memory arena, with a :class:`SharedChunk` (codec header, arena file,
byte range) instead of a payload frame; the client maps the arena and verifies the range
against the header in place. The daemon leaves such a range unchanged for at least
``kvshare.storage.shm_arena.GRACE_S`` seconds after the get. Other hits still travel as
frames. TCP clients never ask for shared memory.

Everything else is msgpack: kvshare's dataclasses (``IndexEntry``, ``LookupResult``,
``LoadOutcome``, ``TierStats``, ...) encode as maps of their fields, and numpy arrays
(embeddings, token ids, a plan's recompute positions) as an extension value holding
dtype, shape and the raw bytes. Decoding rebuilds the dataclasses, whose
``__post_init__`` checks run again (a ``ReusePlan`` checks its own structure), and
arrays as read-only views of the received header.

``request_id`` lets a client discard a reply that arrives after it gave up waiting;
``version`` lets the daemon refuse a client built for another protocol with an error
that says so, instead of misreading it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import msgspec
import numpy as np

from kvshare.catalog import LoadOutcome
from kvshare.matching.matcher import LookupResult
from kvshare.storage.chunk import KVChunk
from kvshare.storage.codec import ChunkCodec
from kvshare.storage.index import IndexEntry
from kvshare.storage.tier import TierStats

PROTOCOL_VERSION = 2
"""Bumped whenever a call, a reply or the array encoding changes."""
NDARRAY_EXT = 1
"""msgpack extension code of a numpy array: ``[dtype.str, shape, raw bytes]`` (msgpack)."""

TRANSPORT_CODEC = ChunkCodec("raw")
"""Chunks cross the socket uncompressed: a local hop is faster than any compressor."""


class Call(msgspec.Struct, tag_field="op", array_like=True, frozen=True):
    """A request's call; subclasses name their op (``tag``) and the type they return."""

    RESULT: ClassVar[Any] = None


class Ping(Call, tag="ping"):
    RESULT: ClassVar[Any] = dict[str, Any]


class Lookup(Call, tag="lookup"):
    model_id: str
    text: str
    token_ids: np.ndarray
    tenant: str
    in_flight: list[IndexEntry] = []
    RESULT: ClassVar[Any] = LookupResult


class Commit(Call, tag="commit"):
    entries: list[IndexEntry]
    kv_bytes_per_token: int


class Drop(Call, tag="drop"):
    entry_ids: list[str]


class RecordHits(Call, tag="record_hits"):
    entry_ids: list[str]


class ReportLoad(Call, tag="report_load"):
    outcome: LoadOutcome


class SharedChunk(msgspec.Struct, array_like=True, frozen=True):
    """A hit answered through shared memory: the chunk's codec header (raw codec,
    checksummed when it was stored) and the bytes ``[offset, offset + nbytes)`` of the
    arena file at ``arena`` that its header must verify."""

    head: bytes
    arena: str
    offset: int
    nbytes: int


class Get(Call, tag="get"):
    """Reply: per key None (a miss), a codec header (a hit whose payload is the next
    frame), or, when ``shared_memory`` is set, a :class:`SharedChunk` (no frame)."""

    keys: list[bytes]
    shared_memory: bool = False
    RESULT: ClassVar[Any] = list[bytes | SharedChunk | None]


class Put(Call, tag="put"):
    """Payload frames: one per entry of ``heads``."""

    heads: list[bytes]
    RESULT: ClassVar[Any] = list[bool]


class Contains(Call, tag="contains"):
    keys: list[bytes]
    RESULT: ClassVar[Any] = list[bool]


class Delete(Call, tag="delete"):
    keys: list[bytes]


class DaemonStats(msgspec.Struct, frozen=True):
    """What ``stats`` returns: per-tier counters (fastest first) and the index's stats."""

    tiers: dict[str, TierStats]
    index: dict[str, Any]
    address: str
    pid: int


class Stats(Call, tag="stats"):
    RESULT: ClassVar[Any] = DaemonStats


class Admin(Call, tag="admin"):
    """Call ``method`` of the daemon's ``CacheAdmin`` (only names in its REMOTE_METHODS)."""

    method: str
    kwargs: dict[str, Any] = {}
    RESULT: ClassVar[Any] = Any


AnyCall = (Ping | Lookup | Commit | Drop | RecordHits | ReportLoad | Get | Put | Contains
           | Delete | Stats | Admin)


class Envelope(msgspec.Struct, array_like=True, frozen=True):
    version: int
    request_id: int
    call: AnyCall


class Reply(msgspec.Struct, array_like=True, frozen=True):
    request_id: int
    error: str | None
    """``"TypeName: message"`` of what the call raised on the daemon; None on success."""
    result: msgspec.Raw
    """The call's return value, msgpack of the call's ``RESULT`` type."""



# ---------------------------------------------------------------------- msgpack rules
def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError(f"numpy arrays of dtype {obj.dtype} cannot be sent to the daemon")
        array = np.ascontiguousarray(obj)
        return msgspec.msgpack.Ext(NDARRAY_EXT, _ARRAY_ENCODER.encode(
            (array.dtype.str, array.shape, array.data.cast("B") if array.size else b"")))
    if isinstance(obj, np.generic):
        return obj.item()
    raise NotImplementedError(f"{type(obj).__name__} is not sendable to the daemon")


def _ext_hook(code: int, data: memoryview) -> Any:
    if code != NDARRAY_EXT:
        raise ValueError(f"unknown msgpack extension code {code}")
    dtype, shape, raw = _ARRAY_DECODER.decode(data)
    return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape)


def _dec_hook(kind: type, obj: Any) -> Any:
    if kind is np.ndarray and isinstance(obj, np.ndarray):
        return obj
    raise NotImplementedError(f"cannot decode {type(obj).__name__} as {kind}")


_ARRAY_ENCODER = msgspec.msgpack.Encoder()
_ARRAY_DECODER = msgspec.msgpack.Decoder(tuple[str, tuple[int, ...], bytes])
ENCODER = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
"""Encodes envelopes, replies and results (thread-safe: msgspec encoders hold no state
between calls)."""
ENVELOPE_DECODER = msgspec.msgpack.Decoder(Envelope, ext_hook=_ext_hook, dec_hook=_dec_hook)
REPLY_DECODER = msgspec.msgpack.Decoder(Reply)
_RESULT_DECODERS: dict[Any, msgspec.msgpack.Decoder] = {}


def decode_result(result_type: Any, raw: bytes | memoryview) -> Any:
    """A reply's ``result`` as ``result_type`` (a call's ``RESULT``)."""
    decoder = _RESULT_DECODERS.get(result_type)
    if decoder is None:
        decoder = _RESULT_DECODERS[result_type] = msgspec.msgpack.Decoder(
            result_type, ext_hook=_ext_hook, dec_hook=_dec_hook)
    return decoder.decode(raw)


# ---------------------------------------------------------------------- chunk frames
def chunk_parts(chunks: Sequence[KVChunk]) -> tuple[list[bytes], list[memoryview]]:
    """Codec headers and payload views of ``chunks`` (raw codec: the payloads are the
    tensors' memory, valid while the chunks live and are not modified)."""
    heads, payloads = [], []
    for chunk in chunks:
        head, payload = TRANSPORT_CODEC.encode_parts(chunk)
        heads.append(head)
        payloads.append(payload)
    return heads, payloads


def chunk_from_parts(head: bytes | memoryview, payload: memoryview) -> KVChunk:
    """Verify and rebuild a chunk; its tensor views ``payload``. Raises
    ``ChunkCorruptError`` when header and payload do not checksum together."""
    return TRANSPORT_CODEC.decode_parts(head, payload)
