"""Greedy disjoint matching: exact vs naive vs fast, surrogate decomposition, invariants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpm import features as F
from cpm.bandit import LinUCB
from cpm.matching import (
    _arm_surrogates,
    _PairScorer,
    _surrogate_factors,
    exact_match,
    exact_pair_scores,
    fast_match,
)
from cpm.matching_naive import naive_match


def _profiles(n: int, seed: int, alpha: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    P = np.zeros((n, 32))
    P[np.arange(n), rng.integers(0, 8, n)] = 1
    P[:, 8:20] = rng.random((n, 12))
    P[:, 20:32] = rng.dirichlet(np.full(12, alpha), n)
    return P


def _trained(seed: int = 0, n_updates: int = 800) -> LinUCB:
    rng = np.random.default_rng(seed)
    P = _profiles(120, seed + 1)
    b = LinUCB(F.context_dim(3))
    t = rng.integers(0, 120, n_updates)
    s = (t + rng.integers(1, 120, n_updates)) % 120
    k = rng.integers(0, 3, n_updates)
    X = F.batch_context(P, t, s, k)
    r = X[:, F.OFF_LACK] * (0.5 + X[:, F.OFF_GAP]) + 0.3 * X[:, F.OFF_SAME] + 0.1 * k + 0.1 * rng.standard_normal(n_updates)
    for x, ri in zip(X, r):
        b.update(x, float(ri))
    return b


BANDIT = _trained()


def test_exact_scores_equal_bandit_ucb() -> None:
    P = _profiles(20, 2)
    rng = np.random.default_rng(3)
    t = rng.integers(0, 20, 50)
    s = (t + rng.integers(1, 20, 50)) % 20
    sc = exact_pair_scores(P, t, s, BANDIT, 3, BANDIT.beta())
    for k in range(3):
        ref = BANDIT.ucb(F.batch_context(P, t, s, np.full(50, k)))
        np.testing.assert_allclose(sc[:, k], ref, rtol=1e-10, atol=1e-12)


def test_fast_equals_exact_equals_naive_small_n() -> None:
    for seed in range(3):
        P = _profiles(14, 10 + seed)
        e = exact_match(P, BANDIT, 3, 7)
        n = naive_match(P, BANDIT, 3, 7)
        f = fast_match(P, BANDIT, 3, 7, topk=13, exact_below=0)  # shortlist code path, nothing pruned
        assert e.triples() == n.triples() == f.triples()
        np.testing.assert_allclose(e.score, n.score, rtol=1e-9)


def test_surrogate_exact_for_one_hot_histograms() -> None:
    """With one-hot histograms, equal arm blocks and no lack·same weight, the bilinear
    prefilter equals the exact mean term (checks the decomposition algebra)."""
    b = LinUCB(F.context_dim(3))
    rng = np.random.default_rng(5)
    theta = rng.standard_normal(b.d)
    blk = theta[F.OFF_ARM : F.OFF_ARM + F.ARM_FEATS].copy()
    blk[4] = 0.0  # lack·same is the one term approximated by its mean
    for k in range(3):
        theta[F.OFF_ARM + F.ARM_FEATS * k : F.OFF_ARM + F.ARM_FEATS * (k + 1)] = blk
    b._theta = theta
    P = _profiles(25, 6)
    P[:, 20:32] = np.eye(12)[rng.integers(0, 12, 25)]
    L, R, _, _ = _surrogate_factors(P, theta, 3)
    S = L.astype(float) @ R.T.astype(float)
    tt, ss = np.meshgrid(np.arange(25), np.arange(25), indexing="ij")
    m = tt != ss
    exact = F.batch_context(P, tt[m], ss[m], np.zeros(m.sum(), dtype=np.int64)) @ theta
    np.testing.assert_allclose(S[m], exact, rtol=1e-4, atol=1e-4)


def test_pruned_fast_match_close_to_exact_greedy() -> None:
    for seed in range(2):
        P = _profiles(300, 20 + seed)
        e = exact_match(P, BANDIT, 3, 150)
        f = fast_match(P, BANDIT, 3, 150, topk=8, exact_below=0)
        assert len(f) == len(e) == 150
        assert f.total() >= 0.97 * e.total()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 40), k_pairs=st.integers(0, 30), seed=st.integers(0, 10_000),
       topk=st.integers(1, 6), alpha=st.sampled_from([0.05, 1.0, 10.0]))
def test_matching_invariants(n: int, k_pairs: int, seed: int, topk: int, alpha: float) -> None:
    P = _profiles(n, seed, alpha) if n else np.zeros((0, 32))
    for res in (exact_match(P, BANDIT, 3, k_pairs), fast_match(P, BANDIT, 3, k_pairs, topk=topk, exact_below=4)):
        t, s = res.teacher.tolist(), res.student.tolist()
        agents = t + s
        assert len(res) <= k_pairs
        assert len(set(agents)) == len(agents)  # disjoint
        assert all(0 <= a < n for a in agents)
        assert all(a != b for a, b in zip(t, s))
        assert all(0 <= k < 3 for k in res.arm.tolist())
        assert len(res) == min(k_pairs, n // 2)  # greedy (with refill) never stops early


def test_arm_surrogates_exact_for_one_hot_histograms() -> None:
    """Each arm's bilinear surrogate L[k]·R equals that arm's exact mean term for one-hot
    histograms when lack·same has no weight (the arms may differ arbitrarily)."""
    b = LinUCB(F.context_dim(3))
    rng = np.random.default_rng(8)
    theta = rng.standard_normal(b.d)
    for k in range(3):
        theta[F.OFF_ARM + F.ARM_FEATS * k + 4] = 0.0
    P = _profiles(25, 9)
    P[:, 20:32] = np.eye(12)[rng.integers(0, 12, 25)]
    La, R = _arm_surrogates(P, theta, 3)
    tt, ss = np.meshgrid(np.arange(25), np.arange(25), indexing="ij")
    m = tt != ss
    for k in range(3):
        exact = F.batch_context(P, tt[m], ss[m], np.full(m.sum(), k)) @ theta
        S = La[k].astype(float) @ R.T.astype(float)
        np.testing.assert_allclose(S[m], exact, rtol=1e-4, atol=1e-4)


def test_scorer_quadratic_form_matches_batch_context() -> None:
    """The per-agent decomposition of φᵀA⁻¹φ (and of the UCB) is exact, also for a
    discounted bandit and for histograms that are empty or do not sum to one."""
    rng = np.random.default_rng(11)
    b = LinUCB(F.context_dim(3), discount=0.97, lam=0.5, beta0=2.0)
    P = _profiles(30, 12)
    P[3, 20:32] = 0.0
    P[4, 20:32] *= 3.0
    for _ in range(200):
        t, s = rng.integers(0, 30, 2)
        if t != s:
            b.update(F.pair_context(P[t], P[s], int(rng.integers(0, 3))), float(rng.standard_normal()))
    t = rng.integers(0, 30, 300)
    s = (t + rng.integers(1, 30, 300)) % 30
    sc = _PairScorer(P, b, 3, b.beta())
    q = sc.scores(t, s, quad_only=True)
    for k in range(3):
        X = F.batch_context(P, t, s, np.full(300, k))
        np.testing.assert_allclose(q[:, k], np.einsum("ij,ij->i", X @ b.Ainv, X), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(sc.scores(t, s)[:, 1], b.ucb(F.batch_context(P, t, s, np.ones(300, dtype=int))),
                               rtol=1e-9, atol=1e-12)
    Wt, Ws, _ = sc.width_factors()
    bil = sc.q_t[t] + sc.q_s[s] + 2.0 * np.einsum("ij,ij->i", sc.c_t[t], P[s])
    approx = np.einsum("ij,ij->i", Wt[t].astype(float), Ws[s].astype(float))  # float32 factors
    np.testing.assert_allclose(approx, bil, rtol=1e-4, atol=1e-5)


def test_blas_thread_cap_does_not_change_the_matching() -> None:
    P = _profiles(200, 13)
    a = fast_match(P, BANDIT, 3, 100, exact_below=0, blas_threads=1)
    b = fast_match(P, BANDIT, 3, 100, exact_below=0, blas_threads=None)
    assert a.triples() == b.triples()


def test_fast_match_scores_are_exact_ucb_of_its_triples() -> None:
    P = _profiles(400, 14)
    f = fast_match(P, BANDIT, 3, 200, exact_below=0)
    ref = BANDIT.ucb(F.batch_context(P, f.teacher, f.student, f.arm))
    np.testing.assert_allclose(f.score, ref, rtol=1e-9, atol=1e-12)
    assert len(f) == 200


# ---- the simulator's ceiling: exact optimum vs greedy (cpm/optimum.py) ----------------


def _brute_optimum(W: np.ndarray, k_pairs: int) -> float:
    """Best total of at most ``k_pairs`` disjoint pairs, W[a, b] the pair's best value
    (either direction), by enumerating every matching."""
    def best(free: tuple[int, ...], left: int) -> float:
        if left == 0 or len(free) < 2:
            return 0.0
        a, rest = free[0], free[1:]
        out = best(rest, left)  # a stays unpaired
        for j, b in enumerate(rest):
            out = max(out, W[a, b] + best(rest[:j] + rest[j + 1 :], left - 1))
        return out

    return best(tuple(range(W.shape[0])), k_pairs)


def _candidates(G: np.ndarray) -> tuple[np.ndarray, ...]:
    """All ordered pairs of a (K, N, N) value array, best arm per pair (canonical order)."""
    from cpm.matching import _all_pairs

    t, s = _all_pairs(G.shape[1])
    sc = G[:, t, s].T
    k = sc.argmax(axis=1)
    return t, s, k, sc[np.arange(k.size), k]


def test_optimum_is_exact_and_never_below_greedy_on_random_instances() -> None:
    from cpm.matching import greedy_disjoint
    from cpm.optimum import optimal_disjoint

    rng = np.random.default_rng(0)
    strictly = 0
    for _ in range(150):
        n = int(rng.integers(2, 9))
        k_pairs = int(rng.integers(1, n // 2 + 2))  # includes K_p < N/2 (cardinality-limited) and ≥ N/2
        G = rng.normal(0.2, 1.0, (2, n, n))
        cand = _candidates(G)
        opt = optimal_disjoint(*cand, n_agents=n, k_pairs=k_pairs)
        greedy = greedy_disjoint(*cand, n_agents=n, k_pairs=k_pairs)
        agents = opt.teacher.tolist() + opt.student.tolist()
        assert len(opt) <= k_pairs and len(set(agents)) == len(agents)
        np.testing.assert_allclose(opt.score, G[opt.arm, opt.teacher, opt.student])  # real (t, s, k) values
        W = G.max(axis=0)
        assert opt.total() == pytest.approx(_brute_optimum(np.maximum(W, W.T), k_pairs), abs=1e-9)
        assert opt.total() >= greedy.total() - 1e-12
        strictly += opt.total() > greedy.total() + 1e-9
    assert strictly > 10  # greedy is often not optimal on such instances


def test_optimum_beats_greedy_where_greedy_takes_the_best_pair_first() -> None:
    from cpm.matching import greedy_disjoint
    from cpm.optimum import optimal_disjoint
    from cpm.strategies import OracleStrategy

    G = np.full((1, 4, 4), -1.0)
    G[0, 0, 1] = 10.0  # greedy takes it first, which leaves only 2–3
    G[0, 0, 2] = G[0, 3, 1] = 9.0  # the optimum pairs 0→2 and 3→1
    G[0, 2, 3] = 1.0
    cand = _candidates(G)
    assert greedy_disjoint(*cand, n_agents=4, k_pairs=2).total() == 11.0
    opt = optimal_disjoint(*cand, n_agents=4, k_pairs=2)
    assert opt.total() == 18.0 and sorted(opt.triples()) == [(0, 2, 0), (3, 1, 0)]
    assert optimal_disjoint(*cand, n_agents=4, k_pairs=1).triples() == [(0, 1, 0)]  # one pair: the best one
    assert OracleStrategy(matrix_fn=lambda k: G[k], n_arms=1).match(4, 2).total() == 18.0
    assert OracleStrategy(matrix_fn=lambda k: G[k], n_arms=1, solver="greedy").match(4, 2).total() == 11.0
    assert len(optimal_disjoint(*_candidates(-np.ones((1, 4, 4))), n_agents=4, k_pairs=2)) == 0  # nothing helps


def test_dropping_lineage_is_exactly_the_layout_1_bandit() -> None:
    """``LinUCBStrategy(drop="lineage")`` (the sim's ablation) scores every candidate like
    a bandit that never had the lineage dims, after the same feedback."""
    from cpm.strategies import LinUCBStrategy

    rng = np.random.default_rng(2)
    P = _profiles(16, 21)
    ids = [f"a{i}" for i in range(16)]
    strat = LinUCBStrategy(drop="lineage", beta0=0.7, reinvert_every=7)
    ref = LinUCB(F.v1_context_dim(3), beta0=0.7)
    keep = F.v1_dims(3)
    for rd in range(6):
        for p in strat.select(P, ids, rd, 8, rng):
            loss_post = 1.0 - float(rng.normal(0.01, 0.01))
            strat.update(p, strat.reward.observe(1.0, loss_post, 3.0)[1])
            ref.update(p.context[keep], ref.reward.observe(1.0, loss_post, 3.0)[1])
    t = np.repeat(np.arange(16), 15)
    s = np.concatenate([np.delete(np.arange(16), i) for i in range(16)])
    got = exact_pair_scores(P, t, s, strat.bandit, 3, strat.bandit.beta())
    for k in range(3):
        X = F.batch_context(P, t, s, np.full(t.size, k))
        np.testing.assert_allclose(got[:, k], ref.ucb(X[:, keep]), rtol=1e-8, atol=1e-10)
    assert np.any(F.batch_context(P, t, s, np.zeros(t.size, dtype=int))[:, F.OFF_LIN])  # the dims were there
