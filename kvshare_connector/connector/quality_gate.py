"""The quality gate: stop claiming where shadow checks say reuse has gone wrong.

A shadow check (:mod:`kvshare.connector.shadow`) compares a request's fill with full
compute on the prompt's last positions. It *passes* when the fill's most likely next
token agrees with full compute's on at least ``min_top1`` of those positions and the mean
KL of the next-token distributions is at most ``max_kl``. The gate keeps one window of
pass/fail per *domain*: the model (every check) and each sharing scope (its requests'
checks). A domain's *score* is the share of passing checks in its last ``window`` checks.

* An open domain closes when its window holds at least ``min_checks`` checks and its
  score is below ``floor``: its claims stop (a scope's own; every claim, for the model).
* A closed domain reopens after ``reopen_checks`` consecutive passing checks; its window
  then restarts from those passes, so the failures that closed it cannot close it again.

Which requests are checked: a deterministic ``sample_rate`` share of claimed requests
(by a hash of the request id, :func:`sampled`), and, while a domain is closed, the
requests it withheld (the claim they would have made), one at a time per scope.

The scheduler writes the latest scores (:meth:`QualityGate.snapshot`) to
``<home>/quality/<model id>.json``, where ``kvshare inspect stats`` reads them
(:mod:`kvshare.quality_scores`).

Scopes are bounded (``max_scopes``, least recently checked open scopes forgotten first;
closed ones are kept until they reopen). Not thread-safe: the scheduler calls it from
vLLM's EngineCore thread only.
"""

from __future__ import annotations

import time
import zlib
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass

# Re-exported for the scheduler, which writes the scores.


@dataclass(frozen=True)
class GateSettings:
    """Pass criteria of one check and the gate's rules (see the module docstring)."""

    min_top1: float
    max_kl: float
    """Nats."""
    window: int
    floor: float
    """0 never closes (scores are still kept)."""
    min_checks: int
    reopen_checks: int
    max_scopes: int = 4096

    def __post_init__(self) -> None:
        if not (0.0 <= self.min_top1 <= 1.0 and self.max_kl >= 0.0 and self.window >= 1
                and 0.0 <= self.floor <= 1.0 and 1 <= self.min_checks <= self.window
                and self.reopen_checks >= 1 and self.max_scopes >= 1):
            raise ValueError(f"invalid gate settings {self}")

    def passes(self, top1: float, kl: float) -> bool:
        return top1 >= self.min_top1 and kl <= self.max_kl


@dataclass(frozen=True)
class Check:
    """One shadow check's numbers."""

    passed: bool
    top1: float
    kl: float


@dataclass
class DomainScore:
    """One domain's recent checks and gate state."""

    window: deque[Check]
    open: bool = True
    passes_since_closed: int = 0
    checks: int = 0
    """Checks ever recorded (not only the window's)."""

    @property
    def score(self) -> float | None:
        """Share of passing checks in the window; None before the first check."""
        return _mean(c.passed for c in self.window)

    def as_dict(self) -> dict[str, object]:
        return {"score": self.score, "checks_in_window": len(self.window),
                "checks": self.checks, "gate": "open" if self.open else "closed",
                "top1_mean": _mean(c.top1 for c in self.window),
                "kl_mean": _mean(c.kl for c in self.window)}


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


@dataclass(frozen=True)
class GateChange:
    """A domain closed (``opened=False``) or reopened, with the score that decided it."""

    scope: str | None
    """The scope, or None for the model."""
    opened: bool
    score: float


class QualityGate:
    """Scores per domain and which domains may claim (see the module docstring)."""

    def __init__(self, settings: GateSettings) -> None:
        self.settings = settings
        self._model = DomainScore(deque(maxlen=settings.window))
        self._scopes: OrderedDict[str, DomainScore] = OrderedDict()

    def is_open(self, scope: str) -> bool:
        """Whether a request of ``scope`` may be claimed: the model and its scope are open."""
        domain = self._scopes.get(scope)
        return self._model.open and (domain is None or domain.open)

    def record(self, scope: str, top1: float, kl: float) -> list[GateChange]:
        """Add one check of a request of ``scope``; return the gate changes it caused."""
        check = Check(self.settings.passes(top1, kl), top1, kl)
        domain = self._scopes.get(scope)
        if domain is None:
            domain = self._scopes[scope] = DomainScore(deque(maxlen=self.settings.window))
        self._scopes.move_to_end(scope)
        changes = []
        for name, target in ((None, self._model), (scope, domain)):
            changed = self._record(target, check)
            if changed is not None:
                changes.append(GateChange(name, *changed))
        self._forget_old_scopes()
        return changes

    def scores(self) -> dict[str, object]:
        """``{"model": ..., "scopes": {scope: ...}}``: each domain's score, window size,
        checks, gate state and mean top-1 agreement and KL over its window."""
        return {"model": self._model.as_dict(),
                "scopes": {name: domain.as_dict() for name, domain in self._scopes.items()}}

    def snapshot(self, model_id: str) -> dict[str, object]:
        """:meth:`scores` with the model id, the settings and the time, for
        :func:`kvshare.quality_scores.write_scores` (taken on the caller's thread, written
        on another)."""
        return {"model_id": model_id, "updated_at": time.time(),
                "settings": asdict(self.settings), **self.scores()}

    def _record(self, domain: DomainScore, check: Check) -> tuple[bool, float] | None:
        """Add ``check`` to ``domain``; (opened, score) if that closed or reopened it."""
        settings = self.settings
        domain.checks += 1
        domain.window.append(check)
        if domain.open:
            if (settings.floor > 0 and len(domain.window) >= settings.min_checks
                    and domain.score < settings.floor):
                domain.open, domain.passes_since_closed = False, 0
                return False, domain.score
            return None
        domain.passes_since_closed = domain.passes_since_closed + 1 if check.passed else 0
        if domain.passes_since_closed < settings.reopen_checks:
            return None
        score = domain.score
        domain.open = True
        # The window restarts from the passes that reopened the domain (the latest ones).
        passes = list(domain.window)[-settings.reopen_checks:]
        domain.window.clear()
        domain.window.extend(passes)
        return True, score

    def _forget_old_scopes(self) -> None:
        """Drop the least recently checked open scopes beyond ``max_scopes``."""
        excess = len(self._scopes) - self.settings.max_scopes
        if excess <= 0:
            return
        for name in [n for n, d in self._scopes.items() if d.open][:excess]:
            del self._scopes[name]


def sampled(req_id: str, rate: float) -> bool:
    """Whether request ``req_id`` is shadow-checked at ``rate`` (deterministic per id, so a
    rate of 1 checks every request and 0 none)."""
    return zlib.crc32(req_id.encode()) < rate * (1 << 32)
