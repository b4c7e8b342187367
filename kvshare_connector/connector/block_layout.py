"""Where vLLM's CPU KV write op puts each key and value element inside a cache block.

The layout inside a block depends on the ISA vLLM's CPU attention picked (``vec`` stores
a key block as ``[head_size, block_size]``; ``amx`` interleaves pairs of dims in keys and
pairs of tokens in values for its tiles; ...) and vLLM has no op that reads rows back.
Rather than transcribe each ISA's layout, :func:`derive_block_layout` asks the write op
itself: it writes rows whose values encode their own coordinates (key or value, token in
block, head, dim) and looks where each one landed. A coordinate is written as base-16
digits, one write per digit, each digit ``d`` stored as ``d + 1``: the values 1..16 are
exact in fp32, fp16 and bf16, and 0 means "never written".

Invariants, checked (else :class:`BlockLayoutError`): every element of a block is
written exactly once across keys and values; the layout repeats one block stride later;
the blocks in between stay untouched. Reads (:class:`RowGather`) take each row as one
strided view where the layout has one, else element by element.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

KVWrite = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
"""``write(keys, values, cache, slots)``: rows ``[n, num_kv_heads, head_size]`` into a
cache ``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` at int64 ``slots``."""

DIGIT_BASE = 16
"""Coordinates are written one base-16 digit at a time: values 1..16 are exact in bf16."""

WORD_DTYPES = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
"""Integer dtype of each word size in bytes: reads move words of one or more elements."""


class BlockLayoutError(RuntimeError):
    """The write op does not place every element of a block exactly once."""


@dataclass(frozen=True)
class RowGather:
    """Reads rows ``[n, num_kv_heads, head_size]`` of keys (or of values) out of a cache.

    When every token of a block lays out its (head, dim) elements in one strided pattern
    from its first element, a row is read as one strided view of that pattern (``dims``),
    moving ``word`` elements at a time where the pattern has contiguous runs; otherwise
    element by element (``offsets``).
    """

    offsets: torch.Tensor
    """int64 ``[block_size, num_kv_heads, head_size]``: element offset of (token of the
    block, head, dim) from the block's first element."""
    block_stride: int
    """Elements from one block to the next."""
    token_start: torch.Tensor
    """int64 ``[block_size]``: element offset of each token's (head 0, dim 0)."""
    dims: tuple[tuple[int, int], ...] | None
    """``(size, stride)`` in words, outermost first, of the pattern all tokens share (its
    row-major order is (head, dim)); None if there is no such strided pattern."""
    word: int
    """Elements per word read: divides the pattern's contiguous runs, at most 8 bytes."""

    @classmethod
    def from_offsets(cls, offsets: torch.Tensor, block_stride: int, itemsize: int
                     ) -> RowGather:
        """The fastest reader of ``offsets`` for a cache whose elements take ``itemsize``
        bytes."""
        per_token = offsets.reshape(offsets.shape[0], -1)
        token_start = per_token[:, 0].clone()
        pattern = per_token[0] - token_start[0]
        shared = torch.equal(per_token - token_start[:, None], pattern.expand_as(per_token))
        dims = _radix_dims(pattern) if shared else None
        if dims is None:
            return cls(offsets, block_stride, token_start, None, 1)
        word = _word_elements(dims, block_stride, token_start, itemsize)
        inner_size, inner_stride = dims[-1]
        dims_in_words = tuple((size, stride // word) for size, stride in dims[:-1])
        if inner_size > word:
            dims_in_words += ((inner_size // word, inner_stride),)
        return cls(offsets, block_stride, token_start, dims_in_words, word)

    def __call__(self, cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Rows at int64 ``slots`` of ``cache`` (laid out as derived), as a new tensor."""
        block_size, heads, head_size = self.offsets.shape
        blocks, tokens = slots // block_size, slots % block_size
        words = _words(cache, self.word)
        if self.dims is None:
            picked = words[(blocks * self.block_stride)[:, None, None] + self.offsets[tokens]]
            return picked.view(cache.dtype)
        starts = (blocks * self.block_stride + self.token_start[tokens]) // self.word
        sizes, strides = zip(*self.dims)
        span = sum((size - 1) * stride for size, stride in self.dims)
        rows = words.as_strided((words.numel() - span, *sizes), (1, *strides))
        return rows[starts].view(cache.dtype).view(slots.numel(), heads, head_size)


@dataclass(frozen=True)
class BlockLayout:
    """Where keys and values live in the blocks of a cache, and readers for both."""

    keys: RowGather
    values: RowGather

    def gather(self, cache: torch.Tensor, slots: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[n, num_kv_heads, head_size]`` at int64 ``slots``."""
        return self.keys(cache, slots), self.values(cache, slots)


def derive_block_layout(write: KVWrite, like: torch.Tensor) -> BlockLayout:
    """The layout ``write`` uses in caches of ``like``'s dtype, shape and strides.

    Raises:
        ValueError: a block of ``like`` is not contiguous (vLLM's CPU attention needs it).
        BlockLayoutError: an element is never written, written to two places or changed,
            a second block is laid out differently, or a block given no slot is touched.
    """
    _, num_kv_heads, block_size, two_heads = like.shape
    if not like[0].is_contiguous():
        raise ValueError(
            f"a KV cache block must be contiguous; cache {tuple(like.shape)} has strides "
            f"{like.stride()}"
        )
    row_shape = (block_size, num_kv_heads, two_heads // 2)
    block_elements = like[0].numel()
    coordinates = torch.arange(block_elements).view(2, *row_shape)
    # Blocks 0 and 2 of a 3-block scratch cache: block 1 must stay zero.
    slots = torch.cat((torch.arange(block_size), torch.arange(2 * block_size, 3 * block_size)))
    landed = torch.zeros(2, block_elements, dtype=torch.int64)
    place = 1
    while place < block_elements:
        digits = (coordinates // place % DIGIT_BASE + 1).to(like.dtype).repeat(1, 2, 1, 1)
        scratch = torch.empty_strided((3, *like.shape[1:]), like.stride(), dtype=like.dtype)
        scratch.zero_()
        write(digits[0], digits[1], scratch, slots)
        landed += _read_digits(scratch.reshape(3, block_elements)) * place
        place *= DIGIT_BASE
    for block, coordinates_landed in zip((0, 2), landed):
        counts = torch.bincount(coordinates_landed, minlength=block_elements)
        if counts.numel() != block_elements or not bool((counts == 1).all()):
            raise BlockLayoutError(
                f"the write put {int((counts > 1).sum())} of the {block_elements} elements "
                f"of block {block} in more than one place, and so others in none"
            )
    if not torch.equal(landed[0], landed[1]):
        raise BlockLayoutError("the write lays out block 2 differently from block 0")
    offsets = torch.empty(block_elements, dtype=torch.int64)
    offsets[landed[0]] = torch.arange(block_elements)
    keys, values = offsets.view(2, *row_shape)
    return BlockLayout(RowGather.from_offsets(keys, like.stride(0), like.element_size()),
                       RowGather.from_offsets(values, like.stride(0), like.element_size()))


def _word_elements(dims: list[tuple[int, int]], block_stride: int,
                   token_start: torch.Tensor, itemsize: int) -> int:
    """Most elements (a power of 2, at most 8 bytes) that a strided read can move as one
    word: the pattern's innermost dim is a contiguous run they divide, as they divide
    every other stride and every token's start."""
    inner_size, inner_stride = dims[-1]
    word = 1
    while True:
        wider = 2 * word
        if (inner_stride != 1 or wider * itemsize > 8 or inner_size % wider
                or any(stride % wider for _, stride in dims[:-1]) or block_stride % wider
                or bool((token_start % wider).any())):
            return word
        word = wider


def _words(cache: torch.Tensor, word: int) -> torch.Tensor:
    """1-D view of ``cache``'s memory from its first element to its last, in words of
    ``word`` elements (gaps between blocks included, never read)."""
    elements = (cache.shape[0] - 1) * cache.stride(0) + cache[0].numel()
    words = cache.view(WORD_DTYPES[word * cache.element_size()])
    return words.as_strided((elements // word,), (1,))


def _read_digits(scratch: torch.Tensor) -> torch.Tensor:
    """int64 ``[2, block_elements]``: the digits found in blocks 0 and 2 of ``scratch``
    (``[3, block_elements]``, block 1 given no slot), checked to be digits written."""
    values = scratch.to(torch.float64)
    if bool(values[1].any()):
        raise BlockLayoutError(
            f"the write touched {int((values[1] != 0).sum())} elements of a block it was "
            "given no slot in"
        )
    written = values[0::2]
    unwritten = int((written == 0).sum())
    if unwritten:
        raise BlockLayoutError(
            f"the write left {unwritten} of the {written.numel()} elements of 2 blocks "
            "unwritten"
        )
    is_digit = (written >= 1) & (written <= DIGIT_BASE) & (written == written.round())
    if not bool(is_digit.all()):
        raise BlockLayoutError(
            f"the write changed {int((~is_digit).sum())} of the values 1..{DIGIT_BASE} "
            "it was given"
        )
    return written.to(torch.int64) - 1


def _radix_dims(pattern: torch.Tensor) -> list[tuple[int, int]] | None:
    """``(size, stride)`` dims, outermost first, of a strided view whose element ``i`` in
    row-major order is at ``pattern[i]`` (``pattern[0] == 0``); None if there is none."""
    length = pattern.numel()
    dims: list[tuple[int, int]] = []
    period = 1
    while period < length:
        stride = int(pattern[period])
        steps = pattern[::period]
        off_line = (steps != torch.arange(steps.numel()) * stride).nonzero()
        run = int(off_line[0]) if off_line.numel() else steps.numel()
        size = max(size for size in range(1, run + 1) if steps.numel() % size == 0)
        if stride <= 0 or size == 1:
            return None
        dims.insert(0, (size, stride))
        period *= size
    index = torch.arange(length)
    rebuilt = torch.zeros(length, dtype=torch.int64)
    period = 1
    for size, stride in reversed(dims):
        rebuilt += index // period % size * stride
        period *= size
    return dims if torch.equal(rebuilt, pattern) else None
