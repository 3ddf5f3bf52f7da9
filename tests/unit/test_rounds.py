"""cpm.rounds: the round state machine with a fake clock and a temp database."""

from __future__ import annotations

import numpy as np
import pytest

from cpm.config import CpmConfig
from cpm.reward import DELTA_PER_KB
from cpm.rounds import Pending, RoundEngine
from cpm.store import open_store
from protocol.directives import verify_directive
from protocol.envelope import Identity
from protocol.errors import Expired, MalformedFrame, ProtocolError, Unauthorized
from protocol.messages import Feedback, NoDirective, Profile, Register

T0 = 1_700_000_000_000


class World:
    """A CPM engine on a temp DB plus N admitted, registered agents."""

    def __init__(self, tmp_path, n: int = 2, **cfg_kw) -> None:
        self.path = tmp_path / "cpm.db"
        self.cfg = CpmConfig(**{"strategy": "random", "round_timer_s": 30.0, "directive_ttl_s": 60.0, **cfg_kw})
        self.cpm = Identity.generate()
        self.store = open_store(self.path)
        self.now = T0
        self.agents = [Identity.generate().peer_id for _ in range(n)]
        self.engine = RoundEngine(self.store, self.cfg, self.cpm)
        self.engine.start(self.now)
        for i, a in enumerate(self.agents):
            self.store.admit(a, f"org{i}", self.now)
            self.engine.register(a, Register(f"org{i}", "qwen2", (f"/ip4/127.0.0.1/tcp/{4000 + i}",), "t"), self.now)

    def restart(self) -> None:
        self.store.close()
        self.store = open_store(self.path)
        self.engine = RoundEngine(self.store, self.cfg, self.cpm)
        self.engine.start(self.now)

    def profile(self, agent: str, round_: int = 1, seed: int = 0):
        rng = np.random.default_rng(seed)
        vec = rng.random(32)
        vec[20:32] /= vec[20:32].sum()
        return self.engine.profile(agent, Profile(round_, tuple(float(v) for v in vec), self.cfg.transfer_hash),
                                   self.now)

    def feedback(self, d, *, sender=None, ok=True, pre=2.0, post=1.5, kb=10.0):
        fb = Feedback(d.directive_id, d.round, d.teacher, d.student, pre, post, kb, ok, "" if ok else "timeout")
        return self.engine.feedback(sender or d.student, fb, self.now)

    def round(self):
        return self.store.latest_round()


def test_quorum_matches_and_signs_directives(tmp_path):
    w = World(tmp_path, 2)
    assert w.round().round == 1 and w.round().state == "open"
    assert w.profile(w.agents[0]) is None
    assert w.round().state == "open"  # 1 of 2: no quorum
    assert isinstance(w.engine.directive(w.agents[0], 1, w.now), Pending)
    assert w.profile(w.agents[1], seed=1) is None
    assert w.round().state == "matched"
    (d,) = w.store.directives_for_round(1)
    assert {d.teacher, d.student} == set(w.agents)
    blob = w.engine.directive(d.student, 1, w.now)
    assert blob == w.engine.directive(d.teacher, 1, w.now) == d.envelope
    _, directive = verify_directive(blob, cpm_peer_id=w.cpm.peer_id, now_ms=w.now, teacher=d.teacher,
                                    student=d.student, transfer_hash=w.cfg.transfer_hash)
    arm = w.cfg.arms[directive.arm]
    assert directive.expires_at_ms == w.now + 60_000
    assert (directive.alpha, directive.temperature, directive.n_samples) == (arm.alpha, arm.temperature, arm.n_samples)
    assert len(directive.transfer_ids) == (arm.items or w.cfg.transfer_size)
    assert directive.transfer_ids == w.engine.transfer_ids(1, directive.arm)  # deterministic by round


def test_transfer_ids_are_a_deterministic_subset(tmp_path):
    w = World(tmp_path, 2)
    ids = w.engine.transfer_ids(3, 0)
    assert len(ids) == 64 and len(set(ids)) == 64 and all(0 <= i < 128 for i in ids)
    assert ids == w.engine.transfer_ids(3, 0)
    assert ids != w.engine.transfer_ids(4, 0)
    assert w.engine.transfer_ids(3, 1) == tuple(range(128))


def test_min_agents_blocks_early_quorum(tmp_path):
    w = World(tmp_path, 2, min_agents=3)
    w.profile(w.agents[0])
    w.profile(w.agents[1])
    assert w.round().state == "open"


def test_timer_matches_with_what_is_fresh(tmp_path):
    w = World(tmp_path, 3)
    w.profile(w.agents[0])
    w.now += 1000
    w.profile(w.agents[1])
    deadline = w.engine.tick(w.now)
    assert deadline == T0 + 30_000  # from the *first* fresh profile
    w.now = deadline - 1
    w.engine.tick(w.now)
    assert w.round().state == "open"
    w.now = deadline
    w.engine.tick(w.now)
    assert w.round().state == "matched"
    assert len(w.store.directives_for_round(1)) == 1
    nd = w.engine.directive(w.agents[2], 1, w.now)
    assert isinstance(nd, NoDirective) and nd.reason == "not_matched"


def test_timer_with_a_single_profile_keeps_waiting(tmp_path):
    w = World(tmp_path, 3)
    w.profile(w.agents[0])
    w.now += 31_000
    assert w.engine.tick(w.now) is None
    assert w.round().state == "open"
    w.profile(w.agents[1])  # the timer already passed: the second profile matches at once
    assert w.round().state == "matched"


def test_expiry_closes_round_and_opens_next(tmp_path):
    w = World(tmp_path, 2)
    w.profile(w.agents[0])
    w.profile(w.agents[1])
    (d,) = w.store.directives_for_round(1)
    assert w.engine.tick(w.now) == d.expires_at + 1
    w.now = d.expires_at + 1
    w.engine.tick(w.now)
    assert w.store.get_directive(d.directive_id).state == "expired"
    assert w.store.get_round(1).state == "closed"
    assert w.round().round == 2 and w.round().state == "open"
    nd = w.engine.directive(w.agents[0], 0, w.now)
    assert isinstance(nd, NoDirective) and nd.reason == "advance" and nd.round == 2


def test_feedback_rewards_once_and_closes_round(tmp_path):
    w = World(tmp_path, 2, strategy="linucb")
    w.profile(w.agents[0])
    w.profile(w.agents[1], seed=1)
    (d,) = w.store.directives_for_round(1)
    t_before = w.engine.strategy.bandit.t
    assert w.feedback(d) is True
    assert w.feedback(d) is False  # duplicate: acked, not counted
    assert w.engine.strategy.bandit.t == t_before + 1
    fb = w.store.get_feedback(d.directive_id)
    assert fb.raw_reward == pytest.approx(0.5 - DELTA_PER_KB * 10.0)
    assert w.store.get_directive(d.directive_id).state == "used"
    assert w.store.get_round(1).state == "closed" and w.round().round == 2
    name, state = w.store.load_bandit_state()
    assert name == "linucb" and state["strategy"]["bandit"]["t"] == t_before + 1


def test_feedback_from_wrong_peer_or_inconsistent_changes_nothing(tmp_path):
    w = World(tmp_path, 3)
    w.profile(w.agents[0])
    w.profile(w.agents[1])
    w.profile(w.agents[2])
    (d,) = w.store.directives_for_round(1)
    outsider = next(a for a in w.agents if a not in (d.teacher, d.student))
    with pytest.raises(Unauthorized):
        w.feedback(d, sender=d.teacher)
    with pytest.raises(Unauthorized):
        w.feedback(d, sender=outsider)
    bad = Feedback(d.directive_id, d.round + 1, d.teacher, d.student, 1.0, 1.0, 1.0, True, "")
    with pytest.raises(ProtocolError):
        w.engine.feedback(d.student, bad, w.now)
    unknown = Feedback("nope", 1, d.teacher, d.student, 1.0, 1.0, 1.0, True, "")
    with pytest.raises(Unauthorized):
        w.engine.feedback(d.student, unknown, w.now)
    assert w.store.list_feedback() == []
    assert w.store.get_directive(d.directive_id).state == "issued"


def test_failed_feedback_never_rewards_positively(tmp_path):
    w = World(tmp_path, 2, strategy="linucb")
    rewards = []
    for r in range(1, 5):
        w.profile(w.agents[0], round_=r)
        w.profile(w.agents[1], round_=r, seed=1)
        (d,) = w.store.directives_for_round(r)
        ok = r != 4
        w.feedback(d, ok=ok, pre=2.0, post=2.5 if ok else 0.0, kb=100.0)
        rewards.append(w.store.get_feedback(d.directive_id))
    failed = rewards[-1]
    assert not failed.ok and failed.reward <= 0.0
    assert failed.raw_reward == pytest.approx(-DELTA_PER_KB * 100.0)
    assert w.store.get_directive(failed.directive_id).state == "failed"


def test_late_feedback_after_expiry_is_still_recorded_once(tmp_path):
    w = World(tmp_path, 2)
    w.profile(w.agents[0])
    w.profile(w.agents[1])
    (d,) = w.store.directives_for_round(1)
    w.now = d.expires_at + 5
    w.engine.tick(w.now)
    assert w.store.get_directive(d.directive_id).state == "expired"
    assert w.feedback(d) is True
    assert w.store.get_directive(d.directive_id).state == "used"
    assert w.feedback(d) is False


def test_restart_resumes_open_round_with_its_timer(tmp_path):
    w = World(tmp_path, 3)
    w.profile(w.agents[0])
    w.now += 5_000
    w.restart()
    assert w.round().round == 1 and w.round().state == "open"
    assert w.engine.tick(w.now) == T0 + 30_000
    w.profile(w.agents[1])
    w.profile(w.agents[2])
    assert w.round().state == "matched"


def test_restart_keeps_matched_directives_and_bandit(tmp_path):
    w = World(tmp_path, 4, strategy="linucb")
    for i, a in enumerate(w.agents):
        w.profile(a, seed=i)
    ds = w.store.directives_for_round(1)
    assert len(ds) == 2
    w.feedback(ds[0])
    t = w.engine.strategy.bandit.t
    A = w.engine.strategy.bandit.A.copy()
    w.restart()
    assert w.round().state == "matched"
    assert [d.envelope for d in w.store.directives_for_round(1)] == [d.envelope for d in ds]
    assert w.engine.directive(ds[1].student, 1, w.now) == ds[1].envelope
    assert w.engine.strategy.bandit.t == t
    np.testing.assert_allclose(w.engine.strategy.bandit.A, A)
    assert w.feedback(ds[0]) is False  # exactly once across the restart
    w.now = ds[1].expires_at + 1
    w.restart()  # a directive that expired while the CPM was down expires at start
    assert w.store.get_directive(ds[1].directive_id).state == "expired"
    assert w.round().round == 2


def test_max_rounds_finishes(tmp_path):
    w = World(tmp_path, 2, max_rounds=1)
    w.profile(w.agents[0])
    w.profile(w.agents[1])
    (d,) = w.store.directives_for_round(1)
    w.feedback(d)
    assert w.engine.finished()
    assert w.store.latest_round().round == 1  # no round 2 is opened
    nd = w.profile(w.agents[0], round_=2)
    assert isinstance(nd, NoDirective) and nd.reason == "finished"
    assert w.engine.directive(d.student, 1, w.now) == d.envelope  # its own directive stays fetchable
    nd = w.engine.directive(w.agents[0], 2, w.now)
    assert isinstance(nd, NoDirective) and nd.reason == "finished"
    w.restart()
    assert w.engine.finished() and w.store.latest_round().round == 1


def test_profile_round_and_content_checks(tmp_path):
    w = World(tmp_path, 3)
    nd = w.profile(w.agents[0], round_=0)
    assert nd.reason == "advance" and nd.round == 1
    nd = w.profile(w.agents[0], round_=5)
    assert nd.reason == "round_pending"
    with pytest.raises(MalformedFrame):
        w.engine.profile(w.agents[0], Profile(1, (0.0,) * 31, w.cfg.transfer_hash), w.now)
    with pytest.raises(ProtocolError):
        w.engine.profile(w.agents[0], Profile(1, (0.0,) * 32, "0" * 64), w.now)
    stranger = Identity.generate().peer_id
    w.store.admit(stranger, "", w.now)
    with pytest.raises(ProtocolError, match="Register"):
        w.engine.profile(stranger, Profile(1, (0.0,) * 32, w.cfg.transfer_hash), w.now)
    assert w.store.list_profiles() == []
    w.profile(w.agents[0])
    w.profile(w.agents[1])
    w.profile(w.agents[2])
    nd = w.profile(w.agents[0])  # round 1 is matched now: too late for it
    assert nd.reason == "round_pending" and nd.round == 2


def test_peer_lookup_only_for_paired_peers(tmp_path):
    w = World(tmp_path, 3)
    for a in w.agents:
        w.profile(a)
    (d,) = w.store.directives_for_round(1)
    outsider = next(a for a in w.agents if a not in (d.teacher, d.student))
    addrs = w.engine.peer_lookup(d.student, d.teacher)
    i = w.agents.index(d.teacher)
    assert addrs.addrs == (f"/ip4/127.0.0.1/tcp/{4000 + i}",)
    with pytest.raises(Unauthorized):
        w.engine.peer_lookup(outsider, d.teacher)
    with pytest.raises(Unauthorized):
        w.engine.peer_lookup(d.student, outsider)


def test_revoked_agent_leaves_quorum_and_matching(tmp_path):
    w = World(tmp_path, 3)
    w.profile(w.agents[0])
    w.profile(w.agents[1])
    assert w.round().state == "open"
    w.store.revoke(w.agents[2], w.now)  # from the admin CLI, another connection
    w.engine.tick(w.now)
    assert w.round().state == "matched"
    (d,) = w.store.directives_for_round(1)
    assert {d.teacher, d.student} == {w.agents[0], w.agents[1]}


def test_revoked_agent_profile_is_not_matched(tmp_path):
    w = World(tmp_path, 3)
    w.profile(w.agents[0])
    w.profile(w.agents[2])
    w.store.revoke(w.agents[2], w.now)
    w.profile(w.agents[1])  # quorum: 2 fresh of 2 active admitted
    (d,) = w.store.directives_for_round(1)
    assert w.agents[2] not in (d.teacher, d.student)


def test_central_kd_hub_teaches_many(tmp_path):
    w = World(tmp_path, 4, strategy="central-kd")
    for i, a in enumerate(w.agents):
        w.profile(a, seed=i)
    ds = w.store.directives_for_round(1)
    assert len(ds) == 2  # k_pairs = N // 2
    assert len({d.teacher for d in ds}) == 1
    assert len({d.student for d in ds}) == 2


def test_local_only_rounds_advance_without_pairs(tmp_path):
    w = World(tmp_path, 2, strategy="local-only")
    w.profile(w.agents[0])
    w.profile(w.agents[1])
    assert w.store.get_round(1).state == "closed" and w.round().round == 2
    nd = w.engine.directive(w.agents[0], 1, w.now)
    assert isinstance(nd, NoDirective) and nd.reason == "advance" and nd.round == 2


def test_expired_is_not_raised_for_directive_fetch(tmp_path):
    """Fetching a directive after its expiry still returns it; the teacher refuses it."""
    w = World(tmp_path, 2)
    w.profile(w.agents[0])
    w.profile(w.agents[1])
    (d,) = w.store.directives_for_round(1)
    with pytest.raises(Expired):
        verify_directive(d.envelope, cpm_peer_id=w.cpm.peer_id, now_ms=d.expires_at + 1)
