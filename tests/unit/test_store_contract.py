"""The ``cpm.store.Store`` contract, run against every backend: SQLite and PostgreSQL.

Why: the round engine, the service, the admin tools, the harness and the benchmarks
rely on these behaviours, not on one database; a backend that passes this module can
replace another. A backend is one function in ``LOCATIONS`` returning the location of a
fresh, empty store for one test (PostgreSQL: a new schema on the session's throwaway
server, tests/pg.py — skipped, loudly, only where no server binary exists). "Empty"
means ``open_store(location, readonly=True)`` raises ``StoreNotFound`` until the first
read-write ``open_store`` created it. Backend-only behaviour is tested beside each
backend: test_store.py, test_store_tally.py, test_store_group_commit.py (SQLite: WAL,
PRAGMAs, a COMMIT refused by SQLite), test_store_postgres.py (PostgreSQL: lock
timeout, lost connection, silent rollback of an aborted transaction, schemas).
"""

from __future__ import annotations

import ast
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from cpm.config import CpmConfig
from cpm.rounds import RoundEngine
from cpm.store import (
    BatchCommitError,
    DirectiveRow,
    FeedbackRow,
    GroupCommit,
    Store,
    StoreNotFound,
    StoreUnavailable,
    UnsupportedBackend,
    open_store,
)
from protocol.envelope import Identity
from protocol.messages import Feedback, Profile, Register

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000_000


def _sqlite(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return f"sqlite:{tmp_path / 'cpm.db'}"


def _postgresql(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return request.getfixturevalue("pg_url")  # a new schema on the session's server (tests/pg.py)


LOCATIONS: dict[str, Callable[[pytest.FixtureRequest, Path], str]] = {"sqlite": _sqlite, "postgresql": _postgresql}


@pytest.fixture(params=sorted(LOCATIONS))
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return LOCATIONS[request.param](request, tmp_path)


@pytest.fixture()
def store(location: str) -> Iterator[Store]:
    s = open_store(location)
    yield s
    s.close()


@pytest.fixture()
def other(store: Store, location: str) -> Iterator[Store]:
    """A second connection: the admin CLI (another process), or the disk after a crash."""
    s = open_store(location)
    yield s
    s.close()


def _pid() -> str:
    return Identity.generate().peer_id


def _directive(did: str, round_: int, teacher: str, student: str, expires_at: int = 10_000) -> DirectiveRow:
    return DirectiveRow(did, round_, teacher, student, 1, {"alpha": 0.4}, 0.5, [1.0, 2.0], "issued", 0,
                        expires_at, b"env")


def _profiles(store: Store) -> dict[str, float]:
    return {p["peer_id"]: p["vector"][0] for p in store.list_profiles(1)}


# ---- the interface -----------------------------------------------------------------------


def test_a_backend_implements_the_whole_protocol(store: Store) -> None:
    assert isinstance(store, Store) and isinstance(store, GroupCommit)
    assert store.location and store.schema_version() >= 1


def test_unknown_schemes_and_missing_drivers_are_typed_errors(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UnsupportedBackend, match="unknown store backend"):
        open_store("mongodb://db.example/knexa")
    monkeypatch.setitem(sys.modules, "psycopg", None)  # the postgres extra not installed
    monkeypatch.delitem(sys.modules, "cpm.store_postgres", raising=False)
    monkeypatch.delitem(sys.modules, "cpm.pgdb", raising=False)
    with pytest.raises(UnsupportedBackend, match=r"pip install 'knexa\[postgres\]'"):
        open_store("postgresql://cpm@db.example/knexa")
    s = open_store(tmp_path / "plain.db")  # a plain path is SQLite, as is sqlite:PATH
    s.close()


def test_a_readonly_store_refuses_writes_as_unavailable(store: Store, location: str) -> None:
    """An observer's store (or a standby after a failover) cannot write: retry later
    elsewhere (``StoreUnavailable``), not a broken store."""
    a = _pid()
    store.admit(a, "", 1)
    ro = open_store(location, readonly=True)
    try:
        with pytest.raises(StoreUnavailable):
            ro.revoke(a, 2)
        assert ro.is_admitted(a) and store.is_admitted(a)
    finally:
        ro.close()


def test_readonly_needs_an_existing_store_and_sees_what_was_committed(location: str) -> None:
    with pytest.raises(StoreNotFound):
        open_store(location, readonly=True)
    writer = open_store(location)
    a = _pid()
    writer.admit(a, "org", 1)
    reader = open_store(location, readonly=True)
    try:
        assert reader.is_admitted(a)
        writer.revoke(a, 2)
        assert reader.is_revoked(a)  # a watcher sees commits as they happen
        health = reader.health()
        assert health.integrity == "ok" and health.durability_warning is None
        assert health.schema_version == health.schema_expected == writer.schema_version()
        assert health.counts == writer.counts() and health.counts["revoked"] == 1
    finally:
        reader.close()
        writer.close()


# ---- agents and admission ---------------------------------------------------------------


def test_admit_revoke_register_cycle(store: Store) -> None:
    a = _pid()
    assert not store.is_admitted(a) and store.admission(a) == (False, False)
    store.admit(a, "org-a", 1)
    assert store.is_admitted(a) and store.admission(a) == (True, False)
    store.register(a, org="other", family="qwen2", listen_addrs=["/ip4/1.2.3.4/tcp/1"], agent_version="1",
                   now_ms=5)
    row = store.get_agent(a)
    assert row is not None
    assert row.org == "org-a"  # the admin's label wins over what the agent claims
    assert row.family == "qwen2" and row.listen_addrs == ("/ip4/1.2.3.4/tcp/1",)
    assert row.registered_at == 5 and row.last_seen == 5 and row.admitted_at == 1
    store.touch(a, 9)
    assert store.get_agent(a).last_seen == 9
    assert store.revoke(a, 10) is True
    assert not store.is_admitted(a) and store.is_revoked(a)
    store.admit(a, "", 11)  # re-admission clears the revocation, keeps the org
    assert store.is_admitted(a) and store.get_agent(a).org == "org-a"


def test_revoke_unknown_peer_is_a_preemptive_ban(store: Store) -> None:
    b = _pid()
    assert store.revoke(b, 1) is False
    assert store.is_revoked(b)
    store.register(b, org="x", family="f", listen_addrs=[], agent_version="1", now_ms=2, admit=True)
    assert not store.is_admitted(b)  # open admission never un-revokes


def test_open_admission_register_admits_unknown(store: Store) -> None:
    c, d = sorted((_pid(), _pid()))
    store.register(c, org="x", family="f", listen_addrs=[], agent_version="1", now_ms=2, admit=True)
    store.register(d, org="x", family="f", listen_addrs=[], agent_version="1", now_ms=2, admit=False)
    assert store.is_admitted(c) and not store.is_admitted(d)
    assert [r.peer_id for r in store.list_agents()] == [c, d]


def test_count_active_needs_admission_registration_and_recent_contact(store: Store) -> None:
    a, b, c, r = _pid(), _pid(), _pid(), _pid()
    for p in (a, b, c, r):
        store.admit(p, "", 0)
    store.register(a, org="", family="f", listen_addrs=[], agent_version="", now_ms=100)
    store.register(b, org="", family="f", listen_addrs=[], agent_version="", now_ms=10)
    store.register(r, org="", family="f", listen_addrs=[], agent_version="", now_ms=100)
    store.revoke(r, 101)
    assert store.count_active(since_ms=50) == 1  # b is stale, c never registered, r revoked
    assert store.count_active(since_ms=0) == 2
    store.touch(b, 5_000)
    assert store.count_active(since_ms=4_999) == 1 and store.count_active(since_ms=5_001) == 0


def test_second_connection_sees_admin_changes(store: Store, other: Store) -> None:
    a = _pid()
    other.admit(a, "", 1)
    assert store.is_admitted(a)
    other.revoke(a, 2)
    assert not store.is_admitted(a)


# ---- profiles, rounds, directives, feedback, state ---------------------------------------


def test_profiles_latest_wins_and_only_admitted_are_fresh(store: Store) -> None:
    a, b = sorted((_pid(), _pid()))
    for p in (a, b):
        store.admit(p, "", 0)
    store.put_profile(a, 1, [0.0] * 32, "h", 10)
    store.put_profile(a, 1, [1.0] * 32, "h2", 20)
    store.put_profile(b, 1, [2.0] * 32, "h", 15)
    store.put_profile(a, 2, [3.0] * 32, "h", 30)
    store.put_profile(_pid(), 1, [4.0] * 32, "h", 12)  # never admitted: stored, not fresh
    assert store.fresh_profiles(1) == [(a, [1.0] * 32), (b, [2.0] * 32)]
    assert store.count_fresh(1) == 2 and store.count_fresh(2) == 1 and store.count_fresh(3) == 0
    assert store.first_profile_at(1) == 12 and store.first_profile_at(3) is None
    assert store.get_agent(a).last_seen == 30  # a profile is contact
    mine = [p for p in store.list_profiles() if p["peer_id"] == a]
    assert mine == [{"peer_id": a, "round": 1, "vector": [1.0] * 32, "transfer_hash": "h2", "received_at": 20},
                    {"peer_id": a, "round": 2, "vector": [3.0] * 32, "transfer_hash": "h", "received_at": 30}]
    assert len(store.list_profiles(1)) == 3
    store.revoke(b, 40)
    assert [p for p, _ in store.fresh_profiles(1)] == [a] and store.count_fresh(1) == 1
    store.admit(b, "", 41)
    assert store.count_fresh(1) == 2


def test_round_lifecycle(store: Store) -> None:
    assert store.latest_round() is None and store.list_rounds() == []
    store.open_round(1, 100)
    store.set_round_matched(1, 200)
    store.set_round_closed(1, 300)
    store.open_round(2, 400)
    r1 = store.get_round(1)
    assert (r1.round, r1.state, r1.opened_at, r1.matched_at, r1.closed_at) == (1, "closed", 100, 200, 300)
    latest = store.latest_round()
    assert (latest.round, latest.state, latest.matched_at) == (2, "open", None)
    assert [r.round for r in store.list_rounds()] == [1, 2] and store.get_round(3) is None


def test_directive_queries(store: Store) -> None:
    store.add_directive(_directive("d2", 1, "t2", "s2", expires_at=200))
    store.add_directive(_directive("d1", 1, "t", "s", expires_at=100))
    store.add_directive(_directive("d3", 2, "t", "s", expires_at=300))
    assert store.directive_for_peer(1, "s").directive_id == "d1"
    assert store.directive_for_peer(1, "t2").directive_id == "d2"
    assert store.directive_for_peer(3, "s") is None
    assert [d.directive_id for d in store.directives_for_round(1)] == ["d1", "d2"]
    assert [d.directive_id for d in store.list_directives()] == ["d1", "d2", "d3"]
    assert [d.directive_id for d in store.list_directives(2)] == ["d3"]
    assert [d.directive_id for d in store.expirable(1, 150)] == ["d1"] and store.expirable(1, 100) == []
    assert store.next_expiry(1) == 100
    store.set_directive_state("d1", "expired")
    assert store.has_issued(1) and store.next_expiry(1) == 200
    store.set_directive_state("d2", "used")
    assert not store.has_issued(1) and store.next_expiry(1) is None and store.has_issued(2)
    assert store.get_directive("d2") == DirectiveRow("d2", 1, "t2", "s2", 1, {"alpha": 0.4}, 0.5, [1.0, 2.0],
                                                     "used", 0, 200, b"env")
    assert store.get_directive("nope") is None


def test_a_hub_teacher_finds_a_directive_and_a_student_its_own(store: Store) -> None:
    """central-kd: one teacher, many students; a peer that is also a student gets that one."""
    store.add_directive(_directive("d1", 1, "hub", "s1"))
    store.add_directive(_directive("d2", 1, "hub", "s2"))
    store.add_directive(_directive("d3", 1, "s2", "hub"))
    assert store.directive_for_peer(1, "hub").directive_id == "d3"
    assert store.directive_for_peer(1, "s1").directive_id == "d1"


def test_feedback_is_exactly_once(store: Store, other: Store) -> None:
    store.add_directive(_directive("d1", 1, "t", "s"))
    fb = FeedbackRow("d1", 1, 2.0, 1.5, 10.0, True, "", 0.49, 0.0, 5)
    assert store.add_feedback(fb) is True
    assert other.add_feedback(fb) is False  # also when a second process races
    assert store.add_feedback(FeedbackRow("d2", 2, 1.0, 1.0, 0.0, False, "timeout", None, None, 6)) is True
    assert store.get_feedback("d1") == fb and store.get_feedback("d3") is None
    assert [f.directive_id for f in store.list_feedback()] == ["d1", "d2"]
    assert store.list_feedback(2)[0].failure == "timeout" and store.list_feedback(2)[0].reward is None


def test_bandit_state_roundtrip(store: Store) -> None:
    assert store.load_bandit_state() is None
    store.save_bandit_state("linucb", {"t": 3, "b": [0.5]}, 1)
    store.save_bandit_state("random", {"t": 4, "b": [0.25], "nested": {"k": None}}, 2)
    assert store.load_bandit_state() == ("random", {"t": 4, "b": [0.25], "nested": {"k": None}})


def test_counts(store: Store) -> None:
    a, b = _pid(), _pid()
    store.admit(a, "", 1)
    store.revoke(b, 1)
    store.put_profile(a, 1, [0.5] * 32, "h", 2)
    store.open_round(1, 1)
    store.add_directive(_directive("d1", 1, a, b))
    store.add_directive(_directive("d2", 1, b, a))
    store.set_directive_state("d2", "expired")
    store.add_feedback(FeedbackRow("d1", 1, 2.0, 1.5, 10.0, True, "", 0.49, 0.0, 5))
    assert store.counts() == {"agents": 2, "admitted": 1, "revoked": 1, "profiles": 1, "rounds": 1, "feedback": 1,
                              "directives": 2, "directives_issued": 1, "directives_used": 0,
                              "directives_expired": 1, "directives_failed": 0}


# ---- transactions and group commit -------------------------------------------------------


def test_transaction_rolls_back_everything_and_nests(store: Store, other: Store) -> None:
    a, b = _pid(), _pid()
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.admit(a, "", 1)
            with store.transaction():  # joins the outer one
                store.add_directive(_directive("d1", 1, "t", "s"))
            assert not other.is_admitted(a)  # nothing committed before the outermost ends
            raise RuntimeError("crash in the middle")
    assert store.get_agent(a) is None and store.get_directive("d1") is None
    with store.transaction():
        store.admit(b, "", 1)
        store.put_profile(b, 1, [0.5] * 32, "h", 2)
    assert other.fresh_profiles(1) == [(b, [0.5] * 32)]


def test_one_bad_message_rolls_back_only_itself_and_nothing_commits_before_the_batch(
        store: Store, other: Store) -> None:
    a, b, c = _pid(), _pid(), _pid()
    for p in (a, b, c):
        store.admit(p, "", 1)
    assert store.open_batch is None and store.commit_batch() is None
    with store.grouped():
        with store.transaction():
            store.put_profile(a, 1, [1.0] * 32, "h", 2)
        with pytest.raises(RuntimeError):
            with store.transaction():  # wrote, then failed: only its own writes roll back
                store.put_profile(b, 1, [2.0] * 32, "h", 2)
                store.touch(b, 99)
                raise RuntimeError("bad message")
        with store.transaction():
            store.put_profile(c, 1, [3.0] * 32, "h", 2)
    batch = store.open_batch
    assert batch is not None
    assert _profiles(store) == {a: 1.0, c: 3.0}  # the node reads its own batch …
    assert _profiles(other) == {}  # … nobody else sees it before its commit
    assert store.commit_batch() == batch and store.open_batch is None and store.commit_batch() is None
    assert _profiles(other) == {a: 1.0, c: 3.0} and other.get_agent(b).last_seen is None
    with store.grouped(), store.transaction():
        store.touch(a, 5)
    assert store.open_batch == batch + 1 and store.commit_batch() == batch + 1


def test_batch_hooks_and_a_standalone_writer_commits_the_open_batch(store: Store, other: Store) -> None:
    opened: list[int] = []
    ended: list[tuple[int, BaseException | None]] = []
    store.set_batch_hooks(opened.append, lambda batch, err: ended.append((batch, err)))
    a, b = _pid(), _pid()
    with store.grouped(), store.transaction():
        store.admit(a, "", 1)
    assert opened == [store.open_batch] and not other.is_admitted(a) and ended == []
    store.admit(b, "", 2)  # not grouped (the admin handler): joins the batch and returns durable
    assert store.open_batch is None and ended == [(opened[0], None)]
    assert other.is_admitted(a) and other.is_admitted(b)


def test_commit_on_a_worker_thread_while_the_loop_reads(store: Store, other: Store) -> None:
    peers = [_pid() for _ in range(200)]
    with store.grouped():
        for p in peers:
            with store.transaction():
                store.admit(p, "", 1)
    errors: list[BaseException] = []

    def commit() -> None:
        try:
            store.commit_batch()
        except BaseException as exc:  # noqa: BLE001 — reported to the test thread
            errors.append(exc)

    t = threading.Thread(target=commit)
    t.start()
    seen = {len(store.list_agents()) for _ in range(50)}
    t.join()
    assert not errors and seen == {200}
    assert len(other.list_agents()) == 200


def test_close_commits_a_pending_batch(location: str) -> None:
    node = open_store(location)
    a = _pid()
    with node.grouped(), node.transaction():
        node.admit(a, "", 1)
    node.close()
    again = open_store(location)
    assert again.is_admitted(a)
    again.close()


def test_strategy_state_is_written_once_per_batch_at_its_commit(store: Store, other: Store) -> None:
    calls: list[int] = []

    def state(v: int) -> Callable[[], dict[str, int]]:
        def build() -> dict[str, int]:
            calls.append(v)
            return {"v": v}
        return build

    a = _pid()
    store.admit(a, "", 1)
    with store.grouped():
        for v in range(3):  # three feedbacks of one batch
            with store.transaction():
                store.touch(a, 10 + v)
                store.save_bandit_state_at_commit("linucb", state(v), 10 + v)
    assert calls == [] and other.load_bandit_state() is None  # nothing serialised, nothing committed
    store.commit_batch()
    assert calls == [2] and other.load_bandit_state() == ("linucb", {"v": 2})  # once, the latest
    store.save_bandit_state_at_commit("linucb", state(3), 20)  # outside a batch: written at once
    assert calls == [2, 3] and other.load_bandit_state() == ("linucb", {"v": 3})


def test_a_failed_commit_rolls_back_the_whole_batch(store: Store, other: Store) -> None:
    """A write that fails at commit time (here the deferred strategy state) fails the
    batch like a failed COMMIT: ``BatchCommitError``, nothing of it stored, and the
    next batch starts clean."""
    a = _pid()
    store.admit(a, "", 1)

    def broken() -> dict[str, int]:
        raise ValueError("state cannot be serialised")

    with store.grouped(), store.transaction():
        store.put_profile(a, 1, [1.0] * 32, "h", 2)
        store.save_bandit_state_at_commit("linucb", broken, 2)
    batch = store.open_batch
    with pytest.raises(BatchCommitError) as info:
        store.commit_batch()
    assert info.value.batch == batch and isinstance(info.value.cause, ValueError)
    assert store.open_batch is None
    assert _profiles(other) == {} and _profiles(store) == {} and other.load_bandit_state() is None
    with store.grouped(), store.transaction():
        store.put_profile(a, 1, [2.0] * 32, "h", 3)
    store.commit_batch()
    assert _profiles(other) == {a: 2.0} and other.load_bandit_state() is None


def test_committed_writes_survive_kill_9_an_open_batch_does_not(location: str) -> None:
    """Whatever returned (a standalone write, ``commit_batch``) is stored even if the
    process dies right after; a batch still open at the kill (never acknowledged) is
    gone as a whole."""
    single, committed, pending = _pid(), [_pid() for _ in range(20)], [_pid() for _ in range(20)]
    code = textwrap.dedent(f"""
        import os, signal
        from cpm.store import open_store
        s = open_store({location!r})
        s.admit({single!r}, "org", 1)
        s.put_profile({single!r}, 2, [0.5] * 32, "h", 2)
        for peers in ({committed!r}, {pending!r}):
            with s.grouped():
                for i, p in enumerate(peers):
                    with s.transaction():
                        s.admit(p, "org", 1)
                        s.put_profile(p, 1, [float(i)] * 32, "h", 2)
            if peers[0] == {committed[0]!r}:
                s.commit_batch()
        os.kill(os.getpid(), signal.SIGKILL)
        """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    s = open_store(location)
    try:
        assert s.is_admitted(single) and s.fresh_profiles(2) == [(single, [0.5] * 32)]
        stored = _profiles(s)
        assert {p: stored.get(p) for p in committed} == {p: float(i) for i, p in enumerate(committed)}
        assert not any(p in stored for p in pending) and not any(s.is_admitted(p) for p in pending)
    finally:
        s.close()


# ---- the engine on the interface ---------------------------------------------------------


def test_the_round_engine_runs_a_round_group_committed(store: Store, other: Store, location: str) -> None:
    """What the node does, on this backend: register, profile to quorum, match, serve
    the signed directive, record feedback, close — each message in the open batch,
    visible to others only after ``commit_batch``; the state survives a restart."""
    cfg = CpmConfig(strategy="linucb", min_agents=2, quorum=1.0, round_timer_s=30.0, directive_ttl_s=60.0)
    cpm = Identity.generate()
    engine = RoundEngine(store, cfg, cpm)
    agents = [Identity.generate().peer_id for _ in range(4)]
    rng = np.random.default_rng(0)
    with store.grouped():
        engine.start(T0)
        for i, a in enumerate(agents):
            with store.transaction():
                store.admit(a, f"org{i}", T0)
                engine.register(a, Register(f"org{i}", "qwen2", (f"/ip4/127.0.0.1/tcp/{4000 + i}",), "t"), T0)
        for a in agents:
            vec = rng.random(32)
            vec[20:32] /= vec[20:32].sum()
            with store.transaction():
                assert engine.profile(a, Profile(1, tuple(float(v) for v in vec), cfg.transfer_hash), T0 + 1) is None
    assert store.latest_round().state == "matched" and other.latest_round() is None
    store.commit_batch()
    directives = other.directives_for_round(1)
    assert other.latest_round().state == "matched" and len(directives) == 2
    for d in directives:
        assert engine.directive(d.student, 1, T0 + 2) == d.envelope
        with store.grouped(), store.transaction():
            fb = Feedback(d.directive_id, 1, d.teacher, d.student, 2.0, 1.5, 10.0, True, "")
            assert engine.feedback(d.student, fb, T0 + 3) is True
    store.commit_batch()
    assert other.get_round(1).state == "closed" and other.latest_round().round == 2
    assert {f.directive_id for f in other.list_feedback(1)} == {d.directive_id for d in directives}
    saved = other.load_bandit_state()
    assert saved is not None and saved[0] == "linucb"
    restarted = RoundEngine(other, cfg, cpm)  # the bandit state of the batch came back
    assert restarted.strategy.to_state() == engine.strategy.to_state()


# ---- the seam holds ----------------------------------------------------------------------

# backend module → what it may import that nobody outside the backends may
BACKEND_MODULES = {"cpm/store_sqlite.py", "cpm/batchdb.py", "cpm/schema.py",
                   "cpm/store_postgres.py", "cpm/pgdb.py", "cpm/schema_postgres.py",
                   "cpm/lease.py"}  # the PostgreSQL backend's replica lease
PRIVATE = ("sqlite3", "psycopg", "cpm.store_sqlite", "cpm.batchdb", "cpm.schema", "cpm.store_postgres", "cpm.pgdb",
           "cpm.schema_postgres")


def test_only_the_backends_import_their_drivers() -> None:
    """The seam, checked: outside the backends, cpm/, harness/ and benchmarks/ reach the
    database through ``cpm.store`` only (no sqlite3, no psycopg, no backend module)."""
    offenders = []
    for folder in ("cpm", "harness", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in BACKEND_MODULES:
                continue
            for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                if any(n in PRIVATE or n.startswith(tuple(f"{p}." for p in PRIVATE)) for n in names):
                    offenders.append(f"{rel}:{node.lineno}")
    assert offenders == []
