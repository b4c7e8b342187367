"""Serde: lossless for every dtype and shape; any damaged byte is an error, never data."""

import pytest
import torch
from kv_samples import assert_same_chunk, make_chunks, random_kv

from kvshare.storage.chunk import DTYPE_CODES, KVChunk, KVLayout, split_prompt_kv
from kvshare.storage.codec import COMPRESSIONS, ChunkCodec, ChunkCorruptError

LAYOUTS = [
    KVLayout(num_layers=1, num_kv_heads=1, head_dim=1, dtype=dtype) for dtype in DTYPE_CODES
] + [KVLayout(num_layers=3, num_kv_heads=2, head_dim=64, dtype=dtype) for dtype in DTYPE_CODES]


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: f"{lay.dtype}-{lay.head_dim}")
@pytest.mark.parametrize("num_tokens", [1, 37])
def test_round_trip_is_bit_exact(compression, layout, num_tokens):
    # block_bytes=256 cuts the larger chunks into many frames, with a short last block.
    codec = ChunkCodec(compression, threads=2, block_bytes=256, parallel_min_bytes=0)
    (chunk,) = make_chunks(num_tokens, num_tokens, layout)
    assert_same_chunk(codec.decode(codec.encode(chunk)), chunk)


def test_decoded_tensor_has_the_header_shape_and_is_writable(codec):
    (chunk,) = make_chunks(5, 8)
    decoded = codec.decode(codec.encode(chunk))
    assert decoded.kv.shape == (2, 2, 5, 2, 8)
    decoded.kv.zero_()  # owns its memory: does not alias the encoded bytes


def test_non_contiguous_views_encode_their_values():
    kv = random_kv(KVLayout(2, 2, 8, torch.float16), 12)
    chunks = split_prompt_kv("m", kv, list(range(12)), 5, scope="")  # views into the middle of kv
    assert not chunks[1].kv.is_contiguous()
    codec = ChunkCodec("zstd-byteplane")
    for chunk in chunks:
        assert_same_chunk(codec.decode(codec.encode(chunk)), chunk)


def test_encoding_does_not_depend_on_threads():
    (chunk,) = make_chunks(64, 64)
    serial = ChunkCodec("zstd-byteplane", threads=1, block_bytes=512).encode(chunk)
    parallel = ChunkCodec("zstd-byteplane", threads=2, block_bytes=512,
                          parallel_min_bytes=0).encode(chunk)
    assert serial == parallel


def test_byteplane_beats_plain_zstd_on_bf16():
    # Gaussian bf16: exponents cluster (high plane compresses), mantissas do not.
    (chunk,) = make_chunks(256, 256, KVLayout(4, 2, 64, torch.bfloat16))
    sizes = {c: len(ChunkCodec(c).encode(chunk)) for c in COMPRESSIONS}
    assert sizes["zstd-byteplane"] < sizes["zstd"] < sizes["raw"]
    assert sizes["raw"] > chunk.nbytes  # raw = header + the tensor's bytes


@pytest.fixture
def encoded(codec):
    (chunk,) = make_chunks(40, 40)
    return codec.encode(chunk)


@pytest.mark.parametrize("where",
                         ["magic", "shape", "model id", "token ids", "middle", "last byte"])
def test_a_flipped_bit_anywhere_is_detected(codec, encoded, where):
    # Fixed header is 56 bytes, then the 10-byte model id, then 40 uint32 token ids.
    offsets = {"magic": 0, "shape": 8, "model id": 58, "token ids": 70,
               "middle": len(encoded) // 2, "last byte": len(encoded) - 1}
    damaged = bytearray(encoded)
    damaged[offsets[where]] ^= 0x10
    with pytest.raises(ChunkCorruptError):
        codec.decode(damaged)


@pytest.mark.parametrize("cut", [0, 10, 100, -1])
def test_truncated_or_padded_bytes_are_detected(codec, encoded, cut):
    with pytest.raises(ChunkCorruptError, match="bytes"):
        codec.decode(encoded[:cut])
    with pytest.raises(ChunkCorruptError, match="bytes"):
        codec.decode(encoded + b"\0")


def test_checksum_error_names_both_values(codec, encoded):
    damaged = bytearray(encoded)
    damaged[-3] ^= 1
    with pytest.raises(ChunkCorruptError,
                       match=r"checksum mismatch: stored 0x[0-9a-f]{16}, computed"):
        codec.decode(damaged)


def test_any_codec_reads_any_compression():
    (chunk,) = make_chunks(16, 16)
    reader = ChunkCodec("raw")
    for compression in COMPRESSIONS:
        assert_same_chunk(reader.decode(ChunkCodec(compression).encode(chunk)), chunk)


def test_invalid_settings_name_the_value():
    with pytest.raises(ValueError, match="'lz4'"):
        ChunkCodec("lz4")
    with pytest.raises(ValueError, match="level=0"):
        ChunkCodec(level=0)
    with pytest.raises(ValueError, match="block_bytes=12"):
        ChunkCodec(block_bytes=12)


def test_chunk_rejects_kv_that_does_not_match_its_header():
    (chunk,) = make_chunks(4, 4)
    with pytest.raises(ValueError, match=r"KV shape \(2, 2, 3, 2, 8\) does not match"):
        KVChunk(header=chunk.header, kv=chunk.kv[:, :, :3])
    with pytest.raises(ValueError, match="KV dtype torch.float32"):
        KVChunk(header=chunk.header, kv=chunk.kv.float())
    with pytest.raises(ValueError, match="not storable"):
        KVLayout(1, 1, 1, torch.complex64)
