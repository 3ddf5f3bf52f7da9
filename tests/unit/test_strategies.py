"""One interface for every pairing strategy."""

from __future__ import annotations

import json

import numpy as np
import pytest
from structlog.testing import capture_logs

from cpm import features as F
from cpm.bandit import LinUCB
from cpm.strategies import (
    DEFAULT_ARM_INDEX,
    DEFAULT_ARMS,
    STRATEGIES,
    LinUCBStrategy,
    OracleStrategy,
    Pair,
    Strategy,
    StrategyStateError,
    make_strategy,
)
from protocol.errors import ConfigError


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
        strat.update(p, strat.reward.observe(1.0, 0.9, 3.0)[1])
    strat.update(pairs[0], 0.5)
    assert strat.bandit.t == 6 and strat.reward is strat.bandit.reward and strat.reward.z.n == 5
    state = json.loads(json.dumps(strat.to_state()))
    other = make_strategy("linucb")
    other.load_state(state)
    again = other.select(P, IDS, 1, 5, np.random.default_rng(0))
    first = strat.select(P, IDS, 1, 5, np.random.default_rng(0))
    assert [(p.teacher, p.student, p.arm) for p in again] == [(p.teacher, p.student, p.arm) for p in first]
    with pytest.raises(ValueError):
        strat.update(Pair("a", "b", 0, 0.0, None), 0.1)


def test_linucb_default_arm_learns_partners_only() -> None:
    """The variant gives every pair the default arm and learns in a one-arm φ (d = 92):
    the same partners as a 3-arm LinUCB would rank by that arm's block alone, no reward
    spent on other arms. Its state says so, and a 3-arm state is refused, not reused."""
    strat = make_strategy("linucb-default-arm")
    assert strat.name == "linucb-default-arm" and strat.bandit.d == F.context_dim(1) < F.context_dim(3)
    P = _profiles(10, 5)
    for r in range(3):
        pairs = strat.select(P, IDS, r, 5, np.random.default_rng(r))
        assert len(pairs) == 5 and {p.arm for p in pairs} == {DEFAULT_ARM_INDEX}
        assert all(p.context.shape == (F.context_dim(1),) for p in pairs)
        for p in pairs:
            strat.update(p, 1.0 if p.teacher == IDS[0] else -0.5)
    assert strat.bandit.t == 15
    state = json.loads(json.dumps(strat.to_state()))
    assert state["arm"] == DEFAULT_ARM_INDEX
    twin = make_strategy("linucb-default-arm")
    twin.load_state(state)
    assert [(p.teacher, p.student, p.arm) for p in twin.select(P, IDS, 3, 5, np.random.default_rng(3))] == \
        [(p.teacher, p.student, p.arm) for p in strat.select(P, IDS, 3, 5, np.random.default_rng(3))]
    with capture_logs() as logs, pytest.raises(StrategyStateError, match="every arm"):
        make_strategy("linucb").load_state(state)
    assert any(e["event"] == "cpm.strategy.state_refused" and e["reason"] == "arm" for e in logs)
    with pytest.raises(StrategyStateError, match="arm 1 only"):
        make_strategy("linucb-default-arm").load_state(make_strategy("linucb").to_state())
    with pytest.raises(ConfigError, match="arm 3"):
        LinUCBStrategy(n_arms=3, arm=3)


def test_linucb_default_arm_prefers_the_teacher_it_was_rewarded_for() -> None:
    """The one-arm bandit learns who teaches: after rewards that pay only pairs whose
    teacher has the higher pass@1 slot, it pairs that way far more often than chance."""
    strat = make_strategy("linucb-default-arm", beta0=0.1)
    rng = np.random.default_rng(0)
    for r in range(40):
        P = _profiles(10, 100 + r)
        for p in strat.select(P, IDS, r, 5, rng):
            t, s = IDS.index(p.teacher), IDS.index(p.student)
            strat.update(p, 1.0 if P[t, F.PASS1] > P[s, F.PASS1] else -1.0)
    right = total = 0
    for r in range(40, 60):
        P = _profiles(10, 100 + r)
        for p in strat.select(P, IDS, r, 5, rng):
            right += P[IDS.index(p.teacher), F.PASS1] > P[IDS.index(p.student), F.PASS1]
            total += 1
    assert right / total >= 0.9


def test_configured_topk_survives_a_restart_on_a_saved_state() -> None:
    """An operator who sets ``[strategy_params] topk`` on a CPM with saved state gets it:
    the saved topk is a record, the configured one matches."""
    saved = json.loads(json.dumps(make_strategy("linucb").to_state()))
    assert saved["topk"] == 8
    strat = make_strategy("linucb", topk=12)
    with capture_logs() as logs:
        strat.load_state(saved)
    assert strat.topk == 12 and strat.to_state()["topk"] == 12
    assert any(e["event"] == "cpm.strategy.topk_changed" and e["saved"] == 8 for e in logs)


def test_fedid_central_kd_is_centralized_interactive_and_rotates() -> None:
    P = _profiles(5, 4)
    ids = IDS[:5]
    strat = make_strategy("fedid-central-kd")
    assert strat.centralized
    hub = sorted(ids)[0]  # fixed, whoever is best
    seen_up = []
    for r in range(4):
        pairs = strat.select(P, ids, r, 10, np.random.default_rng(r))
        up = [p for p in pairs if p.student == hub]
        down = [p for p in pairs if p.teacher == hub]
        assert len(up) == 1 and len(down) == len(ids) - 2 and len(pairs) == len(ids) - 1
        assert up[0].teacher not in {p.student for p in down}  # the rotating client teaches, is not taught
        seen_up.append(up[0].teacher)
    assert seen_up == sorted(ids)[1:5]  # every client teaches the hub in turn
    assert len(strat.select(P, ids, 0, 2, np.random.default_rng(0))) == 2  # k_pairs caps it


def test_node_strategies_are_what_a_cpm_can_run() -> None:
    from cpm.config import STRATEGIES as CONFIG_STRATEGIES
    from cpm.strategies import NODE_STRATEGIES
    from harness.cli import STRATEGIES as HARNESS_STRATEGIES

    assert "oracle" not in NODE_STRATEGIES and "oracle-greedy" not in NODE_STRATEGIES
    assert {"linucb", "random", "random-arm", "fedid-central-kd"} <= set(NODE_STRATEGIES)
    assert CONFIG_STRATEGIES == HARNESS_STRATEGIES == NODE_STRATEGIES  # one list, offered everywhere


def test_strategy_params_reach_the_strategy_from_the_config() -> None:
    from cpm.config import CpmConfig, validate
    from cpm.rounds import build_strategy
    from protocol.errors import ConfigError

    cfg = CpmConfig(strategy="linucb", strategy_params={"lam": 0.7})
    validate(cfg)
    assert build_strategy(cfg).bandit.lam == 0.7
    with pytest.raises(ConfigError, match="strategy_params"):
        validate(CpmConfig(strategy="linucb", strategy_params={"lambda": 1.0}))
    assert build_strategy(CpmConfig(strategy="random-arm")).random_arm  # variants build too


def test_registry() -> None:
    assert set(STRATEGIES) == {"linucb", "random", "heuristic", "local-only", "central-kd", "fedid-central-kd",
                               "oracle"}
    with pytest.raises(ValueError, match="unknown strategy"):
        make_strategy("fedavg")
    with pytest.raises(ValueError):
        make_strategy("random").select(np.zeros((3, 31)), IDS[:3], 0, 1, np.random.default_rng(0))


def _v1_phi(pt: np.ndarray, ps: np.ndarray, arm: int) -> np.ndarray:
    """φ in the layout before the lineage flag (d = 81 + 8·3 = 105), written out from its
    definition: bias, p_t, p_s, |h_t − h_s|, JS, lack, gap, same family, then per arm
    [1, lack, same, gap, lack·same, gap·same, lack·π_t, lack·π_s] (zero but arm k's)."""
    ht, hs = pt[20:32], ps[20:32]
    lack, gap, same = float(ht @ (1.0 - hs)), pt[8] - ps[8], float(pt[:8] @ ps[:8])
    blocks = np.zeros((3, 8))
    blocks[arm] = [1.0, lack, same, gap, lack * same, gap * same, lack * pt[8], lack * ps[8]]
    js = float(F.js_divergence(ht, hs))
    return np.concatenate([[1.0], pt, ps, np.abs(ht - hs), [js, lack, gap, same], blocks.ravel()])


def _v1_saved_state(seed: int = 0) -> tuple[dict, LinUCB, np.ndarray]:
    """What a CPM running the 105-dim layout saved: a trained LinUCB(105) inside the
    strategy state (no ``layout`` key then), through JSON as the store keeps it."""
    rng = np.random.default_rng(seed)
    P = _profiles(30, seed + 1)
    old = LinUCB(105)
    for _ in range(300):
        t, s = rng.choice(30, 2, replace=False)
        k = int(rng.integers(3))
        x = _v1_phi(P[t], P[s], k)
        loss_post = 1.0 - 0.01 * (x[78] + 0.3 * x[80] + 0.1 * k) + 0.002 * rng.standard_normal()
        old.update(x, old.reward.observe(1.0, loss_post, 3.0)[1])
    state = json.loads(json.dumps({"name": "linucb", "n_arms": 3, "topk": 8, "bandit": old.to_state()}))
    return state, old, P


def test_linucb_migrates_a_state_saved_with_the_105_dim_layout() -> None:
    """Exact migration: θ and the widths are what the old bandit had on the old dims,
    and the new lineage dims start at the prior (θ = 0, variance 1/λ)."""
    state, old, P = _v1_saved_state()
    strat = LinUCBStrategy()
    with capture_logs() as logs:
        strat.load_state(state)
    assert any(e["event"] == "cpm.strategy.state_migrated" and e["from_d"] == 105 for e in logs)
    new = strat.bandit
    assert new.d == F.context_dim(3) == 112 and new.t == old.t == 300
    assert (new.reward.z.n, new.reward.z.mean, new.reward.z.m2) == (old.reward.z.n, old.reward.z.mean, old.reward.z.m2)
    rng = np.random.default_rng(9)
    t = rng.integers(0, 30, 40)
    s = (t + rng.integers(1, 30, 40)) % 30
    k = rng.integers(0, 3, 40)
    X = F.batch_context(P, t, s, k)
    X_old = np.stack([_v1_phi(P[a], P[b], c) for a, b, c in zip(t, s, k)])
    np.testing.assert_allclose(X[:, F.v1_dims(3)], X_old, atol=1e-12)  # the layouts line up
    added = np.setdiff1d(np.arange(new.d), F.v1_dims(3))
    assert X[:, added].any()  # the lineage dims are not all zero on these pairs
    np.testing.assert_allclose(new.mean(X), old.mean(X_old), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(new.width(X) ** 2, old.width(X_old) ** 2 + (X[:, added] ** 2).sum(axis=1) / new.lam,
                               rtol=1e-9)
    pairs = strat.select(P[:10], IDS, 0, 5, np.random.default_rng(0))
    assert len(pairs) == 5 and all(p.context.shape == (112,) for p in pairs)
    # a directive issued before the upgrade comes back with its stored 105-dim context
    twin = LinUCBStrategy()
    twin.load_state(state)
    p = pairs[0]
    ti, si = IDS.index(p.teacher), IDS.index(p.student)
    strat.update(Pair(p.teacher, p.student, p.arm, 0.0, _v1_phi(P[ti], P[si], p.arm)),
                 strat.reward.observe(1.0, 0.98, 3.0)[1])
    twin.update(p, twin.reward.observe(1.0, 0.98, 3.0)[1])
    np.testing.assert_allclose(strat.bandit.A, twin.bandit.A, atol=1e-12)
    np.testing.assert_allclose(strat.bandit.b, twin.bandit.b, atol=1e-12)
    assert json.loads(json.dumps(strat.to_state()))["layout"] == F.LAYOUT


@pytest.mark.parametrize("d, layout", [(99, None), (105, 2), (112, 1), (112, 7)])
def test_linucb_refuses_a_state_of_an_unknown_layout(d: int, layout: int | None) -> None:
    state = {"name": "linucb", "n_arms": 3, "topk": 8, "bandit": LinUCB(d).to_state()}
    if layout is not None:
        state["layout"] = layout
    strat = LinUCBStrategy()
    with capture_logs() as logs, pytest.raises(StrategyStateError, match="strategy_state") as err:
        strat.load_state(state)
    assert isinstance(err.value, ConfigError)
    assert any(e["event"] == "cpm.strategy.state_refused" and e["d"] == d for e in logs)
    assert strat.bandit.d == 112 and strat.bandit.t == 0  # left as it was


def test_cpm_restart_on_a_store_saved_by_the_105_dim_release(tmp_path) -> None:
    """The real restore path (``RoundEngine`` reads ``Store.load_bandit_state``): a state
    saved by the 105-dim release is migrated; one of an unknown layout stops the node
    with the typed error (the CLI's exit 3) instead of failing at the first match."""
    from cpm.config import CpmConfig
    from cpm.rounds import RoundEngine
    from cpm.store import open_store
    from protocol.envelope import Identity

    state, old, _ = _v1_saved_state()
    store = open_store(tmp_path / "cpm.db")
    store.save_bandit_state("linucb", {"strategy": state}, 0)
    engine = RoundEngine(store, CpmConfig(strategy="linucb"), Identity.generate())
    assert engine.strategy.bandit.d == 112 and engine.strategy.bandit.t == old.t
    store.save_bandit_state("linucb", {"strategy": {**state, "bandit": LinUCB(99).to_state()}}, 0)
    with pytest.raises(StrategyStateError):
        RoundEngine(store, CpmConfig(strategy="linucb"), Identity.generate())
    store.close()
