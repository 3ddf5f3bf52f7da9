"""cpm.lease and the replica engine: two CPM replicas on one throwaway PostgreSQL store
(tests/pg.py), each with its own connection, its own RoundEngine and its own lease.

No sleeps and no wall-clock asserts: a lease "lapses" because the test moves its
``expires_at`` into the past in the database (what time would do), and a holder's local
deadline is an injected monotonic clock. Everything asserted is a count of rows."""

from __future__ import annotations

import numpy as np
import pytest

from cpm.config import CpmConfig, ConfigError, validate
from cpm.lease import Leadership, LeaseUnsupported
from cpm.rounds import RoundEngine
from cpm.store import open_store
from protocol.envelope import Identity
from protocol.messages import Feedback, NoDirective, Profile, Register
from tests.pg import PgTestServer

T0 = 1_700_000_000_000


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Replica:
    def __init__(self, url: str, cfg: CpmConfig, cpm: Identity, clock: Clock, name: str) -> None:
        self.store = open_store(url)
        self.lease = Leadership(self.store, ttl_s=5.0, holder=name, monotonic=clock)
        self.engine = RoundEngine(self.store, cfg, cpm, leader=self.lease)

    def close(self) -> None:
        self.lease.close()
        self.store.close()


class Pair:
    """Two replicas a and b, n admitted agents, one shared CPM identity."""

    def __init__(self, pg_server: PgTestServer, url: str, n: int = 4, **cfg_kw) -> None:
        self.pg, self.url = pg_server, url
        self.cfg = CpmConfig(**{"strategy": "linucb", "round_timer_s": 30.0, "directive_ttl_s": 60.0,
                                "lease_s": 5.0, **cfg_kw})
        self.cpm = Identity.generate()
        self.clock = Clock()
        self.now = T0
        self.a = Replica(url, self.cfg, self.cpm, self.clock, "a")
        self.b = Replica(url, self.cfg, self.cpm, self.clock, "b")
        self.agents = [Identity.generate().peer_id for _ in range(n)]
        for i, p in enumerate(self.agents):
            self.a.store.admit(p, f"org{i}", self.now)

    def lapse(self) -> None:
        """What time would do: the lease's expiry passes (the database's clock decides)."""
        self.pg.sql(self.url, "UPDATE lease SET expires_at = clock_timestamp() - interval '1 second'")

    def register_all(self, r: Replica) -> None:
        for i, p in enumerate(self.agents):
            with r.store.transaction():
                r.engine.register(p, Register(f"org{i}", "qwen2", ("/ip4/127.0.0.1/tcp/1",), "t"), self.now)

    def profile(self, r: Replica, agent: str, round_: int) -> object:
        vec = np.random.default_rng(abs(hash((agent, round_))) % 2**32).random(32)
        vec[20:32] /= vec[20:32].sum()
        with r.store.transaction():
            return r.engine.profile(agent, Profile(round_, tuple(float(v) for v in vec), self.cfg.transfer_hash),
                                    self.now)

    def feedback(self, r: Replica, d, post: float = 1.5) -> bool:
        fb = Feedback(d.directive_id, d.round, d.teacher, d.student, 2.0, post, 10.0, True, "")
        with r.store.transaction():
            return r.engine.feedback(d.student, fb, self.now)

    def tick(self, r: Replica) -> None:
        with r.store.transaction():
            r.engine.tick(self.now)

    def close(self) -> None:
        self.a.close()
        self.b.close()


@pytest.fixture()
def pair(pg_server: PgTestServer, pg_url: str):
    p = Pair(pg_server, pg_url)
    yield p
    p.close()


def test_one_holder_at_a_time_and_a_takeover_only_after_the_lease_lapsed(pair: Pair) -> None:
    assert pair.a.lease.renew() and pair.a.lease.epoch == 1
    assert not pair.b.lease.renew() and pair.b.lease.epoch is None  # live lease: no takeover
    assert pair.a.lease.renew() and pair.a.lease.epoch == 1  # a renewal keeps the term
    pair.lapse()
    assert pair.b.lease.renew() and pair.b.lease.epoch == 2  # a new holder, a new epoch
    assert pair.a.lease.holds()  # a's local deadline has not passed: it does not know yet …
    with pair.a.store.transaction():
        assert not pair.a.lease.fence()  # … but the fence refuses it in the database
    assert not pair.a.lease.holds()
    assert not pair.a.lease.renew()  # and it cannot renew a term it no longer holds
    assert pair.a.lease.terms == 1 and pair.b.lease.terms == 1


def test_a_released_lease_is_taken_over_at_once(pair: Pair) -> None:
    assert pair.a.lease.renew()
    pair.a.lease.release()
    assert pair.b.lease.renew() and pair.b.lease.epoch == 2


def test_the_local_deadline_stops_a_holder_that_could_not_renew(pair: Pair) -> None:
    assert pair.a.lease.renew() and pair.a.lease.holds()
    pair.clock.t += 5.0  # ttl passed on a's monotonic clock without a renew
    assert not pair.a.lease.holds()


def test_only_the_holder_opens_and_matches_rounds_and_followers_see_them(pair: Pair) -> None:
    pair.a.lease.renew()
    pair.tick(pair.b)  # a follower: no round 1
    assert pair.a.store.list_rounds() == []
    pair.register_all(pair.b)  # any replica registers …
    assert pair.a.store.list_rounds() == []
    pair.tick(pair.a)
    assert [r.round for r in pair.a.store.list_rounds()] == [1]
    epoch = pair.b.engine.epoch
    for i, agent in enumerate(pair.agents):  # … and ingests, alternating replicas
        assert pair.profile(pair.a if i % 2 else pair.b, agent, 1) is None
    assert pair.a.store.latest_round().state in ("open", "matched")
    pair.tick(pair.b)
    pair.tick(pair.a)
    assert pair.a.store.latest_round().state == "matched"
    assert len(pair.a.store.directives_for_round(1)) == 2
    pair.tick(pair.b)
    assert pair.b.engine.epoch > epoch  # the follower's long-polls wake on the holder's match
    d = pair.a.store.directives_for_round(1)[0]
    assert pair.b.engine.directive(d.student, 1, pair.now) == d.envelope  # served by the follower


def test_a_stale_holder_never_matches_a_round_twice(pair: Pair) -> None:
    pair.a.lease.renew()
    pair.register_all(pair.a)
    for agent in pair.agents[:3]:
        pair.profile(pair.a, agent, 1)
    pair.lapse()  # a is paused past its lease (its local clock did not move: it still believes)
    assert pair.b.lease.renew() and pair.b.lease.epoch == 2
    pair.profile(pair.b, pair.agents[3], 1)  # the quorum completes on b, the new holder matches
    pair.tick(pair.b)
    assert pair.b.store.latest_round().state == "matched"
    pair.profile(pair.a, pair.agents[3], 1)  # a resumes: a request, a tick — fenced
    pair.tick(pair.a)
    assert len(pair.a.store.directives_for_round(1)) == 2
    peers = [p for d in pair.a.store.directives_for_round(1) for p in (d.teacher, d.student)]
    assert len(peers) == len(set(peers)) == 4  # no agent in two directives of the round
    assert not pair.a.lease.holds()


def test_rewards_on_both_replicas_all_reach_the_bandit(pair: Pair) -> None:
    """Feedback alternates between the replicas; each reward builds on the other's save,
    so the stored state counts every one (a lost update would count fewer)."""
    pair.a.lease.renew()
    pair.register_all(pair.a)
    pair.tick(pair.a)
    rewards = 0
    for round_ in (1, 2, 3):
        for agent in pair.agents:
            pair.profile(pair.b, agent, round_)
        pair.tick(pair.a)
        directives = pair.a.store.directives_for_round(round_)
        assert len(directives) == 2
        for i, d in enumerate(directives):
            assert pair.feedback(pair.b if (i + round_) % 2 else pair.a, d, post=1.0 + 0.1 * i)
            rewards += 1
        for d in directives:  # a duplicate on the other replica changes nothing
            assert not pair.feedback(pair.a, d)
        pair.tick(pair.a)
        assert pair.a.store.get_round(round_).state == "closed"
    name, state = pair.a.store.load_bandit_state()
    assert name == "linucb" and state["z"]["n"] == rewards == len(pair.a.store.list_feedback())


def test_a_new_holder_continues_from_the_database(pair: Pair) -> None:
    pair.a.lease.renew()
    pair.register_all(pair.a)
    pair.tick(pair.a)
    for agent in pair.agents:
        pair.profile(pair.a, agent, 1)
    d1 = pair.a.store.directives_for_round(1)
    for d in d1:
        pair.feedback(pair.a, d)
    pair.lapse()  # a dies after the feedback, before it closed the round
    assert pair.b.lease.renew()
    pair.tick(pair.b)
    assert pair.b.store.get_round(1).state == "closed" and pair.b.store.latest_round().round == 2
    assert isinstance(pair.profile(pair.b, pair.agents[0], 1), NoDirective)  # round 1 is over


def test_replicas_need_a_postgresql_store(tmp_path) -> None:
    store = open_store(tmp_path / "cpm.db")
    try:
        with pytest.raises(LeaseUnsupported, match="PostgreSQL"):
            Leadership(store, ttl_s=5.0)
    finally:
        store.close()
    with pytest.raises(ConfigError, match="lease_s"):
        validate(CpmConfig(lease_s=5.0))  # the default store is SQLite
    with pytest.raises(ConfigError, match="lease_s"):
        validate(CpmConfig(lease_s=-1.0, store="postgresql://u@h/db"))
    validate(CpmConfig(lease_s=5.0, store="postgresql://u@h/db"))


def test_doctor_names_the_holder_and_a_lapsed_lease(pair: Pair, tmp_path) -> None:
    from cpm import config as C
    from cpm.doctor import check_lease

    home = tmp_path / "cpm"
    home.mkdir()
    C.save_config(home, CpmConfig(store=pair.url, lease_s=5.0))
    assert check_lease(home).status == "warn"  # nobody ever held it
    pair.a.lease.renew()
    check = check_lease(home)
    assert check.status == "ok" and "held by a (epoch 1)" in check.detail
    pair.lapse()
    check = check_lease(home)
    assert check.status == "warn" and "no replica runs the rounds" in check.detail


def test_the_lease_gauge_follows_the_holder(pair: Pair) -> None:
    import urllib.request

    from cpm.service import CpmService

    service = CpmService(pair.cfg, pair.cpm, pair.a.store, leader=pair.a.lease)
    port = service.metrics.start(0)  # 127.0.0.1, a free port

    def gauge() -> str:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        return next(ln for ln in body.splitlines() if ln.startswith("knexa_cpm_lease_held "))

    try:
        assert gauge().endswith(" 0.0")
        pair.a.lease.renew()
        assert gauge().endswith(" 1.0")
        pair.clock.t += 5.0  # no renew within the lease
        assert gauge().endswith(" 0.0")
    finally:
        service.metrics.stop()
