"""cpm.rounds: the answers agents act on, the counters and wake-ups the service exports,
what a restart must keep, and the engine's guard rails around a strategy's pairs.

Each test here was written for behaviour that mutation testing showed no test pinned
(docs/reliability.md, "Mutation testing"). ``World`` is the fake-clock engine of
test_rounds.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from cpm.reputation import TeacherRecord
from cpm.rounds import Pending, RoundEngine
from cpm.strategies import Pair
from protocol.directives import verify_directive
from protocol.envelope import Identity
from protocol.errors import MalformedFrame, Unauthorized
from protocol.messages import Feedback, NoDirective, Register, Registered
from protocol.profile import ProtocolArm

from .test_rounds import T0, World


def _play_round(w: World, round_: int = 1) -> list:
    for i, a in enumerate(w.agents):
        w.profile(a, round_=round_, seed=i)
    return w.store.directives_for_round(round_)


def test_every_answer_carries_round_reason_and_retry_hint(tmp_path):
    w = World(tmp_path, 3, max_rounds=1)
    a0, a1, a2 = w.agents
    assert w.profile(a0, round_=0) == NoDirective(round=1, reason="advance", retry_after_ms=0)
    assert w.profile(a0, round_=5) == NoDirective(round=1, reason="round_pending", retry_after_ms=1000)
    assert w.engine.directive(a0, 5, w.now) == NoDirective(round=1, reason="round_pending", retry_after_ms=1000)
    assert w.engine.directive(a0, 0, w.now) == NoDirective(round=1, reason="advance", retry_after_ms=0)
    assert w.engine.directive(a0, 1, w.now) == Pending(1)
    (d,) = _play_round(w)
    left_out = next(a for a in w.agents if a not in (d.teacher, d.student))
    assert w.engine.directive(left_out, 1, w.now) == NoDirective(round=1, reason="not_matched", retry_after_ms=1000)
    assert w.profile(a0) == NoDirective(round=2, reason="round_pending", retry_after_ms=1000)
    w.feedback(d)  # closes round 1 = max_rounds
    assert w.profile(a0, round_=2) == NoDirective(round=1, reason="finished", retry_after_ms=0)
    assert w.engine.directive(a0, 2, w.now) == NoDirective(round=1, reason="finished", retry_after_ms=0)


def test_register_answer_limits_and_truncation(tmp_path):
    w = World(tmp_path, 0, open_admission=True)
    newcomer = Identity.generate().peer_id
    addrs = tuple((f"/dns4/h{i:02d}/" + "x" * 512)[:512] for i in range(32))  # at both limits
    reply = w.engine.register(newcomer, Register("o" * 200, "f" * 100, addrs, "v" * 100), w.now)
    assert reply == Registered(round=1, cpm_time_ms=w.now, transfer_hash=w.cfg.transfer_hash)
    agent = w.store.get_agent(newcomer)
    assert agent.admitted  # open admission lets an unknown peer in
    assert (agent.org, agent.family, agent.agent_version) == ("o" * 128, "f" * 64, "v" * 64)
    assert agent.listen_addrs == addrs
    for bad in (addrs + ("/ip4/1.2.3.4/tcp/1",), ("/ip4/1.2.3.4/tcp/1", "x" * 513)):
        with pytest.raises(MalformedFrame):
            w.engine.register(newcomer, Register("o", "f", bad, "v"), w.now)


def test_counters_and_wakeups_follow_the_round(tmp_path):
    """The service exports ``counters`` as metrics and wakes long-polls when ``epoch``
    moves: it must move forward at every transition, or a waiter can miss one."""
    w = World(tmp_path, 4)
    epochs = [w.engine.epoch]
    d1, d2 = _play_round(w)
    epochs.append(w.engine.epoch)
    w.feedback(d1)
    w.feedback(d2)
    epochs.append(w.engine.epoch)  # round 1 closed, round 2 opened
    assert epochs == sorted(set(epochs)) and len(epochs) == 3
    d1, _ = _play_round(w, 2)
    w.feedback(d1, ok=False)
    for r in (2, 3):  # round 2: the other directive expires; round 3: both do
        if r == 3:
            _play_round(w, 3)
        w.now += 61_000
        w.engine.tick(w.now)
    assert w.engine.counters == {"profiles": 12, "directives_issued": 6, "directives_used": 2,
                                 "directives_failed": 1, "directives_expired": 3, "feedback": 3}


def test_round_rows_record_when_they_matched_and_closed(tmp_path):
    w = World(tmp_path, 2)
    (d,) = _play_round(w)
    matched_at = w.now
    w.now += 1234
    w.feedback(d)
    row = w.store.get_round(1)
    assert (row.opened_at, row.matched_at, row.closed_at) == (T0, matched_at, w.now)


def test_timer_edges(tmp_path):
    w = World(tmp_path, 3)
    w.profile(w.agents[0])
    assert w.engine.tick(T0 + 30_000) is None  # at the deadline with one fresh profile: wait for messages
    w.profile(w.agents[1])
    wake = w.engine.tick(T0 + 30_000)  # matches on the timer ...
    (d,) = w.store.directives_for_round(1)
    assert wake == d.expires_at + 1  # ... and the next wake-up is the directive's expiry


def test_silent_agents_leave_the_quorum(tmp_path):
    w = World(tmp_path, 3, active_window_s=10.0, quorum=1.0)
    w.now = T0 + 10_001  # agent 2 was last seen 10.001 s ago: no longer active
    w.profile(w.agents[0])
    w.profile(w.agents[1])
    assert w.round().state == "matched"


def test_an_agent_waiting_for_its_directive_stays_active(tmp_path):
    w = World(tmp_path, 3, active_window_s=10.0, quorum=1.0)
    w.now = T0 + 10_001
    assert w.engine.directive(w.agents[2], 1, w.now) == Pending(1)  # a long-poll is a sign of life
    w.profile(w.agents[0])
    w.profile(w.agents[1])
    assert w.round().state == "open"  # 2 fresh of 3 active: no quorum yet


def test_directive_row_keeps_the_arm_parameters(tmp_path):
    w = World(tmp_path, 2)
    (d,) = _play_round(w)
    arm = w.cfg.arms[d.arm]
    assert d.params == {"alpha": arm.alpha, "temperature": arm.temperature, "n_samples": arm.n_samples,
                        "items": len(w.engine.transfer_ids(1, d.arm))}


@pytest.mark.parametrize("field", ["kb", "loss_pre", "loss_post"])
def test_negative_losses_or_kb_are_refused(tmp_path, field):
    w = World(tmp_path, 2)
    (d,) = _play_round(w)
    values = {"kb": 10.0, "loss_pre": 2.0, "loss_post": 1.5, field: -0.1}
    fb = Feedback(d.directive_id, d.round, d.teacher, d.student, values["loss_pre"], values["loss_post"],
                  values["kb"], True, "")
    with pytest.raises(MalformedFrame):
        w.engine.feedback(d.student, fb, w.now)
    assert w.store.list_feedback() == []


def test_feedback_row_keeps_ok_and_bounded_failure_text(tmp_path):
    w = World(tmp_path, 4)
    d1, d2 = _play_round(w)
    w.feedback(d1)
    w.engine.feedback(d2.student, Feedback(d2.directive_id, 1, d2.teacher, d2.student, 1.0, 1.0, 0.0, False,
                                           "x" * 600), w.now)
    assert w.store.get_feedback(d1.directive_id).ok is True
    failed = w.store.get_feedback(d2.directive_id)
    assert failed.ok is False and failed.failure == "x" * 512


def test_deliveries_feed_the_teacher_reputation(tmp_path):
    """An ok feedback counts gain = L_pre − L_post for its teacher; a failed exchange and
    a delivery issued before the teacher's release count nothing."""

    def deliveries() -> int:
        return sum(r.deliveries for r in w.engine.reputation.teachers.values())

    w = World(tmp_path, 2)
    (d,) = _play_round(w)
    w.feedback(d, pre=1.0, post=1.25)  # harmful: the student's loss went up
    rec = w.engine.reputation.teachers[d.teacher]
    assert (rec.deliveries, rec.harmful, rec.gain_sum) == (1, 1, pytest.approx(-0.25))
    (d,) = _play_round(w, 2)
    w.feedback(d, ok=False, pre=1.0, post=3.0)
    assert deliveries() == 1
    (d,) = _play_round(w, 3)
    w.engine.reputation.released[d.teacher] = d.issued_at  # released after this directive was issued
    w.feedback(d, pre=1.0, post=2.0)
    assert deliveries() == 1


def _rewards(tmp_path, name: str, *, duplicate: bool, restart: bool, strategy: str) -> list[float]:
    (tmp_path / name).mkdir()
    w = World(tmp_path / name, 2, strategy=strategy)
    out = []
    for r, (pre, post) in enumerate([(2.0, 1.0), (2.0, 1.9), (2.0, 0.5)], start=1):
        (d,) = _play_round(w, r)
        w.feedback(d, pre=pre, post=post)
        if duplicate:
            assert w.feedback(d, pre=pre, post=post) is False
        if restart:
            w.restart()
        out.append(w.store.get_feedback(d.directive_id).reward)
    return out


@pytest.mark.parametrize("strategy", ["random", "linucb"])
def test_rewards_are_unchanged_by_duplicates_and_restarts(tmp_path, strategy):
    """The z-scored reward is the same whether the CPM saw duplicates or restarted
    between feedbacks or not: the running statistics count each feedback once and
    survive a restart (for baselines too, so their exports stay comparable)."""
    plain = _rewards(tmp_path, "plain", duplicate=False, restart=False, strategy=strategy)
    assert _rewards(tmp_path, "dup", duplicate=True, restart=False, strategy=strategy) == pytest.approx(plain)
    assert _rewards(tmp_path, "restart", duplicate=False, restart=True, strategy=strategy) == pytest.approx(plain)


def test_quarantine_is_stamped_with_the_round_of_the_tipping_delivery(tmp_path):
    w = World(tmp_path, 2)
    for r in range(1, 40):
        (d,) = _play_round(w, r)
        w.feedback(d, pre=1.0, post=1.5)  # every delivery harms its student
        quarantined = w.engine.reputation.quarantined()
        if quarantined:
            assert {t: rec.quarantined_round for t, rec in quarantined.items()} == {d.teacher: r}
            return
    raise AssertionError("no teacher was quarantined")


def test_strategy_switch_with_directives_in_flight(tmp_path):
    """Directives issued by a baseline carry no bandit context; after a restart under
    LinUCB their feedback is still recorded (the bandit just cannot learn from it)."""
    w = World(tmp_path, 2, strategy="random")
    (d,) = _play_round(w)
    w.cfg = dataclasses.replace(w.cfg, strategy="linucb")
    w.restart()
    t = w.engine.strategy.bandit.t
    assert w.feedback(d) is True
    assert w.engine.strategy.bandit.t == t and w.store.get_feedback(d.directive_id) is not None


def test_the_strategy_is_built_for_the_configured_arms(tmp_path):
    arms = [ProtocolArm(alpha=0.3, temperature=1.0, n_samples=1), ProtocolArm(alpha=0.5, temperature=2.0, n_samples=1)]
    w = World(tmp_path, 4, strategy="linucb", arms=arms)
    assert w.engine.strategy.n_arms == 2
    assert all(0 <= d.arm < 2 for d in _play_round(w))


def test_restart_keeps_a_quarantine_even_under_another_strategy(tmp_path):
    w = World(tmp_path, 2)
    (d,) = _play_round(w)
    w.engine.reputation.teachers["QmBad"] = TeacherRecord(8, 8, -1.0, 8, 0, 1, "sign_test")
    w.feedback(d)  # the state (with the reputation) is saved with the feedback
    w.cfg = dataclasses.replace(w.cfg, strategy="heuristic")
    w.restart()
    assert w.engine.reputation.is_quarantined("QmBad")


class Scripted:
    """A strategy that proposes the given pairs, one list per ``select`` call."""

    name = "random"
    centralized = False

    def __init__(self, script: list[list[Pair]]) -> None:
        self.script = list(script)
        self.calls: list[tuple[list[str], int, int]] = []

    def select(self, profiles: np.ndarray, agent_ids: list[str], round: int, k_pairs: int,
               rng: np.random.Generator) -> list[Pair]:
        self.calls.append((list(agent_ids), round, k_pairs))
        return self.script.pop(0) if self.script else []

    def update(self, pair: Pair, feedback: Any) -> None:
        """Nothing to learn."""

    def to_state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""


def _scripted_world(tmp_path, n: int, script: list[list[Pair]]) -> tuple[World, Scripted]:
    w = World(tmp_path, n)
    strategy = Scripted(script)
    w.engine = RoundEngine(w.store, w.cfg, w.cpm, strategy=strategy, reputation=w.engine.reputation)
    return w, strategy


def test_a_quarantined_teacher_is_asked_around_but_never_assigned(tmp_path):
    w, strategy = _scripted_world(tmp_path, 4, [])
    ids = sorted(w.agents)
    bad, b, c, d = ids
    w.engine.reputation.teachers[bad] = TeacherRecord(8, 8, -1.0, 8, 0, 1, "sign_test")
    strategy.script = [[Pair(bad, b, 0, 1.0), Pair(c, d, 0, 1.0)],  # bad refused: ask again on bad, b
                       [Pair(bad, b, 0, 1.0)],  # refused twice: bad leaves the pool, b alone: stop
                       [Pair(b, bad, 0, 1.0)]]  # (a third pass must not happen)
    for i, a in enumerate(w.agents):
        w.profile(a, seed=i)
    assert [(x.teacher, x.student) for x in w.store.directives_for_round(1)] == [(c, d)]
    fresh = [p for p, _ in w.store.fresh_profiles(1)]
    assert strategy.calls == [(fresh, 1, 2), ([p for p in fresh if p in (bad, b)], 1, 1)]


def test_a_quarantined_agent_may_still_learn(tmp_path):
    w, strategy = _scripted_world(tmp_path, 4, [])
    bad, b, c, d = sorted(w.agents)
    w.engine.reputation.teachers[bad] = TeacherRecord(8, 8, -1.0, 8, 0, 1, "sign_test")
    strategy.script = [[Pair(b, bad, 0, 1.0), Pair(c, d, 0, 1.0)]]
    for i, a in enumerate(w.agents):
        w.profile(a, seed=i)
    assert sorted((x.teacher, x.student) for x in w.store.directives_for_round(1)) == [(b, bad), (c, d)]
    assert len(strategy.calls) == 1


def test_invalid_pairs_from_a_strategy_are_dropped_one_by_one(tmp_path):
    w, strategy = _scripted_world(tmp_path, 6, [])
    a, b, c, d, e, f = sorted(w.agents)
    n_arms = len(w.cfg.arms)
    strategy.script = [[
        Pair(a, a, 0, 1.0),  # teaches itself
        Pair(a, b, n_arms, 1.0),  # no such arm
        Pair(a, b, -1, 1.0),
        Pair(a, b, 0, 0.75),  # valid
        Pair(c, b, 0, 1.0),  # b already learns this round
        Pair(a, d, 0, 1.0),  # a already teaches (not a hub strategy)
        Pair(e, f, 1, float("nan")),  # valid, but a score the store cannot rank
    ]]
    for i, x in enumerate(w.agents):
        w.profile(x, seed=i)
    rows = w.store.directives_for_round(1)
    assert sorted((x.teacher, x.student, x.arm, x.score) for x in rows) == [(a, b, 0, 0.75), (e, f, 1, 0.0)]
    for row in rows:  # each directive carries its arm's share of the transfer set
        _, directive = verify_directive(row.envelope, cpm_peer_id=w.cpm.peer_id, now_ms=w.now)
        assert directive.transfer_ids == w.engine.transfer_ids(1, row.arm)


def test_seeded_matching_is_reproducible(tmp_path):
    """Same seed, same agents, same profiles: the same pairs (random strategy)."""
    agents = sorted(Identity.generate().peer_id for _ in range(8))
    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        w = World(tmp_path / name, 0, seed=7)
        for i, a in enumerate(agents):
            w.store.admit(a, f"org{i}", w.now)
            w.engine.register(a, Register(f"org{i}", "qwen2", ("/ip4/127.0.0.1/tcp/1",), "t"), w.now)
        w.agents = agents
        runs.append(sorted((x.teacher, x.student, x.arm) for x in _play_round(w)))
    assert runs[0] == runs[1] and len(runs[0]) == 4


def test_peer_lookup_names_the_peer(tmp_path):
    w = World(tmp_path, 2)
    (d,) = _play_round(w)
    assert w.engine.peer_lookup(d.student, d.teacher).peer_id == d.teacher
    with pytest.raises(Unauthorized):
        w.engine.peer_lookup(d.student, d.student)


def test_stats_show_the_round_its_state_and_quarantines(tmp_path):
    w = World(tmp_path, 2, max_rounds=1)
    assert (w.engine.stats()["round"], w.engine.stats()["state"]) == (1, "open")
    (d,) = _play_round(w)
    w.engine.reputation.teachers["QmBad"] = TeacherRecord(8, 8, -1.0, 8, 0, 1, "sign_test")
    stats = w.engine.stats()
    assert (stats["round"], stats["state"], stats["quarantined_teachers"]) == (1, "matched", 1)
    w.feedback(d)
    assert w.engine.stats()["state"] == "finished"


def test_release_is_durable_and_only_for_quarantined_teachers(tmp_path):
    w = World(tmp_path, 2)
    (d,) = _play_round(w)
    w.engine.reputation.teachers["QmBad"] = TeacherRecord(8, 8, -1.0, 8, 0, 1, "sign_test")
    w.feedback(d)  # saved with the feedback
    assert w.engine.release_teacher(d.teacher, w.now) is None  # not quarantined: nothing to lift
    cleared = w.engine.release_teacher("QmBad", w.now + 5, admin="ops")
    assert cleared is not None and cleared.deliveries == 8 and not w.engine.reputation.is_quarantined("QmBad")
    w.restart()
    assert not w.engine.reputation.is_quarantined("QmBad")
    assert w.engine.reputation.released == {"QmBad": w.now + 5}
