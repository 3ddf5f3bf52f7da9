"""cpm.reputation: the teacher quarantine rule, its bound and its false-alarm rate."""

from __future__ import annotations

import itertools
from math import comb

import numpy as np
import pytest

from cpm.reputation import (
    Reputation,
    ReputationPolicy,
    binomial_tail_half,
    false_quarantine_probability,
    reputation_from_saved,
)


def _feed(rep: Reputation, teacher: str, gains: list[float]) -> int | None:
    """Deliveries until quarantine (1-based), or None."""
    for n, g in enumerate(gains, 1):
        if rep.record(teacher, g, round_=n) is not None:
            return n
    return None


def test_binomial_tail_is_exact() -> None:
    for n in range(1, 41):
        for h in range(n + 2):
            exact = sum(comb(n, k) for k in range(h, n + 1)) / 2**n
            assert binomial_tail_half(n, h) == pytest.approx(exact, rel=1e-9, abs=1e-15), (n, h)
    # large n stays finite and cheap (log space, early stop)
    assert 0.0 < binomial_tail_half(100_000, 50_500) < 0.01
    assert binomial_tail_half(100_000, 49_000) > 0.99


def test_always_harmful_teacher_is_quarantined_at_delivery_b() -> None:
    policy = ReputationPolicy()
    assert policy.bound == 8
    rep = Reputation(policy)
    for n in range(1, 8):
        assert rep.record("bad", -0.01, round_=n) is None
    verdict = rep.record("bad", -0.01, round_=8)
    assert verdict is not None
    assert (verdict.teacher, verdict.round, verdict.reason, verdict.deliveries, verdict.harmful) == (
        "bad", 8, "sign_test", 8, 8)
    assert verdict.mean_gain == pytest.approx(-0.01) and verdict.p_value == pytest.approx(2**-8)
    assert rep.is_quarantined("bad") and list(rep.quarantined()) == ["bad"]
    # evidence keeps accumulating, but a quarantined teacher gets no second verdict
    assert rep.record("bad", -0.01, round_=9) is None
    assert rep.teachers["bad"].deliveries == 9


@pytest.mark.parametrize("u, bound", [(1, 12), (2, 15), (3, 18)])
def test_bound_grows_with_deliveries_that_looked_harmless(u: int, bound: int) -> None:
    """The documented table B(u): u harmless-looking deliveries first (worst case)."""
    rep = Reputation(ReputationPolicy(window=0))
    assert _feed(rep, "t", [0.001] * u + [-0.01] * 40) == bound


def test_sleeper_is_stopped_by_the_recent_window() -> None:
    """40 helpful deliveries buy at most ``window`` − 1 = 15 harmful ones afterwards,
    and one harmless-looking reading among them costs one more delivery, not a reset."""
    rep = Reputation()
    assert _feed(rep, "sleeper", [0.01] * 40 + [-0.01] * 20) == 40 + 15
    assert rep.teachers["sleeper"].reason == "recent_window"
    blip = [0.01] * 40 + [-0.01] * 7 + [0.001] + [-0.01] * 20
    assert _feed(Reputation(), "blip", blip) == 40 + 16
    two = [0.01] * 40 + [-0.01] * 5 + [0.001] + [-0.01] * 5 + [0.001] + [-0.01] * 20
    # two blips: the window may hold only the second one → 5 harmful, blip, 10 harmful
    assert _feed(Reputation(), "two", two) == 40 + 5 + 1 + 5 + 1 + 10
    assert Reputation(ReputationPolicy(window=0)).record("x", -1.0, 1) is None  # rule 2 off, rule 1 needs 8


def test_mostly_harmful_but_helpful_on_average_is_not_quarantined_by_the_sign_test() -> None:
    rep = Reputation(ReputationPolicy(window=0))
    gains = [0.5] + [-0.001] * 9  # 9 of 10 harmful, but the sum stays positive
    assert _feed(rep, "t", gains * 3) is None


def test_noisy_positive_teachers_are_never_quarantined() -> None:
    """200 honest teachers × 100 deliveries, gains ~ N(0.5σ, σ) (harmful 31 % of the time)."""
    rng = np.random.default_rng(7)
    rep = Reputation()
    for t in range(200):
        assert _feed(rep, f"h{t}", list(rng.normal(0.5, 1.0, 100))) is None, t
    assert not rep.quarantined()


def test_false_quarantine_probability_matches_brute_force() -> None:
    policy = ReputationPolicy(alpha=2**-5, window=5)
    n_max, p = 12, 0.4
    brute = 0.0
    for seq in itertools.product((True, False), repeat=n_max):
        rep = Reputation(policy)
        fired = False
        for n, harm in enumerate(seq, 1):
            if rep.record("t", -1.0 if harm else 0.0, n) is not None:
                fired = True
                break
        # the DP ignores rule 1's Σg < 0; with gains −1/0 that condition always holds
        k = sum(seq)
        brute += fired * p**k * (1 - p) ** (n_max - k)
    assert false_quarantine_probability(p, n_max, policy) == pytest.approx(brute, rel=1e-9)


def test_documented_false_quarantine_rates() -> None:
    """docs/threat-model.md T19: over 100 deliveries, default policy (upper bounds)."""
    assert false_quarantine_probability(0.5, 100) < 0.05  # zero effect: a coin flip each time
    assert false_quarantine_probability(0.4, 100) < 0.003
    assert false_quarantine_probability(0.3, 100) < 0.0002


def test_state_round_trip_release_and_operator_view() -> None:
    rep = Reputation()
    _feed(rep, "bad", [-0.02] * 8)
    _feed(rep, "good", [0.01, -0.001, 0.02])
    state = rep.to_state()
    saved = ("linucb", {"strategy": {}, "reputation": state})
    again = reputation_from_saved(saved)
    assert again.to_state() == state and again.is_quarantined("bad") and not again.is_quarantined("good")
    rows = {r["teacher"]: r for r in again.rows()}
    assert rows["bad"]["quarantined"] and rows["bad"]["quarantined_round"] == 8 and rows["bad"]["reason"] == "sign_test"
    assert rows["good"] == {"teacher": "good", "deliveries": 3, "harmful": 1, "mean_gain": pytest.approx(0.029 / 3),
                            "quarantined": False, "quarantined_round": None, "reason": None,
                            "p_value": pytest.approx(7 / 8), "harmful_run": 0, "released_at": None}
    assert rows["bad"]["p_value"] == pytest.approx(2.0**-8) and rows["bad"]["harmful_run"] == 8
    assert not reputation_from_saved(None).teachers
    assert not reputation_from_saved(("linucb", {"strategy": {}})).teachers  # saved before reputations existed
    old = {"version": 1, "teachers": state["teachers"]}  # saved before releases existed
    assert reputation_from_saved(("linucb", {"reputation": old})).released == {}
    with pytest.raises(ValueError):
        Reputation().load_state({"version": 99, "teachers": {}})


def test_release_is_a_fresh_start_and_only_for_quarantined_teachers() -> None:
    rep = Reputation()
    _feed(rep, "bad", [-0.02] * 8)
    _feed(rep, "good", [0.01, -0.001, 0.02])
    good_before = rep.teachers["good"].to_list()
    assert rep.release("good", at_ms=5_000) is None  # evidence in progress is kept, no release recorded
    assert rep.release("nobody", at_ms=5_000) is None
    assert rep.teachers["good"].to_list() == good_before and rep.released == {}
    cleared = rep.release("bad", at_ms=5_000)
    assert cleared is not None and cleared.deliveries == 8 and cleared.reason == "sign_test"
    assert not rep.is_quarantined("bad") and "bad" not in rep.teachers and rep.released == {"bad": 5_000}
    assert rep.release("bad", at_ms=6_000) is None  # already released
    # the released record survives a save/load (the CPM restarts with it)
    again = reputation_from_saved(("random", {"reputation": rep.to_state()}))
    assert again.released == {"bad": 5_000} and not again.is_quarantined("bad")
    # directives issued up to the release are old evidence; later ones count
    assert again.predates_release("bad", 4_000) and again.predates_release("bad", 5_000)
    assert not again.predates_release("bad", 5_001) and not again.predates_release("good", 0)
    # fresh start: one harmful delivery does not re-quarantine it (with the old counts
    # kept, the sign test would fire at once); a still-harmful teacher is stopped at B = 8
    assert again.record("bad", -0.02, round_=20) is None
    assert _feed(again, "bad", [-0.02] * 7) == 7  # 8th delivery since the release
    rows = {r["teacher"]: r for r in again.rows()}
    assert rows["bad"]["quarantined"] and rows["bad"]["released_at"] == 5_000  # a repeat offender shows


def test_policy_validation_and_switching_off() -> None:
    for bad in ({"alpha": 0.5}, {"alpha": -0.1}, {"window": -1}, {"window": 1}):
        with pytest.raises(ValueError):
            ReputationPolicy(**bad)
    off = Reputation(ReputationPolicy(alpha=0.0, window=0))
    assert _feed(off, "t", [-1.0] * 100) is None
    assert ReputationPolicy(alpha=0.0, window=5).bound == 5
    with pytest.raises(ValueError):
        Reputation().record("t", float("nan"), 1)


def _brute_force(policy: ReputationPolicy, p: float, n_max: int) -> float:
    """P(quarantine within n_max deliveries) by enumerating every harmful/harmless sequence."""
    total = 0.0
    for seq in itertools.product((True, False), repeat=n_max):
        rep = Reputation(policy)
        fired = any(rep.record("t", -1.0 if harm else 0.0, n) is not None for n, harm in enumerate(seq, 1))
        k = sum(seq)
        total += fired * p**k * (1 - p) ** (n_max - k)
    return total


@pytest.mark.parametrize(
    "policy, n_max",
    [(ReputationPolicy(alpha=2**-5, window=0), 11), (ReputationPolicy(alpha=0.0, window=4), 11),
     (ReputationPolicy(alpha=2**-3, window=6), 11), (ReputationPolicy(), 11),
     (ReputationPolicy(alpha=0.0, window=3), 3), (ReputationPolicy(alpha=0.0, window=6), 2)],
    ids=["sign-test-only", "window-only", "both", "default", "window-at-its-first-chance", "window-not-yet"],
)
@pytest.mark.parametrize("p", [0.3, 0.75])
def test_false_quarantine_probability_is_exact_for_each_rule(policy: ReputationPolicy, n_max: int, p: float) -> None:
    """The operator's table of false-alarm rates comes from this DP: it must agree with
    the rule itself for either rule alone, both, the defaults, and at the window's edges."""
    exact = _brute_force(policy, p, n_max)
    assert false_quarantine_probability(p, n_max, policy) == pytest.approx(exact, rel=1e-9, abs=1e-15)


def test_sign_test_needs_a_net_loss() -> None:
    """Rule 1 fires only when the teacher is harmful more often than chance *and* its
    gains sum below zero: a sum of exactly zero is not a loss."""
    rep = Reputation(ReputationPolicy(window=0))
    assert _feed(rep, "t", [11.0] + [-1.0] * 11) is None  # 11 of 12 harmful, Σg = 0
    assert rep.record("t", -1.0, round_=13) is not None  # 12 of 13, Σg < 0


def test_quarantine_in_the_first_round_is_recorded_as_round_one() -> None:
    rep = Reputation()
    for _ in range(8):
        rep.record("bad", -1.0, round_=1)
    assert rep.teachers["bad"].quarantined_round == 1 and rep.is_quarantined("bad")


def test_state_without_a_version_is_refused() -> None:
    with pytest.raises(ValueError, match="version"):
        Reputation().load_state({"teachers": {}})
