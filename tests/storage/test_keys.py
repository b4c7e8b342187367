"""Chunk keys name whole prefixes of one scope: equal up to a chunk's end <=> equal key."""

import pytest

from kvshare.storage.keys import KEY_BYTES, ROOT_PARENT, chunk_key, chunk_keys, chunk_spans


def test_keys_are_16_bytes_and_chain_from_the_root():
    tokens = list(range(10))
    keys = chunk_keys("m", tokens, 4, scope="")
    assert [len(k) for k in keys] == [KEY_BYTES] * 3
    assert keys[0] == chunk_key("m", ROOT_PARENT, tokens[0:4], scope="")
    assert keys[1] == chunk_key("m", keys[0], tokens[4:8], scope="")
    assert keys[2] == chunk_key("m", keys[1], tokens[8:10], scope="")


def test_shared_prefix_shares_keys_until_the_first_difference():
    a = list(range(100, 112))
    b = a.copy()
    b[6] = 999  # inside the second chunk
    ka, kb = chunk_keys("m", a, 4, scope=""), chunk_keys("m", b, 4, scope="")
    assert ka[0] == kb[0]
    assert ka[1] != kb[1]
    assert ka[2] != kb[2], "a later chunk with equal tokens but another prefix must differ"


def test_model_id_and_chunking_change_keys():
    tokens = list(range(8))
    assert chunk_keys("m1", tokens, 4, scope="") != chunk_keys("m2", tokens, 4, scope="")
    assert chunk_keys("m", tokens, 4, scope="")[0] != chunk_keys("m", tokens, 8, scope="")[0]
    # Length-prefixed model id: "ab" + tokens differs from "a" + ("b" + tokens).
    assert (chunk_key("ab", ROOT_PARENT, [1], scope="")
            != chunk_key("a", ROOT_PARENT, [ord("b"), 1], scope=""))


def test_spans_cover_every_token_once_and_only_the_last_is_short():
    assert chunk_spans(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_spans(8, 4) == [(0, 4), (4, 8)]
    assert chunk_spans(0, 4) == []


def test_bad_inputs_name_the_value():
    with pytest.raises(ValueError, match="-1"):
        chunk_keys("m", [1, -1], 4, scope="")
    with pytest.raises(ValueError, match="4294967296"):
        chunk_keys("m", [1 << 32], 4, scope="")
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1, got 0"):
        chunk_spans(4, 0)
    with pytest.raises(ValueError, match="parent key must be 16 bytes"):
        chunk_key("m", b"short", [1], scope="")


def test_scope_is_part_of_every_key():
    tokens = list(range(12))
    public, tenant_a, tenant_b = (chunk_keys("m", tokens, 4, scope=s) for s in ("", "a", "b"))
    assert not set(public) & set(tenant_a) and not set(tenant_a) & set(tenant_b)
    assert chunk_keys("m", tokens, 4, scope="a") == tenant_a
    # Length-prefixed scope: ("ab", "") and ("a", "b") cannot collide.
    assert (chunk_key("m", ROOT_PARENT, [1], scope="ab")
            != chunk_key("m", ROOT_PARENT, [1], scope="a", variant="b"))


def test_approximate_chunks_never_share_the_exact_keys():
    tokens = list(range(12))
    exact = chunk_keys("m", tokens, 4, scope="t")
    approx = chunk_keys("m", tokens, 4, scope="t", exact_tokens=6, variant="entry-1")
    assert approx[0] == exact[0], "a chunk inside the exact prefix keeps its content key"
    assert approx[1] != exact[1] and approx[2] != exact[2]
    other = chunk_keys("m", tokens, 4, scope="t", exact_tokens=6, variant="entry-2")
    assert other[0] == approx[0] and other[1:] != approx[1:]
    with pytest.raises(ValueError, match="non-empty variant"):
        chunk_keys("m", tokens, 4, scope="t", exact_tokens=6)
