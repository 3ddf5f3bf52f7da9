"""cpm.store: CRUD, exactly-once feedback, atomic transactions, durability across kill -9."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from cpm.store import DirectiveRow, FeedbackRow, Store, StoreError
from protocol.envelope import Identity


@pytest.fixture()
def store(tmp_path):
    s = Store(tmp_path / "cpm.db")
    yield s
    s.close()


def _pid() -> str:
    return Identity.generate().peer_id


def _directive(did: str, round_: int, teacher: str, student: str, expires_at: int = 10_000) -> DirectiveRow:
    return DirectiveRow(did, round_, teacher, student, 1, {"alpha": 0.4}, 0.5, [1.0, 2.0], "issued", 0,
                        expires_at, b"env")


def test_wal_and_full_sync(store):
    assert str(store.pragma("journal_mode")).lower() == "wal"
    assert int(store.pragma("synchronous")) == 2  # FULL
    assert store.schema_version() == 1


def test_admit_revoke_register_cycle(store):
    a = _pid()
    assert not store.is_admitted(a)
    store.admit(a, "org-a", 1)
    assert store.is_admitted(a)
    store.register(a, org="other", family="qwen2", listen_addrs=["/ip4/1.2.3.4/tcp/1"], agent_version="1",
                   now_ms=5)
    row = store.get_agent(a)
    assert row is not None
    assert row.org == "org-a"  # the admin's label wins over what the agent claims
    assert row.family == "qwen2" and row.listen_addrs == ("/ip4/1.2.3.4/tcp/1",)
    assert row.registered_at == 5 and row.last_seen == 5
    assert store.revoke(a, 6) is True
    assert not store.is_admitted(a) and store.is_revoked(a)
    store.admit(a, "", 7)  # re-admission clears the revocation, keeps the org
    assert store.is_admitted(a) and store.get_agent(a).org == "org-a"


def test_revoke_unknown_peer_is_a_preemptive_ban(store):
    b = _pid()
    assert store.revoke(b, 1) is False
    assert store.is_revoked(b)
    store.register(b, org="x", family="f", listen_addrs=[], agent_version="1", now_ms=2, admit=True)
    assert not store.is_admitted(b)  # open admission never un-revokes


def test_open_admission_register_admits_unknown(store):
    c = _pid()
    store.register(c, org="x", family="f", listen_addrs=[], agent_version="1", now_ms=2, admit=True)
    assert store.is_admitted(c)
    d = _pid()
    store.register(d, org="x", family="f", listen_addrs=[], agent_version="1", now_ms=2, admit=False)
    assert not store.is_admitted(d)


def test_profiles_latest_wins_and_only_admitted_are_fresh(store):
    a, b = _pid(), _pid()
    for p in (a, b):
        store.admit(p, "", 0)
    store.put_profile(a, 1, [0.0] * 32, "h", 10)
    store.put_profile(a, 1, [1.0] * 32, "h", 20)
    store.put_profile(b, 1, [2.0] * 32, "h", 15)
    fresh = dict(store.fresh_profiles(1))
    assert fresh[a] == [1.0] * 32 and fresh[b] == [2.0] * 32
    assert store.first_profile_at(1) == 15
    store.revoke(b, 30)
    assert [p for p, _ in store.fresh_profiles(1)] == [a]


def test_count_active_needs_registration_and_recent_contact(store):
    a, b, c = _pid(), _pid(), _pid()
    store.admit(a, "", 0)
    store.admit(b, "", 0)
    store.admit(c, "", 0)
    store.register(a, org="", family="f", listen_addrs=[], agent_version="", now_ms=100)
    store.register(b, org="", family="f", listen_addrs=[], agent_version="", now_ms=10)
    assert store.count_active(since_ms=50) == 1  # b is stale, c never registered
    assert store.count_active(since_ms=0) == 2


def test_feedback_is_exactly_once(store):
    store.add_directive(_directive("d1", 1, "t", "s"))
    fb = FeedbackRow("d1", 1, 2.0, 1.5, 10.0, True, "", 0.49, 0.0, 5)
    assert store.add_feedback(fb) is True
    assert store.add_feedback(fb) is False
    assert len(store.list_feedback()) == 1


def test_transaction_rolls_back_everything(store):
    a = _pid()
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.admit(a, "", 1)
            store.add_directive(_directive("d1", 1, "t", "s"))
            raise RuntimeError("crash in the middle")
    assert store.get_agent(a) is None and store.get_directive("d1") is None


def test_directive_queries(store):
    store.add_directive(_directive("d1", 1, "t", "s", expires_at=100))
    store.add_directive(_directive("d2", 1, "t2", "s2", expires_at=200))
    assert store.directive_for_peer(1, "s").directive_id == "d1"
    assert store.directive_for_peer(1, "t2").directive_id == "d2"
    assert store.directive_for_peer(2, "s") is None
    assert [d.directive_id for d in store.expirable(1, 150)] == ["d1"]
    assert store.next_expiry(1) == 100
    store.set_directive_state("d1", "expired")
    assert store.has_issued(1) and store.next_expiry(1) == 200
    store.set_directive_state("d2", "used")
    assert not store.has_issued(1) and store.next_expiry(1) is None and not store.has_issued(2)
    d = store.get_directive("d2")
    assert d.params == {"alpha": 0.4} and d.context == [1.0, 2.0] and d.envelope == b"env"


def test_bandit_state_roundtrip(store):
    assert store.load_bandit_state() is None
    store.save_bandit_state("linucb", {"t": 3, "b": [0.5]}, 1)
    store.save_bandit_state("linucb", {"t": 4, "b": [0.25]}, 2)
    assert store.load_bandit_state() == ("linucb", {"t": 4, "b": [0.25]})


def test_second_connection_sees_admin_changes(tmp_path):
    node = Store(tmp_path / "cpm.db")
    admin = Store(tmp_path / "cpm.db")
    a = _pid()
    before = node.data_version()
    admin.admit(a, "", 1)
    assert node.data_version() != before
    assert node.is_admitted(a)
    admin.revoke(a, 2)
    assert not node.is_admitted(a)
    node.close()
    admin.close()


def test_schema_version_mismatch_is_refused(tmp_path):
    Store(tmp_path / "cpm.db").close()
    db = sqlite3.connect(tmp_path / "cpm.db")
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema version 99"):
        Store(tmp_path / "cpm.db")


def test_not_a_database_is_a_store_error(tmp_path):
    (tmp_path / "cpm.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError):
        Store(tmp_path / "cpm.db")


def test_committed_write_survives_kill_9(tmp_path):
    """A write whose commit returned is on disk even if the process dies right after."""
    peer = _pid()
    code = textwrap.dedent(
        f"""
        import os, signal
        from cpm.store import Store
        s = Store({str(tmp_path / 'cpm.db')!r})
        s.admit({peer!r}, "org", 1)
        s.put_profile({peer!r}, 1, [0.5] * 32, "h", 2)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    s = Store(tmp_path / "cpm.db")
    assert s.is_admitted(peer)
    assert s.fresh_profiles(1) == [(peer, [0.5] * 32)]
    s.close()
