"""The straightforward O(N²) matcher: the baseline ``benchmarks/cpm_scale.py`` times
``fast_match`` against and the tests' reference. Python loops, a φ and a UCB per
(teacher, student, arm), then the same greedy. Never used by the node."""

from __future__ import annotations

import numpy as np

from cpm import features as F
from cpm.bandit import LinUCB
from cpm.matching import MatchResult, _beta, _empty


def naive_match(
    profiles: np.ndarray,
    bandit: LinUCB,
    n_arms: int,
    k_pairs: int,
    *,
    beta: float | None = None,
    teachers: np.ndarray | None = None,
) -> MatchResult:
    """The straightforward O(N²) baseline: Python loops, per-pair φ and UCB.

    ``teachers`` restricts the outer loop (the benchmark times a subsample and
    extrapolates); the greedy then runs over the candidates that were scored.
    """
    P = np.asarray(profiles, dtype=float)
    n = P.shape[0]
    b = _beta(bandit, beta)
    theta, Ainv = bandit.theta, bandit.Ainv
    cands: list[tuple[float, int, int, int]] = []
    outer = range(n) if teachers is None else [int(x) for x in teachers]
    for ti in outer:
        for si in range(n):
            if si == ti:
                continue
            for k in range(n_arms):
                phi = F.pair_context(P[ti], P[si], k, n_arms)
                ucb = float(theta @ phi) + b * float(np.sqrt(max(phi @ Ainv @ phi, 0.0)))
                cands.append((-ucb, ti, si, k))
    cands.sort()
    used: set[int] = set()
    out: list[tuple[int, int, int, float]] = []
    for neg, ti, si, k in cands:
        if len(out) >= min(k_pairs, n // 2):
            break
        if ti in used or si in used:
            continue
        used.update((ti, si))
        out.append((ti, si, k, -neg))
    if not out:
        return _empty({"candidates": len(cands)})
    arr = np.asarray(out)
    return MatchResult(
        arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64), arr[:, 2].astype(np.int64), arr[:, 3],
        {"candidates": len(cands), "passes": 1},
    )
