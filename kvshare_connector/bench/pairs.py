"""Prompt pairs (earlier prompt, similar later prompt) for the quality benchmark.

Two sources, both real ShareGPT first user turns:

* ``similar``: a prompt of the paper's similar stream and its nearest *earlier* prompt of
  that stream (cosine similarity >= ``min_similarity``), kept only when enough of the later
  prompt's tokens also occur, in order, in the earlier one (``min_token_overlap``, the
  share of tokens in ``difflib`` matching blocks) so that a KV cache can reuse something.
* ``edit``: a real prompt and a copy with one paper-style edit (KVShare's "analyse Jon
  Snow" vs "analyse Lin Daiyu"): swap a name, a number or a date, insert a clause, or
  delete a clause. Edits are pure functions of (text, random.Random) so pairs are
  deterministic for a seed.

The quality benchmark draws both kinds by seed (:func:`draw`, :func:`edit_pairs`), so a
seed names a fixed set of pairs, and the pairs of tuning seeds can be left out of a
held-out seed's set.

Nothing here imports torch or vLLM.
"""

from __future__ import annotations

import difflib
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

EDIT_KINDS = ("name", "number", "date", "insert", "delete")

NAMES = ("Jon Snow", "Lin Daiyu", "Maria Garcia", "Kenji Tanaka", "Amara Okafor",
         "Olivia Brown", "Lars Nilsson", "Priya Sharma", "Mateo Rossi", "Fatima Zahra")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
CLAUSES = (
    "Keep in mind that the audience has no technical background.",
    "Assume the budget was cut by a third last quarter.",
    "This is for a team that works remotely across three time zones.",
    "Please answer as if you were writing for a newspaper.",
    "Note that the deadline has been moved forward by one week.",
    "Consider that the previous attempt failed because of poor planning.",
)

# A capitalised word that is not the first word of a sentence or line: a likely name.
_PROPER = re.compile(r"(?<=[a-z,;:] )[A-Z][a-z]{2,}\b(?! [A-Z])")
_NUMBER = re.compile(r"(?<![\w.])\d{1,6}(?:\.\d+)?(?![\w.]\d)")
_YEAR = re.compile(r"\b(?:19|20)\d{2}\b")
_MONTH = re.compile(r"\b(?:" + "|".join(MONTHS) + r")\b")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_NOT_NAMES = frozenset(
    "The This That These Those There Then When What Which Who Why How And But For With "
    "From Into About After Before Please Also However Here Our Your Their His Her Its "
    "I'm I'll I've Monday Tuesday Wednesday Thursday Friday Saturday Sunday English "
    "Python Java JavaScript SQL API Google Microsoft Amazon Apple".split()
) | frozenset(MONTHS)


@dataclass(frozen=True)
class Edit:
    """One edit applied to a text: what changed, for the report and the tests."""

    kind: str
    old: str
    """The replaced or deleted text ('' for insertions)."""
    new: str
    """The inserted or replacement text ('' for deletions)."""
    text: str
    """The whole edited text."""


@dataclass(frozen=True)
class Pair:
    """An earlier prompt (sent first, so it is cached) and a similar later prompt."""

    pair_id: str
    kind: str
    """``similar`` or ``edit:<kind>``."""
    earlier: str
    later: str
    detail: str = ""
    """For edits: ``'old' -> 'new'``; for similar pairs: the cosine similarity."""


# ------------------------------------------------------------------------ edits
def swap_name(text: str, rng: random.Random) -> Edit | None:
    """Replace every occurrence of one capitalised mid-sentence word by a person's name.

    Words that recur are preferred: in prompts, names recur and capitalised titles don't.
    """
    counts: dict[str, int] = {}
    for match in _PROPER.finditer(text):
        if match.group(0) not in _NOT_NAMES:
            counts[match.group(0)] = counts.get(match.group(0), 0) + 1
    if not counts:
        return None
    most = max(counts.values())
    candidates = sorted(word for word, n in counts.items() if n == most)
    old = rng.choice(candidates)
    new = rng.choice([n for n in NAMES if n != old and n not in text])
    edited = re.sub(rf"\b{re.escape(old)}\b", new, text)
    return Edit("name", old, new, edited)


def swap_number(text: str, rng: random.Random) -> Edit | None:
    """Replace one number by a different number of the same shape (digits, decimals)."""
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return None
    match = rng.choice(matches)
    old = match.group(0)
    new = old
    while new == old:
        if "." in old:
            whole, frac = old.split(".")
            whole_new = rng.randint(0, max(9, 10 ** len(whole) - 1))
            new = f"{whole_new}.{rng.randint(0, 10 ** len(frac) - 1):0{len(frac)}d}"
        else:
            low = 10 ** (len(old) - 1) if len(old) > 1 else 0
            new = str(rng.randint(low, 10 ** len(old) - 1))
    return Edit("number", old, new, text[: match.start()] + new + text[match.end():])


def swap_date(text: str, rng: random.Random) -> Edit | None:
    """Replace one year (1900-2099) or month name by another."""
    matches = list(_YEAR.finditer(text)) + list(_MONTH.finditer(text))
    if not matches:
        return None
    match = rng.choice(sorted(matches, key=lambda m: m.start()))
    old = match.group(0)
    if old.isdigit():
        new = str(int(old) + rng.choice([-3, -2, -1, 1, 2, 3]))
    else:
        new = rng.choice([m for m in MONTHS if m != old])
    return Edit("date", old, new, text[: match.start()] + new + text[match.end():])


def insert_clause(text: str, rng: random.Random) -> Edit | None:
    """Insert a sentence after a sentence end (not after the last one)."""
    ends = [m.start() for m in _SENTENCE_END.finditer(text)]
    if not ends:
        return None
    at = rng.choice(ends)
    new = " " + rng.choice([c for c in CLAUSES if c not in text])
    return Edit("insert", "", new.strip(), text[:at] + new + text[at:])


def delete_clause(text: str, rng: random.Random) -> Edit | None:
    """Delete one sentence that is neither the first nor the last (needs >= 3)."""
    bounds = [0] + [m.end() for m in _SENTENCE_END.finditer(text)] + [len(text)]
    middle = [(bounds[i], bounds[i + 1]) for i in range(1, len(bounds) - 2)]
    middle = [(a, b) for a, b in middle if text[a:b].strip()]
    if not middle:
        return None
    start, end = rng.choice(middle)
    return Edit("delete", text[start:end].strip(), "", text[:start] + text[end:])


EDITS: dict[str, Callable[[str, random.Random], Edit | None]] = {
    "name": swap_name, "number": swap_number, "date": swap_date,
    "insert": insert_clause, "delete": delete_clause,
}


# ------------------------------------------------------------------------ pairs
def token_overlap(earlier: Sequence[int], later: Sequence[int]) -> float:
    """Share of ``later``'s tokens inside blocks it has in common, in order, with ``earlier``."""
    if not len(later):
        return 0.0
    matcher = difflib.SequenceMatcher(None, list(earlier), list(later), autojunk=False)
    return sum(block.size for block in matcher.get_matching_blocks()) / len(later)


def similar_pairs(texts: Sequence[str], token_ids: Sequence[np.ndarray], embeddings: np.ndarray,
                  count: int, *, min_tokens: int, max_tokens: int,
                  min_similarity: float = 0.95, min_token_overlap: float = 0.5) -> list[Pair]:
    """The first ``count`` (nearest earlier, later) pairs of a stream, in stream order
    (``count >= len(texts)``: all of them, for :func:`draw`).

    ``texts``/``token_ids``/``embeddings`` are the stream's prompts in arrival order.
    Each prompt is used at most once (as earlier or later), so pairs are independent.
    """
    from kvshare.bench.workload import nearest_earlier

    if count <= 0:
        return []
    neighbours, sims = nearest_earlier(np.asarray(embeddings, np.float32), 1)
    used: set[int] = set()
    pairs: list[Pair] = []
    for later, (earlier, sim) in enumerate(zip(neighbours[:, 0], sims[:, 0])):
        if earlier < 0 or sim < min_similarity or later in used or earlier in used:
            continue
        if not all(min_tokens <= len(token_ids[i]) <= max_tokens for i in (earlier, later)):
            continue
        if token_overlap(token_ids[earlier], token_ids[later]) < min_token_overlap:
            continue
        used.update((int(earlier), later))
        pairs.append(Pair(f"similar-{len(pairs)}", "similar", texts[earlier], texts[later],
                          f"cosine {sim:.3f}"))
        if len(pairs) == count:
            break
    return pairs


def draw(pairs: Sequence[Pair], count: int, seed: int, exclude: set[str] | None = None
         ) -> list[Pair]:
    """``count`` of ``pairs`` drawn by ``seed`` (uniformly, without replacement), none
    with a prompt in ``exclude``, in their original order. The same seed always draws the
    same pairs, so tuning and held-out seeds name fixed pair sets."""
    exclude = exclude or set()
    allowed = [i for i, pair in enumerate(pairs)
               if pair.earlier not in exclude and pair.later not in exclude]
    chosen = sorted(random.Random(seed).sample(allowed, min(count, len(allowed))))
    return [pairs[i] for i in chosen]


def edit_pairs(texts: Sequence[str], token_counts: Sequence[int], count: int, seed: int, *,
               min_tokens: int, max_tokens: int, kinds: Sequence[str] = EDIT_KINDS,
               exclude: set[str] | None = None) -> list[Pair]:
    """``count`` (original, edited) pairs, edit kinds taken round-robin, texts drawn by seed.

    A text where the wanted edit does not apply (no number, no date...) is skipped.
    The same ``seed`` always gives the same pairs.
    """
    unknown = set(kinds) - set(EDITS)
    if unknown:
        raise ValueError(f"unknown edit kind(s) {sorted(unknown)}; choose from {EDIT_KINDS}")
    if count <= 0:
        return []
    rng = random.Random(seed)
    exclude = exclude or set()
    order = [i for i in range(len(texts))
             if min_tokens <= token_counts[i] <= max_tokens and texts[i] not in exclude]
    rng.shuffle(order)
    pairs: list[Pair] = []
    pending = list(order)
    for kind in (kinds[i % len(kinds)] for i in range(count * 50)):
        for at, index in enumerate(pending):
            edit = EDITS[kind](texts[index], rng)
            if edit is not None and edit.text != texts[index]:
                del pending[at]
                pairs.append(Pair(f"edit-{len(pairs)}", f"edit:{kind}", texts[index], edit.text,
                                  f"{edit.old!r} -> {edit.new!r}"))
                break
        if len(pairs) == count or not pending:
            break
    return pairs
