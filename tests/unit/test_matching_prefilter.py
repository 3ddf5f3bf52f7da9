"""The clustered stage 1 (cpm/prefilter.py ``_row_lists_clustered``), forced at small N.

``fast_match`` uses it only above ``ann_above`` agents (12 000), where the exact greedy
is out of reach for a unit test; here it is forced with few columns per cluster, so it
really prunes, and the result must stay within the tolerance the N² prefilter is held
to (tests/unit/test_matching_scale.py) of the exact greedy.
"""

from __future__ import annotations

import numpy as np

from benchmarks.cpm_scale import population, trained_bandit
from cpm.matching import exact_match, fast_match
from cpm.prefilter import _kmeans

N = 600


def test_clustered_stage1_stays_close_to_the_exact_greedy() -> None:
    P = population(N, 11)
    bandit = trained_bandit()
    beta = bandit.beta()
    exact = exact_match(P, bandit, 3, N // 2, beta=beta)
    forced = fast_match(P, bandit, 3, N // 2, beta=beta, ann_above=0, ann_cols=96, ann_cluster=48)
    assert len(forced) == N // 2
    agents = np.concatenate([forced.teacher, forced.student])
    assert np.unique(agents).size == N  # disjoint, everyone matched
    assert 0 < forced.stats["shortlisted_pairs"] < N * (N - 1) // 4  # it did prune
    assert forced.total() >= 0.97 * exact.total()


def test_kmeans_is_deterministic_and_uses_every_row() -> None:
    X = np.random.default_rng(0).standard_normal((1000, 5)).astype(np.float32)
    labels, cent = _kmeans(X, 100)
    labels2, cent2 = _kmeans(X, 100)
    assert cent.shape == (10, 5) and labels.shape == (1000,)
    np.testing.assert_array_equal(labels, labels2)
    # each row is assigned to its nearest centroid
    d = ((X[:, None, :] - cent[None]) ** 2).sum(axis=2)
    np.testing.assert_allclose(d[np.arange(1000), labels], d.min(axis=1), rtol=1e-4, atol=1e-5)
