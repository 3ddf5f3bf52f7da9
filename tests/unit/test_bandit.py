"""LinUCB math against a direct numpy reference, reward normalisation, state."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cpm import features as F
from cpm.bandit import LinUCB
from cpm.reward import Reward, RunningZ
from cpm.strategies import LinUCBStrategy, RandomStrategy


def _updates(d: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.standard_normal(n)


@pytest.mark.parametrize("reinvert_every", [0, 7])
def test_sherman_morrison_matches_direct_inverse(reinvert_every: int) -> None:
    d, lam = 10, 0.7
    X, r = _updates(d, 300, 1)
    b = LinUCB(d, lam=lam, beta0=0.8, reinvert_every=reinvert_every)
    for x, ri in zip(X, r):
        b.update(x, float(ri))
    A = lam * np.eye(d) + X.T @ X
    bb = X.T @ r
    Ainv = np.linalg.inv(A)
    theta = Ainv @ bb
    np.testing.assert_allclose(b.Ainv, Ainv, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(b.theta, theta, rtol=1e-8, atol=1e-10)
    Q = np.random.default_rng(2).standard_normal((25, d))
    ref = Q @ theta + b.beta() * np.sqrt(np.einsum("ij,jk,ik->i", Q, Ainv, Q))
    np.testing.assert_allclose(b.ucb(Q), ref, rtol=1e-8)


@pytest.mark.parametrize("discount", [1.0, 0.9])
def test_embed_equals_training_with_the_new_dims_at_zero(discount: float) -> None:
    """``embed`` (migrating a saved bandit to a larger context layout) is exact: the same
    A, b, θ and widths as a bandit of the new size fed the same contexts with zeros in
    the added dims, and the same later updates."""
    X, r = _updates(6, 80, 4)
    index = np.array([0, 1, 3, 4, 6, 7])  # new dims 2 and 5 did not exist
    small = LinUCB(6, lam=0.4, discount=discount)
    big = LinUCB(8, lam=0.4, discount=discount)
    for x, ri in zip(X, r):
        small.update(x, float(ri))
        xb = np.zeros(8)
        xb[index] = x
        big.update(xb, float(ri))
    moved = small.embed(index, 8)
    np.testing.assert_allclose(moved.A, big.A, atol=1e-12)
    np.testing.assert_allclose(moved.theta, big.theta, atol=1e-9)
    Q = np.random.default_rng(5).standard_normal((10, 8))
    np.testing.assert_allclose(moved.ucb(Q), big.ucb(Q), rtol=1e-9)
    moved.update(Q[0], 0.3)
    big.update(Q[0], 0.3)
    np.testing.assert_allclose(moved.theta, big.theta, atol=1e-9)
    assert moved.t == big.t and moved.discount == discount
    with pytest.raises(ValueError):
        small.embed(np.array([0, 1, 1, 4, 6, 7]), 8)  # two old dims on one new dim


def test_discounted_update_has_documented_form() -> None:
    d, lam, g = 6, 2.0, 0.9
    X, r = _updates(d, 50, 3)
    b = LinUCB(d, lam=lam, discount=g)
    A, bb = lam * np.eye(d), np.zeros(d)
    for x, ri in zip(X, r):
        b.update(x, float(ri))
        A = g * A + (1 - g) * lam * np.eye(d) + np.outer(x, x)
        bb = g * bb + ri * x
    np.testing.assert_allclose(b.A, A, rtol=1e-10)
    np.testing.assert_allclose(b.theta, np.linalg.solve(A, bb), rtol=1e-8)
    assert np.linalg.eigvalsh(b.A).min() >= lam * 0.999  # never less regularised than λI


def test_beta_schedules_decay() -> None:
    s = LinUCB(3, beta0=2.0, beta_schedule="sqrt", tau=10)
    assert s.beta(0) == 2.0 and math.isclose(s.beta(30), 1.0)
    e = LinUCB(3, beta0=2.0, beta_schedule="exp", decay=0.5)
    assert math.isclose(e.beta(3), 0.25)
    assert LinUCB(3, beta0=2.0, beta_schedule="const").beta(1000) == 2.0
    with pytest.raises(ValueError):
        LinUCB(3, beta_schedule="nope")


def test_raw_reward_eq3() -> None:
    b = LinUCB(3)
    assert math.isclose(b.reward.raw(1.0, 0.8, 50.0), 0.2 - 50 * 1e-6)  # δ = 1e-3 per MB
    b2 = LinUCB(3, gamma=2.0, delta_per_kb=0.01)
    assert math.isclose(b2.reward.raw(1.0, 0.9, 10.0), 0.2 - 0.1)
    assert math.isclose(b2.reward.raw(1.0, 0.9, 10.0, ok=False), -0.1)  # a failure learned nothing
    assert Reward().raw(1.0, 0.8, 50.0) == b.reward.raw(1.0, 0.8, 50.0)  # the engine's, for baselines


def test_failure_is_never_scored_as_a_success() -> None:
    """A failed exchange: raw −δ·KB, z-score clipped at 0 even when −δ·KB is above the
    running mean (earlier exchanges all harmed)."""
    r = Reward(delta_per_kb=0.01)
    for _ in range(3):
        r.observe(1.0, 1.5, 10.0)  # raw −0.6 each
    n = r.z.n
    raw, z = r.observe(1.0, 0.2, 10.0, ok=False)  # the losses of a failure are ignored
    assert raw == pytest.approx(-0.1) and z == 0.0 and r.z.n == n + 1
    raw_ok, z_ok = r.observe(1.0, 1.0, 10.0)  # the same raw reward as a success: positive
    assert raw_ok == pytest.approx(-0.1) and z_ok > 0


def test_welford_matches_numpy_and_zscore_before_update() -> None:
    xs = np.random.default_rng(4).normal(3.0, 2.0, 500)
    z = RunningZ(eps=1e-6)
    for x in xs:
        z.push(float(x))
    assert math.isclose(z.mean, xs.mean(), rel_tol=1e-10)
    assert math.isclose(z.var, xs.var(), rel_tol=1e-9)
    b = LinUCB(4)
    assert b.reward.observe(5.0, 0.0, 0.0) == (5.0, 0.0)  # first reward: mean is itself
    _, got = b.reward.observe(7.0, 0.0, 0.0)
    assert math.isclose(got, (7.0 - 6.0) / (1.0 + 1e-6))
    phi = np.ones(4)
    _, zr = b.reward.observe(1.0, 0.5, 0.0)  # raw 0.5 is below the running mean of 6
    b.update(phi, zr)
    assert zr < 0 and math.isclose(float(b.b @ phi), 4 * zr)


def test_state_round_trip_plain_types() -> None:
    d = 8
    X, r = _updates(d, 40, 5)
    b = LinUCB(d, lam=0.5, beta0=1.3, discount=0.97, tau=33)
    for x, ri in zip(X, r):
        b.update(x, b.reward.observe(1.0, 1.0 - 0.1 * float(ri), 2.0)[1])
    state = json.loads(json.dumps(b.to_state()))  # JSON-able, no numpy objects
    c = LinUCB.from_state(state)
    Q = np.random.default_rng(6).standard_normal((10, d))
    np.testing.assert_allclose(c.ucb(Q), b.ucb(Q), rtol=1e-9)
    assert (c.t, c.reward.z.n, c.reward.z.mean, c.reward.z.m2) == (b.t, b.reward.z.n, b.reward.z.mean, b.reward.z.m2)
    assert c.reward.observe(0.3, 0.0, 0.0) == b.reward.observe(0.3, 0.0, 0.0)


def test_rejects_bad_input() -> None:
    b = LinUCB(3)
    with pytest.raises(ValueError):
        b.update(np.ones(4), 1.0)
    with pytest.raises(ValueError):
        b.update(np.ones(3), float("nan"))


def test_linucb_beats_random_on_pairwise_reward_world() -> None:
    """Reward depends on the *pair* (teacher data the student lacks) and on the arm.

    Random-P2P uses the default arm, which is the best arm in this world, so its gap to
    LinUCB is pair choice only (small here: most Dirichlet(0.2) pairs lack a lot);
    against random pairs *and* arms (``random-arm``) LinUCB must also have learnt the arm."""
    rng = np.random.default_rng(7)
    n, rounds = 12, 150
    P = np.zeros((n, 32))
    P[np.arange(n), rng.integers(0, 8, n)] = 1
    P[:, 8:20] = rng.random((n, 12))
    P[:, 20:32] = rng.dirichlet(np.full(12, 0.2), n)
    ids = [f"a{i}" for i in range(n)]

    def reward(t: int, s: int, k: int) -> float:
        return float(F.lack_mass(P[t, 20:32], P[s, 20:32]) * (0.5 + 0.5 * k) - 0.3 * k * (k == 2))

    totals = {}
    for strat in (LinUCBStrategy(beta0=0.5), RandomStrategy(), RandomStrategy(random_arm=True)):
        r_rng = np.random.default_rng(8)
        scorer = getattr(strat, "reward", None) or Reward()  # as the round engine scores
        total = 0.0
        for rd in range(rounds):
            for p in strat.select(P, ids, rd, 6, r_rng):
                t, s = ids.index(p.teacher), ids.index(p.student)
                val = reward(t, s, p.arm)
                total += val
                noisy = val + 0.05 * float(r_rng.standard_normal())
                strat.update(p, scorer.observe(1.0, 1.0 - noisy, 0.0)[1])
        totals[strat.name] = total
    assert totals["linucb"] > 1.3 * totals["random-arm"]
    assert totals["linucb"] > totals["random"]


def test_every_setting_survives_a_restart() -> None:
    """A CPM restart must bring back the bandit exactly as configured, not with defaults."""
    b = LinUCB(3, lam=0.7, beta0=2.0, beta_schedule="exp", tau=50.0, decay=0.99, discount=0.95,
               gamma=2.5, delta_per_kb=1e-5, eps=1e-4, reinvert_every=7)
    b.update(np.ones(3), b.reward.observe(1.0, 0.5, 3.0)[1])
    state = json.loads(json.dumps(b.to_state()))
    assert LinUCB.from_state(state).to_state() == state


def test_inconsistent_state_is_refused() -> None:
    state = LinUCB(3).to_state()
    with pytest.raises(ValueError):
        LinUCB.from_state({**state, "b": [0.0, 0.0]})
    with pytest.raises(ValueError):
        LinUCB.from_state({**state, "A": [1.0] * 8})


def test_t_counts_updates_and_drives_the_exploration_schedule() -> None:
    b = LinUCB(2, beta0=1.0, tau=4.0)
    assert b.t == 0 and b.beta() == 1.0
    for _ in range(3):
        b.update(np.ones(2), 0.5)
    assert b.t == 3 and b.beta() == pytest.approx(1.0 / math.sqrt(1.0 + 3 / 4.0))


def test_parameter_bounds() -> None:
    LinUCB(1)
    LinUCB(2, discount=1.0)
    for bad in ({"d": 0}, {"d": 2, "lam": 0.0}, {"d": 2, "discount": 0.0}, {"d": 2, "discount": 1.5}):
        with pytest.raises(ValueError):
            LinUCB(**bad)


@pytest.mark.parametrize("index", [[0, 6], [1, 7], [-1, 2]])
def test_embed_refuses_indices_outside_the_new_layout(index: list[int]) -> None:
    with pytest.raises(ValueError):
        LinUCB(2).embed(np.array(index), 6)
