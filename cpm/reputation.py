"""Teacher reputation: stop assigning a teacher whose knowledge measurably harms students.

Per teacher *peer ID*, for every strategy (the strategies score profiles, not
identities, so a poisoner with an attractive profile would keep being explored). Each ok
feedback is one delivery with gain g = L_pre − L_post; a teacher is quarantined when a
sign test says it harms significantly more often than a coin flip and on average, or
when at most one of its last ``window`` deliveries was harmless (a "sleeper"). An
all-harmful teacher is stopped at its 8th delivery (α = 2⁻⁸); honest teachers' false
quarantine probability is computed exactly (``false_quarantine_probability``). Only an
operator releases a teacher, and a release is a fresh start. The rule, its bounds and why
each choice: docs/matchmaking.md §Teacher reputation; measured: docs/reliability.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog

log = structlog.get_logger(__name__)

STATE_VERSION = 1
_TOL = 1.0 + 1e-9  # 2⁻⁸ computed in log space may land an ulp above α = 2⁻⁸


@dataclass(frozen=True, slots=True)
class ReputationPolicy:
    """Quarantine thresholds (docs/threat-model.md T19). ``alpha`` = 0 disables rule 1,
    ``window`` = 0 disables rule 2; both 0 switch quarantine off."""

    alpha: float = 2.0**-8
    window: int = 16

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha < 0.5:
            raise ValueError("alpha must be in [0, 0.5)")
        if self.window < 0 or self.window == 1:
            raise ValueError("window must be 0 (off) or ≥ 2")

    @property
    def bound(self) -> int:
        """B: deliveries after which an always-harmful teacher is surely quarantined."""
        b = math.ceil(math.log2(1.0 / self.alpha)) if self.alpha > 0 else 0
        if self.window:
            b = min(b, self.window) if b else self.window
        return b


def binomial_tail_half(n: int, h: int) -> float:
    """P[Bin(n, ½) ≥ h], in log space (n may reach 10⁵) and O(√n) terms: for h > n/2
    the terms fall geometrically, so the sum stops once they no longer matter."""
    if h <= 0:
        return 1.0
    if h > n:
        return 0.0
    if 2 * h <= n:  # symmetry: P[X ≥ h] = 1 − P[X ≤ h − 1] = 1 − P[X ≥ n − h + 1]
        return 1.0 - _tail_sum(n, n - h + 1)
    return _tail_sum(n, h)


def _tail_sum(n: int, h: int) -> float:
    base = math.lgamma(n + 1) - n * math.log(2.0)
    total = 0.0
    for k in range(h, n + 1):
        term = math.exp(base - math.lgamma(k + 1) - math.lgamma(n - k + 1))
        total += term
        if 2 * k > n and term < total * 1e-15:
            break
    return min(1.0, total)


@dataclass(slots=True)
class TeacherRecord:
    """Evidence about one teacher. ``run``: harmful deliveries since the last harmless
    one; ``prev_run``: the harmful run before that harmless one (from the first delivery
    if it was the first harmless). ``quarantined_round`` 0 = not quarantined."""

    deliveries: int = 0
    harmful: int = 0
    gain_sum: float = 0.0
    run: int = 0
    prev_run: int = 0
    quarantined_round: int = 0
    reason: str = ""

    @property
    def quarantined(self) -> bool:
        return self.quarantined_round > 0

    @property
    def mean_gain(self) -> float:
        return self.gain_sum / self.deliveries if self.deliveries else 0.0

    def to_list(self) -> list[Any]:
        return [self.deliveries, self.harmful, self.gain_sum, self.run, self.prev_run, self.quarantined_round,
                self.reason]

    @classmethod
    def from_list(cls, v: list[Any]) -> TeacherRecord:
        return cls(int(v[0]), int(v[1]), float(v[2]), int(v[3]), int(v[4]), int(v[5]), str(v[6]))

    def log_released(self, teacher: str, admin: str) -> None:
        """``cpm.teacher.released`` for this (cleared) record, once its release is durable —
        one place for the event's keys, whether the running node or ``--offline`` released."""
        log.info("cpm.teacher.released", teacher=teacher, admin=admin, round=self.quarantined_round,
                 reason=self.reason, deliveries=self.deliveries, harmful=self.harmful, mean_gain=self.mean_gain)

    def harmless_in_window(self, window: int) -> int:
        """How many of the last ``window`` deliveries were not harmful, capped at 2."""
        if self.deliveries < window:
            return 2
        if self.run >= window:
            return 0
        return 1 if self.run + 1 + self.prev_run >= window else 2


@dataclass(frozen=True, slots=True)
class Verdict:
    """Returned by ``record`` when that delivery quarantined the teacher."""

    teacher: str
    round: int
    reason: str  # "sign_test" | "recent_window"
    deliveries: int
    harmful: int
    mean_gain: float
    p_value: float


class Reputation:
    """Per-teacher delivery statistics and the quarantine rule (module docstring)."""

    def __init__(self, policy: ReputationPolicy | None = None) -> None:
        self.policy = policy or ReputationPolicy()
        self.teachers: dict[str, TeacherRecord] = {}
        self.released: dict[str, int] = {}  # teacher → time (ms) of its latest release

    # ---- evidence ---------------------------------------------------------------------
    def record(self, teacher: str, gain: float, round_: int) -> Verdict | None:
        """Count one delivery (gain = L_pre − L_post of an ok exchange). Returns a
        Verdict when it tips the teacher into quarantine, else None."""
        if not math.isfinite(gain):
            raise ValueError("gain must be finite")
        rec = self.teachers.setdefault(teacher, TeacherRecord())
        rec.deliveries += 1
        rec.gain_sum += float(gain)
        if gain < 0:
            rec.harmful += 1
            rec.run += 1
        else:
            rec.prev_run, rec.run = rec.run, 0
        if rec.quarantined:
            return None  # late feedback of an already quarantined teacher: evidence only
        p = binomial_tail_half(rec.deliveries, rec.harmful)
        reason = ""
        if self.policy.alpha > 0 and p <= self.policy.alpha * _TOL and rec.gain_sum < 0:
            reason = "sign_test"
        elif self.policy.window and rec.harmless_in_window(self.policy.window) <= 1:
            reason = "recent_window"
        if not reason:
            return None
        rec.quarantined_round = max(1, int(round_))
        rec.reason = reason
        return Verdict(teacher, rec.quarantined_round, reason, rec.deliveries, rec.harmful, rec.mean_gain, p)

    def is_quarantined(self, teacher: str) -> bool:
        rec = self.teachers.get(teacher)
        return rec is not None and rec.quarantined

    def quarantined(self) -> dict[str, TeacherRecord]:
        return {t: r for t, r in self.teachers.items() if r.quarantined}

    def release(self, teacher: str, at_ms: int) -> TeacherRecord | None:
        """Operator decision: lift the quarantine and start the evidence afresh (module
        docstring). Returns the record it cleared, or None — and changes nothing — when
        the teacher is not quarantined (unknown, or evidence still being gathered)."""
        rec = self.teachers.get(teacher)
        if rec is None or not rec.quarantined:
            return None
        del self.teachers[teacher]
        self.released[teacher] = int(at_ms)
        return rec

    def predates_release(self, teacher: str, issued_at_ms: int) -> bool:
        """True for a delivery whose directive was issued no later than the teacher's
        latest release: evidence about knowledge the operator already overrode."""
        released = self.released.get(teacher)
        return released is not None and issued_at_ms <= released

    # ---- state ------------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "teachers": {t: r.to_list() for t, r in self.teachers.items()},
                "released": dict(self.released)}

    def load_state(self, state: dict[str, Any]) -> None:
        """``released`` is optional: states saved before releases existed have none."""
        if int(state.get("version", 0)) != STATE_VERSION:
            raise ValueError(f"unknown reputation state version {state.get('version')!r}")
        self.teachers = {str(t): TeacherRecord.from_list(v) for t, v in dict(state["teachers"]).items()}
        self.released = {str(t): int(ms) for t, ms in dict(state.get("released", {})).items()}

    def rows(self) -> list[dict[str, Any]]:
        """Scalar rows per teacher with evidence, for operators (the admin ``quarantine``
        listing shows the quarantined ones). ``p_value`` = P[Bin(n, ½) ≥ harmful], the
        sign test of rule 1; ``harmful_run`` = harmful deliveries since the last harmless
        one (rule 2); ``released_at`` = the teacher's previous release (ms), if any."""
        return [
            {"teacher": t, "quarantined": r.quarantined, "quarantined_round": r.quarantined_round or None,
             "reason": r.reason or None, "deliveries": r.deliveries, "harmful": r.harmful,
             "mean_gain": r.mean_gain, "p_value": binomial_tail_half(r.deliveries, r.harmful),
             "harmful_run": r.run, "released_at": self.released.get(t)}
            for t, r in sorted(self.teachers.items())
        ]


def reputation_from_saved(saved: tuple[str, dict[str, Any]] | None) -> Reputation:
    """The reputation inside ``Store.load_bandit_state()`` (empty when none is saved):
    what the admin CLI reads to show quarantined teachers without the running node."""
    rep = Reputation()
    if saved is not None and "reputation" in saved[1]:
        rep.load_state(saved[1]["reputation"])
    return rep


def false_quarantine_probability(p_harm: float, n_max: int, policy: ReputationPolicy | None = None) -> float:
    """Exact P(rule 1's sign test or rule 2 fires within ``n_max`` deliveries) for a
    teacher whose deliveries are independently harmful with probability ``p_harm``,
    ignoring rule 1's Σg < 0 condition (so an upper bound for the full rule).

    Dynamic programme over (harmful count h, run, prev_run) — exactly the state
    ``TeacherRecord`` keeps — vectorised with numpy; n_max in the hundreds takes
    milliseconds.
    """
    pol = policy or ReputationPolicy()
    w = pol.window
    cap = w if w else 1  # run lengths ≥ w behave alike; without rule 2 they are not tracked
    # hmin[n]: fewest harmful of n deliveries that trip rule 1 (the tail falls with h)
    hmin = [n_max + 2] * (n_max + 1)
    if pol.alpha > 0:
        h = 0
        for n in range(1, n_max + 1):
            h = max(h, n // 2)
            while h <= n and binomial_tail_half(n, h) > pol.alpha * _TOL:
                h += 1
            hmin[n] = h
    H = np.arange(n_max + 2)[:, None, None]
    a = np.arange(cap + 1)[None, :, None]
    b = np.arange(cap + 1)[None, None, :]
    P = np.zeros((n_max + 2, cap + 1, cap + 1))  # P[h, run, prev_run] of not yet fired
    P[0, 0, 0] = 1.0
    fired = 0.0
    for n in range(1, n_max + 1):
        nxt = np.zeros_like(P)
        # harmful: h + 1, run + 1 (capped), prev_run unchanged
        moved = P[:-1] * p_harm
        nxt[1:, 1:, :] += moved[:, :-1, :]
        nxt[1:, cap, :] += moved[:, cap, :]
        # harmless: run → 0, prev_run ← run (capped)
        nxt[:, 0, :] += (P * (1.0 - p_harm)).sum(axis=2)
        fire = H >= hmin[n]
        if w:
            had_harmless = (n - (a + 0 * b)) > 0  # run < n: a harmless delivery exists
            fire = fire | (n >= w) & ((a >= w) | (had_harmless & (a + 1 + b >= w)))
        fired += float(nxt[np.broadcast_to(fire, nxt.shape)].sum())
        nxt[np.broadcast_to(fire, nxt.shape)] = 0.0
        P = nxt
    return fired
