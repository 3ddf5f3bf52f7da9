"""A poisoned teacher is quarantined by the real CPM engine within the documented bound.

16 SyntheticAgents through ``RoundEngine`` (temp SQLite, fake clock; see
``quarantine_world``). The poisoner is the population's strongest agent. Strategy
``heuristic`` is the worst case for the defence: it makes the best performer teach
every round, so without the quarantine the poisoner would teach in every round (the
honest control shows exactly that). ``linucb`` runs in tests/reliability/
test_poison_quarantine.py (slower: its matching and state dominate the run).

Bound (cpm/reputation.py, docs/threat-model.md T19): the teacher is quarantined at the
B(u)-th delivery, B(0) = 8, B(1) = 12, B(2) = 15, B(3) = 18, u = its deliveries that
did not read harmful (measurement noise on a weak student); after it, never a teacher.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from cpm.reputation import ReputationPolicy, TeacherRecord, binomial_tail_half, reputation_from_saved
from cpm.store import StoreUnavailable
from tests.unit.quarantine_world import EngineWorld, WorldLog, strongest
from tests.unit.test_rounds import World

N = 16
ROUNDS = 22
SEEDS = (0, 1, 2)
MAX_HARMLESS_LOOKING = 3  # u: more would mean the poison is too weak to see, not a bound


@pytest.fixture
def db_dir(tmp_path: Path) -> Iterator[Path]:
    """RAM-backed directory for the CPM database where there is one: every message is a
    ``synchronous=FULL`` commit, and these tests check matching, not fsync (durability
    has its own tests in test_store_contract.py and the kill -9 tests)."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="knexa-quarantine-", dir=shm))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def bound(u: int, policy: ReputationPolicy = ReputationPolicy()) -> int:
    """B(u): deliveries needed when u of them looked harmless (sign-test part)."""
    n = u + 1
    while binomial_tail_half(n, n - u) > policy.alpha * (1 + 1e-9):
        n += 1
    return n


def check_stopped(log: WorldLog, poisoner: int) -> tuple[int, int]:
    """The assertions of the claim; returns (rounds it taught, u)."""
    taught = log.taught_rounds(poisoner)
    assert poisoner in log.quarantined, f"taught {len(taught)} rounds, never quarantined"
    q_round = log.quarantined[poisoner]
    assert all(r <= q_round for r in taught), (q_round, taught)  # never a teacher after
    gains = [d.gain for d in log.deliveries if d.teacher == poisoner]
    assert all(d.true_gain < 0 for d in log.deliveries if d.teacher == poisoner)  # it really harmed
    u = sum(g >= 0 for g in gains)
    assert u <= MAX_HARMLESS_LOOKING, gains
    assert len(taught) <= bound(u) <= bound(MAX_HARMLESS_LOOKING) == 18, (len(taught), u)
    return len(taught), u


@pytest.mark.parametrize("seed", SEEDS)
def test_poisoned_teacher_is_never_matched_after_the_bound(seed: int, db_dir: Path) -> None:
    poisoner = strongest(N, seed)
    world = EngineWorld(db_dir, n=N, seed=seed, strategy="heuristic", poisoned=(poisoner,))
    with capture_logs() as logs:
        log = world.run(ROUNDS)
    check_stopped(log, poisoner)
    (event,) = [e for e in logs if e["event"] == "cpm.teacher.quarantined"]
    assert event["teacher"] == world.peers[poisoner] and event["log_level"] == "warning"
    assert {"round", "directive", "reason", "deliveries", "harmful", "mean_gain", "p_value"} <= set(event)
    assert event["mean_gain"] < 0 and event["reason"] in ("sign_test", "recent_window")
    assert world.engine.stats()["quarantined_teachers"] == 1
    # the CPM kept matching everyone else: every round still had N/2 pairs or one fewer
    per_round = [sum(1 for d in log.deliveries if d.round == r) for r in range(1, ROUNDS + 1)]
    assert min(per_round) >= N // 2 - 1, per_round


@pytest.mark.parametrize("seed", SEEDS)
def test_same_agent_honest_keeps_teaching(seed: int, db_dir: Path) -> None:
    """Control: unpoisoned, the same agent teaches in most rounds and nobody is quarantined."""
    best = strongest(N, seed)
    log = EngineWorld(db_dir, n=N, seed=seed, strategy="heuristic").run(ROUNDS)
    assert not log.quarantined
    assert len(log.taught_rounds(best)) >= ROUNDS // 2


def test_quarantine_survives_a_restart_and_is_visible_to_operators(db_dir: Path) -> None:
    seed = 0
    poisoner = strongest(N, seed)
    world = EngineWorld(db_dir, n=N, seed=seed, strategy="heuristic", poisoned=(poisoner,))
    while poisoner not in world.log.quarantined:
        assert world.engine.current_round() <= ROUNDS
        world.round()
    q_round = world.log.quarantined[poisoner]
    with capture_logs() as logs:
        world.restart()  # a new engine on the same database (as after kill -9)
    assert world.engine.reputation.is_quarantined(world.peers[poisoner])
    assert any(e["event"] == "cpm.reputation.restored" and e["quarantined"] == 1 for e in logs)
    view = reputation_from_saved(world.store.load_bandit_state())  # what the admin CLI can read
    (row,) = [r for r in view.rows() if r["quarantined"]]
    assert row["teacher"] == world.peers[poisoner] and row["quarantined_round"] == q_round
    world.run(6)
    assert max(world.log.taught_rounds(poisoner)) <= q_round
    # an operator release lifts it durably: the next engine lets it teach again
    assert world.engine.release_teacher(world.peers[poisoner], world.now)
    world.restart()
    assert not world.engine.reputation.quarantined()
    world.run(2)
    assert max(world.log.taught_rounds(poisoner)) > q_round


def test_sleeper_is_stopped_within_the_window_after_it_turns(db_dir: Path) -> None:
    """Honest (and helpful) for 10 rounds, poisoned afterwards: its good history does not
    shield it — stopped within ``window`` − 1 = 15 deliveries after it turns (one more
    per harmless-looking reading, at most one)."""
    seed, turns = 0, 10
    poisoner = strongest(N, seed)
    world = EngineWorld(db_dir, n=N, seed=seed, strategy="heuristic", poisoned=(poisoner,), poison_from=turns)
    log = world.run(turns + 18)
    before = [d for d in log.deliveries if d.teacher == poisoner and d.round <= turns]
    after = [d for d in log.deliveries if d.teacher == poisoner and d.round > turns]
    assert len(before) >= turns - 1 and sum(d.gain for d in before) > 0  # it earned credit first
    assert poisoner in log.quarantined
    assert max(log.taught_rounds(poisoner)) <= log.quarantined[poisoner]
    u = sum(d.gain >= 0 for d in after)
    assert u <= 1 and len(after) <= 15 + u, [round(d.gain, 4) for d in after]
    assert world.engine.reputation.teachers[world.peers[poisoner]].reason == "recent_window"


@pytest.mark.parametrize("strategy", ["linucb", "random", "heuristic", "central-kd"])
def test_no_strategy_gets_a_quarantined_teacher_through(strategy: str, db_dir: Path) -> None:
    """Quarantine is the engine's, not the strategy's: whoever proposes the pairs, a
    quarantined peer is never a teacher — and the others are still paired."""
    world = EngineWorld(db_dir, n=8, seed=3, strategy=strategy)
    banned = {world.peers[strongest(8, 3)], world.peers[0]}  # the most attractive teacher among them
    for peer in banned:
        rec = world.engine.reputation.teachers.setdefault(peer, TeacherRecord())
        rec.quarantined_round, rec.reason = 1, "sign_test"
    with capture_logs() as logs:
        world.run(4)
    teachers = {world.peers[d.teacher] for d in world.log.deliveries}
    assert teachers and not teachers & banned
    per_round = [sum(1 for d in world.log.deliveries if d.round == r) for r in range(1, 5)]
    assert min(per_round) >= (3 if strategy != "central-kd" else 1), per_round
    if strategy == "heuristic":  # it wanted the strongest as a teacher: the engine refused it
        assert any(e["event"] == "cpm.match.quarantine_applied" for e in logs)



def _play(w: World, bad: str, *, until, hold_bad: bool = False):
    """Rounds of 2 agents in which every delivery of ``bad`` harms its student and the
    other teacher helps, until ``until(directive)`` holds after a round. With
    ``hold_bad``, the first directive naming ``bad`` as teacher gets no feedback (it
    expires) and is returned — what a student's outbox may still deliver much later."""
    for _ in range(80):
        r = w.engine.current_round()
        w.now += 1000
        w.profile(w.agents[0], round_=r)
        w.profile(w.agents[1], round_=r, seed=1)
        (d,) = w.store.directives_for_round(r)
        if hold_bad and d.teacher == bad:
            w.now += int(w.cfg.directive_ttl_s * 1000) + 1
            w.engine.tick(w.now)  # expires it, closes the round
            return d
        w.feedback(d, pre=1.0, post=1.2 if d.teacher == bad else 0.8)
        if until(d):
            return d
    raise AssertionError("did not happen")


def test_release_is_durable_and_ignores_old_evidence(tmp_path: Path) -> None:
    """A release survives a restart, and late feedback for a directive issued before it
    does not count against the released teacher; deliveries after the release do."""
    w = World(tmp_path, 2)
    bad, good = w.agents
    rep = lambda: w.engine.reputation  # noqa: E731 — the engine is rebuilt on restart
    _play(w, bad, until=lambda d: bad in rep().teachers and rep().teachers[bad].deliveries == 7)
    pending = _play(w, bad, until=lambda d: False, hold_bad=True)
    _play(w, bad, until=lambda d: rep().is_quarantined(bad))
    assert rep().teachers[bad].deliveries == 8 and not rep().is_quarantined(good)

    saved = w.store.load_bandit_state()
    assert w.engine.release_teacher(good, w.now) is None  # not quarantined: refused, nothing written
    assert w.store.load_bandit_state() == saved and good in rep().teachers
    w.now += 1000
    with capture_logs() as logs:
        cleared = w.engine.release_teacher(bad, w.now, admin="op")
    assert cleared is not None and cleared.harmful == 8 and cleared.reason == "sign_test"
    (event,) = [e for e in logs if e["event"] == "cpm.teacher.released"]
    assert event["teacher"] == bad and event["admin"] == "op" and event["harmful"] == 8
    w.restart()
    assert not rep().is_quarantined(bad) and rep().released == {bad: w.now}

    w.now += 1000
    with capture_logs() as logs:
        assert w.feedback(pending, pre=1.0, post=1.5)  # late, harmful, issued before the release
    assert bad not in rep().teachers
    assert any(e["event"] == "cpm.reputation.pre_release_delivery" and e["teacher"] == bad for e in logs)
    # a teacher like any other again: it is matched, and its new deliveries count
    _play(w, bad, until=lambda d: d.teacher == bad)
    assert rep().teachers[bad].deliveries == 1 and not rep().is_quarantined(bad)


def test_failed_release_write_leaves_the_quarantine_in_place(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    w = World(tmp_path, 2)
    bad = w.agents[0]
    _play(w, bad, until=lambda d: w.engine.reputation.is_quarantined(bad))

    def disk_full(*args: object, **kwargs: object) -> None:
        raise StoreUnavailable("database or disk is full")

    monkeypatch.setattr(w.store, "save_bandit_state", disk_full)
    with pytest.raises(StoreUnavailable):
        w.engine.release_teacher(bad, w.now)
    assert w.engine.reputation.is_quarantined(bad) and w.engine.reputation.released == {}
