"""One interface for every pairing strategy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cpm import features as F
from cpm.strategies import (
    DEFAULT_ARMS,
    STRATEGIES,
    Feedback,
    OracleStrategy,
    Pair,
    Strategy,
    make_strategy,
)


def _profiles(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    P = np.zeros((n, 32))
    P[np.arange(n), rng.integers(0, 8, n)] = 1
    P[:, 8:20] = rng.random((n, 12))
    P[:, 20:32] = rng.dirichlet(np.full(12, 0.3), n)
    return P


IDS = [f"peer-{i}" for i in range(10)]


def _oracle() -> OracleStrategy:
    return OracleStrategy(lambda t, s, k: float(t * 10 + s + k))


@pytest.mark.parametrize("name", ["linucb", "random", "heuristic", "local-only", "oracle"])
def test_p2p_strategies_return_disjoint_pairs(name: str) -> None:
    strat = _oracle() if name == "oracle" else make_strategy(name)
    assert isinstance(strat, Strategy) and not strat.centralized
    pairs = strat.select(_profiles(10, 0), IDS, 0, 4, np.random.default_rng(1))
    assert all(isinstance(p, Pair) for p in pairs)
    assert len(pairs) == (0 if name == "local-only" else 4)
    agents = [p.teacher for p in pairs] + [p.student for p in pairs]
    assert len(set(agents)) == len(agents) and set(agents) <= set(IDS)
    assert all(0 <= p.arm < len(DEFAULT_ARMS) for p in pairs)


def test_k_pairs_capped_by_population() -> None:
    pairs = make_strategy("random").select(_profiles(5, 0), IDS[:5], 0, 10, np.random.default_rng(0))
    assert len(pairs) == 2


def test_central_kd_is_marked_and_uses_best_hub() -> None:
    P = _profiles(10, 2)
    strat = make_strategy("central-kd")
    assert strat.centralized
    pairs = strat.select(P, IDS, 0, 5, np.random.default_rng(0))
    hub = IDS[int(np.argmax(P[:, F.PASS1]))]
    assert len(pairs) == 5 and {p.teacher for p in pairs} == {hub}
    assert hub not in {p.student for p in pairs}
    worst = IDS[int(np.argmin(P[:, F.PASS1]))]
    assert pairs[0].student == worst


def test_heuristic_picks_most_different_data_and_better_teacher() -> None:
    P = _profiles(4, 3)
    P[:, 20:32] = 0
    P[0, 20], P[1, 21], P[2, 20], P[3, 20] = 1, 1, 1, 1  # only 1 differs from the others
    P[2:, 21] = 0
    P[:, F.PASS1] = [0.2, 0.9, 0.5, 0.1]
    pairs = make_strategy("heuristic").select(P, IDS[:4], 0, 1, np.random.default_rng(0))
    assert len(pairs) == 1 and pairs[0].teacher == IDS[1]  # better performer teaches
    assert pairs[0].student in IDS[:4] and pairs[0].score == pytest.approx(1.0)


def test_oracle_scalar_and_matrix_paths_agree() -> None:
    rng = np.random.default_rng(4)
    G = rng.random((3, 10, 10))
    a = OracleStrategy(lambda t, s, k: float(G[k, t, s]))
    b = OracleStrategy(matrix_fn=lambda k: G[k])
    pa = a.select(_profiles(10, 0), IDS, 0, 5, rng)
    pb = b.select(_profiles(10, 0), IDS, 0, 5, rng)
    assert [(p.teacher, p.student, p.arm) for p in pa] == [(p.teacher, p.student, p.arm) for p in pb]
    best = np.unravel_index(np.argmax(np.where(np.eye(10, dtype=bool)[None], -1, G)), G.shape)
    assert (pa[0].teacher, pa[0].student, pa[0].arm) == (IDS[best[1]], IDS[best[2]], int(best[0]))
    with pytest.raises(ValueError):
        OracleStrategy()


def test_linucb_update_and_state_round_trip() -> None:
    strat = make_strategy("linucb", beta0=0.7)
    P = _profiles(10, 5)
    pairs = strat.select(P, IDS, 0, 5, np.random.default_rng(0))
    assert all(p.context is not None and p.context.shape == (F.context_dim(3),) for p in pairs)
    for p in pairs:
        strat.update(p, Feedback(1.0, 0.9, 3.0))
    strat.update(pairs[0], 0.5)  # an already-normalised reward is accepted too
    assert strat.bandit.t == 6
    state = json.loads(json.dumps(strat.to_state()))
    other = make_strategy("linucb")
    other.load_state(state)
    again = other.select(P, IDS, 1, 5, np.random.default_rng(0))
    first = strat.select(P, IDS, 1, 5, np.random.default_rng(0))
    assert [(p.teacher, p.student, p.arm) for p in again] == [(p.teacher, p.student, p.arm) for p in first]
    with pytest.raises(ValueError):
        strat.update(Pair("a", "b", 0, 0.0, None), 0.1)


def test_registry() -> None:
    assert set(STRATEGIES) == {"linucb", "random", "heuristic", "local-only", "central-kd", "oracle"}
    with pytest.raises(ValueError, match="unknown strategy"):
        make_strategy("fedavg")
    with pytest.raises(ValueError):
        make_strategy("random").select(np.zeros((3, 31)), IDS[:3], 0, 1, np.random.default_rng(0))
