"""Teacher-forced quality: how far a system's next-token distributions are from full compute.

Greedy outputs of a small model flip on one token, after which two answers share little;
scoring them (ROUGE-L) is too noisy to rank systems on a few dozen prompts. Teacher
forcing removes the feedback: every system reads the *same* continuation (full compute's
greedy tokens, appended to the prompt) and is scored on its next-token distribution at
each position of it, against full compute's at the same position.

Each engine returns, per position, its ``top_k`` most likely tokens with their
log-probabilities plus the forced token's (vLLM's ``prompt_logprobs``). The two rows of a
position are compared on the partition of the vocabulary into the tokens both rows name
(always at least the forced token) and one *rest* bucket holding everything else:

* ``kl``: KL(full || system) over that partition, in nats. It is exact for the partition
  and, by the log-sum inequality, a lower bound of the KL over the whole vocabulary; the
  bound is tight when ``rest_mass`` (full compute's probability outside the shared tokens)
  is small.
* ``top1``: the system's own most likely token is full compute's most likely token.

(vLLM 0.32 can also score fixed token ids per row, ``prompt_logprob_token_ids``, which
would give the system's log-probabilities of exactly full compute's top tokens; it needs
the V2 model runner, which refuses to start without Triton ("Model Runner V2 requires
Triton"), and Triton has no CPU backend in this install.)
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MIN_MASS = 1e-12
"""Floor for a bucket's probability inside a log: rounding can leave ``1 - sum`` at zero or
a hair below it while the other row still has mass there."""


@dataclass(frozen=True)
class Row:
    """One engine's scores at one forced position: token id -> log-probability (nats)."""

    logprobs: dict[int, float]

    @classmethod
    def of(cls, ids: Sequence[int], logprobs: Sequence[float]) -> Row:
        if len(ids) != len(logprobs) or not ids:
            raise ValueError(f"a row needs as many log-probabilities as ids (at least one), "
                             f"got {len(ids)} ids and {len(logprobs)} values")
        return cls(dict(zip((int(i) for i in ids), (float(v) for v in logprobs))))

    @property
    def mass(self) -> float:
        """Probability of the row's tokens together."""
        return sum(math.exp(v) for v in self.logprobs.values())

    @property
    def top1(self) -> int:
        """The most likely token (the row holds the engine's top tokens, so this is its
        own argmax over the vocabulary)."""
        return max(self.logprobs, key=self.logprobs.__getitem__)


@dataclass(frozen=True)
class PositionScore:
    kl: float
    """KL(reference || system) in nats over the shared tokens plus one rest bucket."""
    top1: bool
    rest_mass: float
    """The reference's probability outside the shared tokens."""


def score_position(reference: Row, system: Row) -> PositionScore:
    """Compare two engines' rows of one position (see the module docstring)."""
    shared = reference.logprobs.keys() & system.logprobs.keys()
    if not shared:
        raise ValueError("the rows share no token; both must include the forced token")
    kl = 0.0
    ref_in = sys_in = 0.0
    for token in shared:
        p, q = math.exp(reference.logprobs[token]), math.exp(system.logprobs[token])
        ref_in, sys_in = ref_in + p, sys_in + q
        if p > 0.0:
            kl += p * (reference.logprobs[token] - system.logprobs[token])
    ref_rest, sys_rest = max(0.0, 1.0 - ref_in), max(0.0, 1.0 - sys_in)
    if ref_rest > 0.0:
        kl += ref_rest * math.log(max(ref_rest, MIN_MASS) / max(sys_rest, MIN_MASS))
    return PositionScore(max(0.0, kl), system.top1 == reference.top1, ref_rest)


@dataclass(frozen=True)
class ForcedScore:
    """Means over every forced position of every prompt (positions weigh equally)."""

    kl_mean: float
    top1_agree: float
    rest_mass_mean: float
    positions: int


def summarize(scores: Iterable[PositionScore]) -> ForcedScore | None:
    """The means of ``scores``; None when there is none."""
    scores = list(scores)
    if not scores:
        return None
    return ForcedScore(kl_mean=statistics.fmean(s.kl for s in scores),
                       top1_agree=statistics.fmean(s.top1 for s in scores),
                       rest_mass_mean=statistics.fmean(s.rest_mass for s in scores),
                       positions=len(scores))
