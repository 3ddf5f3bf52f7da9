"""cpm.matching at its edges: tiny federations, the caller's exploration weight, and the
documented tie-breaking. Written for behaviour mutation testing found unpinned
(docs/reliability.md, "Mutation testing")."""

from __future__ import annotations

import numpy as np
import pytest

from cpm import features as F
from cpm.bandit import LinUCB
from cpm.matching import exact_match, fast_match, greedy_disjoint

from .test_matching import BANDIT, _profiles

MATCHERS = [exact_match, fast_match]


@pytest.mark.parametrize("match", MATCHERS)
@pytest.mark.parametrize("n, k_pairs", [(0, 3), (1, 3), (6, 0)])
def test_nothing_to_match_is_an_empty_result(match, n: int, k_pairs: int) -> None:
    res = match(_profiles(6, 1)[:n], BANDIT, 3, k_pairs)
    assert len(res) == 0 and res.triples() == [] and res.total() == 0.0
    assert res.teacher.dtype == np.int64 and res.score.size == 0 and isinstance(res.stats, dict)


@pytest.mark.parametrize("match", MATCHERS)
def test_two_agents_make_one_pair(match) -> None:
    res = match(_profiles(2, 2), BANDIT, 3, 5)
    assert len(res) == 1 and {int(res.teacher[0]), int(res.student[0])} == {0, 1}


@pytest.mark.parametrize("match", MATCHERS)
@pytest.mark.parametrize("beta", [0.0, 2.5])
def test_the_callers_exploration_weight_is_used(match, beta: float) -> None:
    """``beta`` overrides the bandit's schedule (β = 0: pure exploitation)."""
    P = _profiles(60, 3)
    res = match(P, BANDIT, 3, 30, beta=beta, exact_below=0) if match is fast_match else match(P, BANDIT, 3, 30,
                                                                                               beta=beta)
    X = F.batch_context(P, res.teacher, res.student, res.arm)
    np.testing.assert_allclose(res.score, BANDIT.mean(X) + beta * BANDIT.width(X), rtol=1e-9, atol=1e-12)


def test_greedy_takes_a_single_candidate_and_honours_a_zero_budget() -> None:
    one = (np.array([0]), np.array([1]), np.array([2]), np.array([0.5]), 2)
    res = greedy_disjoint(*one, 1)
    assert res.triples() == [(0, 1, 2)] and res.total() == 0.5 and res.arm.dtype == np.int64
    assert len(greedy_disjoint(*one, 0)) == 0  # a strategy capped at 0 pairs gets none


def test_greedy_breaks_ties_by_candidate_order() -> None:
    """Module docstring: highest score first, ties by (t, s, k) ascending — so the same
    round gives the same pairs on every run and every platform."""
    m = 20
    t, s = (a.ravel() for a in np.meshgrid(np.arange(m), np.arange(m), indexing="ij"))
    keep = t != s
    t, s = t[keep], s[keep]
    k = np.zeros_like(t)
    score = np.random.default_rng(0).integers(0, 3, t.size).astype(float)  # many ties
    used, expected = set(), []
    for i in sorted(range(t.size), key=lambda i: (-score[i], i)):
        if t[i] not in used and s[i] not in used:
            used |= {int(t[i]), int(s[i])}
            expected.append((int(t[i]), int(s[i]), 0))
    assert greedy_disjoint(t, s, k, score, m, m // 2).triples() == expected[: m // 2]


def test_a_fresh_bandit_still_matches_every_agent() -> None:
    """θ = 0 on a new CPM: every score ties on the mean, the width decides, and the
    greedy still pairs everyone it can."""
    P = _profiles(10, 4)
    res = exact_match(P, LinUCB(F.context_dim(3)), 3, 5)
    assert len(res) == 5 and np.unique(np.concatenate([res.teacher, res.student])).size == 10
