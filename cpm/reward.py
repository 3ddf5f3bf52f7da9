"""The one implementation of the reward (Eq. 3): what a feedback is worth to the matchmaker.

Why its own module: the round engine scores every feedback, whatever the strategy (the
export compares runs of all strategies by it), and LinUCB learns from the same numbers.
Before, the engine built a dummy one-dimensional bandit just to reach this code for the
strategies without one. Formula, constants and the failure rule: docs/cpm.md §Reward
and docs/matchmaking.md §LinUCB.
"""

from __future__ import annotations

import math

DELTA_PER_KB = 1e-6  # δ = 1e-3 per MB of knowledge received (design §4)


class RunningZ:
    """Welford running mean/variance; z-scores a stream of scalars."""

    __slots__ = ("n", "mean", "m2", "eps")

    def __init__(self, eps: float = 1e-6) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.eps = eps

    def push(self, x: float) -> None:
        self.n += 1
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (x - self.mean)

    @property
    def var(self) -> float:
        """Population variance of everything pushed so far (0 before two samples)."""
        return self.m2 / self.n if self.n > 1 else 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def z(self, x: float) -> float:
        return (x - self.mean) / (self.std + self.eps)


class Reward:
    """Eq. 3 and its normalisation: raw r = γ·(L_pre − L_post) − δ·KB, z-scored by the
    running statistics ``z`` of every raw reward seen so far.

    A failed exchange (``ok = False``) learned nothing: raw r = −δ·KB, and its z-score is
    clipped at 0, so a failure never looks like a success to a learner.

    The statistics are state: a LinUCB owns its ``Reward`` (its θ is fitted to z-scores
    relative to them, and they are saved with it); the round engine keeps a standalone
    one for the strategies that do not learn."""

    __slots__ = ("gamma", "delta_per_kb", "z")

    def __init__(self, gamma: float = 1.0, delta_per_kb: float = DELTA_PER_KB, eps: float = 1e-6) -> None:
        self.gamma = float(gamma)
        self.delta_per_kb = float(delta_per_kb)
        self.z = RunningZ(eps)

    def raw(self, loss_pre: float, loss_post: float, kb: float, ok: bool = True) -> float:
        """Eq. 3 before normalisation; pure (the statistics are not touched).

        δ defaults to 1e-3 per **MB** (design §4), i.e. 1e-6 per KB: with the paper's
        1e-3 per KB a 20 KB package costs more than a typical validation-loss gain, and
        the bandit learns "send small packages" instead of "pick good partners"."""
        gain = float(loss_pre) - float(loss_post) if ok else 0.0
        return self.gamma * gain - self.delta_per_kb * float(kb)

    def observe(self, loss_pre: float, loss_post: float, kb: float, ok: bool = True) -> tuple[float, float]:
        """One feedback: push its raw reward into the statistics, then return
        (raw, z-score); a failure's z-score is clipped at 0."""
        r = self.raw(loss_pre, loss_post, kb, ok)
        self.z.push(r)
        zr = self.z.z(r)
        return r, zr if ok else min(zr, 0.0)
