"""fast_match at N = 2000 against the exact greedy (all 4·10⁶ ordered pairs scored).

Why a separate file: it is the one matching test that scores millions of pairs (≈5 s of
CPU). The prefilter's approximations (|x − y|, JS, the missing exploration term, the
top-k lists) are invisible at small N; the total reached by greedy at N = 2000 is
what the scale path must preserve.
"""

from __future__ import annotations

import numpy as np

from benchmarks.cpm_scale import population  # the benchmark's population: one builder
from cpm import features as F
from cpm.bandit import LinUCB
from cpm.matching import _all_pairs, _best_arm, exact_pair_scores, fast_match, greedy_disjoint

N = 2000


def _bandit(seed: int = 7, updates: int = 1500) -> LinUCB:
    """Fit on a compatibility reward with an arm-dependent term, so the best arm varies
    from pair to pair (the case the per-arm prefilter exists for)."""
    rng = np.random.default_rng(seed)
    P = population(300, seed + 1)
    b = LinUCB(F.context_dim(3))
    t = rng.integers(0, 300, updates)
    s = (t + rng.integers(1, 300, updates)) % 300
    k = rng.integers(0, 3, updates)
    X = F.batch_context(P, t, s, k)
    lack, gap, same = X[:, F.OFF_LACK], X[:, F.OFF_GAP], X[:, F.OFF_SAME]
    r = lack * (0.5 + gap) + 0.3 * same + (k == 2) * (0.4 * same - 0.2) + 0.1 * rng.standard_normal(updates)
    for x, ri in zip(X, r):
        b.update(x, float(ri))
    return b


def test_fast_match_close_to_exact_greedy_at_2000() -> None:
    P = population(N, 3)
    bandit = _bandit()
    beta = bandit.beta()
    t, s = _all_pairs(N)
    sc = exact_pair_scores(P, t, s, bandit, 3, beta)
    tb, sb, kb, best = _best_arm(t, s, sc)
    exact = greedy_disjoint(tb, sb, kb, best, N, N // 2)
    # Upper bound on any perfect matching: each pair is worth at most the mean of its
    # two agents' best partner scores (either role).
    M = np.full((N, N), -np.inf)
    M[t, s] = best
    ub = 0.5 * np.maximum(M.max(axis=1), M.max(axis=0)).sum()
    fast = fast_match(P, bandit, 3, N // 2, beta=beta)
    assert len(fast) == len(exact) == N // 2
    agents = np.concatenate([fast.teacher, fast.student])
    assert np.unique(agents).size == N  # disjoint, everyone matched
    # reported scores are the exact UCB of the reported (t, s, k)
    np.testing.assert_allclose(fast.score, sc[fast.teacher * (N - 1) + fast.student - (fast.student > fast.teacher),
                                               fast.arm], rtol=1e-12)
    # measured 0.988 (d = 112, λ = 0.3, topk 8, widen 4; 0.970 with the 105-dim φ before
    # the lineage flag); the arm-averaged prefilter without the width term reached 0.84
    assert fast.total() >= 0.97 * exact.total()
    assert fast.total() <= ub + 1e-9


def test_a_new_or_barely_trained_bandit_still_pairs_everyone_at_2000() -> None:
    """θ = 0 (a new CPM's round 1) and θ after one noisy update: before coverage passes
    the shortlists collapsed onto a few hub agents (99 of 1000 pairs with θ = 0)."""
    P = population(N, 4)
    fresh = LinUCB(F.context_dim(3))
    once = LinUCB(F.context_dim(3))
    once.update(F.pair_context(P[0], P[1], 0, 3), 1.0)
    for bandit in (fresh, once):
        res = fast_match(P, bandit, 3, N // 2)
        assert len(res) == N // 2
        pairs = np.concatenate([res.teacher, res.student])
        assert np.unique(pairs).size == N  # disjoint, every agent once


def test_coverage_pairs_give_each_agent_its_own_partners() -> None:
    from cpm.matching import coverage_pairs

    t, s = coverage_pairs(50, 4)
    assert t.size == 2 * 4 * 50 and not np.any(t == s)
    assert len(set(zip(t.tolist(), s.tolist()))) == t.size  # each ordered pair once
    assert np.all(np.bincount(t, minlength=50) == 8) and np.all(np.bincount(s, minlength=50) == 8)
    t, s = coverage_pairs(3, 8)  # k is capped: no pair twice, no self-pair
    assert set(zip(t.tolist(), s.tolist())) == {(0, 1), (1, 2), (2, 0), (1, 0), (2, 1), (0, 2)}
