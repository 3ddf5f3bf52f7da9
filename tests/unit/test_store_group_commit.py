"""cpm.batchdb via cpm.store: group commit keeps per-message atomicity, commits nothing
before ``commit_batch``, fails a whole batch cleanly, and survives ``kill -9``."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading

import pytest

from cpm.batchdb import BatchCommitError
from cpm.store import Store
from protocol.envelope import Identity


def _pid() -> str:
    return Identity.generate().peer_id


def _deny_commit(action: int, arg1: str | None, *_: object) -> int:
    """SQLite authorizer that refuses COMMIT: a real failing COMMIT, as a full disk would give."""
    if action == sqlite3.SQLITE_TRANSACTION and arg1 == "COMMIT":
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


@pytest.fixture()
def two(tmp_path):
    """The node's store and a second connection (the admin CLI, or the disk after a crash)."""
    node, other = Store(tmp_path / "cpm.db"), Store(tmp_path / "cpm.db")
    yield node, other
    node.close()
    other.close()


def _profiles(store: Store) -> dict[str, float]:
    return {p["peer_id"]: p["vector"][0] for p in store.list_profiles(1)}


def test_one_bad_message_rolls_back_only_itself(two):
    node, other = two
    a, b, c = _pid(), _pid(), _pid()
    for p in (a, b, c):
        node.admit(p, "", 1)
    with node.db.grouped():
        with node.transaction():
            node.put_profile(a, 1, [1.0] * 32, "h", 2)
        with pytest.raises(RuntimeError):
            with node.transaction():  # wrote, then failed: its savepoint is rolled back
                node.put_profile(b, 1, [2.0] * 32, "h", 2)
                node.touch(b, 99)
                raise RuntimeError("bad message")
        with node.transaction():
            node.put_profile(c, 1, [3.0] * 32, "h", 2)
    batch = node.db.open_batch
    assert batch is not None
    assert _profiles(node) == {a: 1.0, c: 3.0}  # the node sees its own pending batch …
    assert _profiles(other) == {}  # … nobody else does before the COMMIT
    assert node.db.commit_batch() == batch
    assert node.db.open_batch is None
    assert _profiles(other) == {a: 1.0, c: 3.0}
    assert other.get_agent(b).last_seen is None  # the failed message left no trace


def test_batches_are_numbered_and_one_commit_covers_all(two):
    node, other = two
    peers = [_pid() for _ in range(20)]
    with node.db.grouped():
        for p in peers:
            with node.transaction():
                node.admit(p, "org", 1)
    first = node.db.open_batch
    node.db.commit_batch()
    assert len(other.list_agents()) == 20
    with node.db.grouped(), node.transaction():
        node.revoke(peers[0], 2)
    assert node.db.open_batch == first + 1
    assert node.db.commit_batch() == first + 1 and node.db.commit_batch() is None


def test_standalone_writer_joins_and_commits_the_open_batch(two):
    """The admin handler writes outside ``grouped()``: its write must be durable when it
    returns, so it commits the pending batch too and reports it through the hook."""
    node, other = two
    ended: list[tuple[int, object]] = []
    opened: list[int] = []
    node.db.on_batch_open = opened.append
    node.db.on_batch_end = lambda batch, err: ended.append((batch, err))
    a, b = _pid(), _pid()
    with node.db.grouped(), node.transaction():
        node.admit(a, "", 1)
    assert opened == [node.db.open_batch] and not other.is_admitted(a)
    node.admit(b, "", 2)  # standalone
    assert node.db.open_batch is None and ended == [(opened[0], None)]
    assert other.is_admitted(a) and other.is_admitted(b)


def test_failed_commit_rolls_back_the_whole_batch_and_store_stays_usable(two):
    node, other = two
    a, b = _pid(), _pid()
    node.admit(a, "", 1)
    with node.db.grouped(), node.transaction():
        node.put_profile(a, 1, [1.0] * 32, "h", 2)
        node.admit(b, "", 2)
    batch = node.db.open_batch
    node.db.conn.set_authorizer(_deny_commit)
    with pytest.raises(BatchCommitError) as info:
        node.db.commit_batch()
    node.db.conn.set_authorizer(None)
    assert info.value.batch == batch and node.db.open_batch is None
    assert not node.db.conn.in_transaction
    assert _profiles(node) == {} and not node.is_admitted(b)  # rolled back, also for the node
    with node.db.grouped(), node.transaction():
        node.put_profile(a, 1, [5.0] * 32, "h", 3)
    assert node.db.commit_batch() == batch + 1
    assert _profiles(other) == {a: 5.0}


def test_standalone_writer_failing_commit_reports_the_batch(two):
    node, _ = two
    ended: list[tuple[int, object]] = []
    node.db.on_batch_end = lambda batch, err: ended.append((batch, err))
    with node.db.grouped(), node.transaction():
        node.admit(_pid(), "", 1)
    batch = node.db.open_batch
    node.db.conn.set_authorizer(_deny_commit)
    with pytest.raises(sqlite3.DatabaseError):
        node.admit(_pid(), "", 2)
    node.db.conn.set_authorizer(None)
    assert [b for b, _ in ended] == [batch] and isinstance(ended[0][1], BatchCommitError)
    assert node.list_agents() == []


def test_commit_on_a_worker_thread_while_the_loop_reads(two):
    """The node commits on a worker thread (the connection is not bound to its creating
    thread) while its loop keeps reading; the loop's reads see the batch throughout."""
    node, other = two
    peers = [_pid() for _ in range(200)]
    with node.db.grouped():
        for p in peers:
            with node.transaction():
                node.admit(p, "", 1)
    errors: list[BaseException] = []

    def commit() -> None:
        try:
            node.db.commit_batch()
        except BaseException as exc:  # noqa: BLE001 — reported to the test thread
            errors.append(exc)

    t = threading.Thread(target=commit)
    t.start()
    seen = {len(node.list_agents()) for _ in range(50)}
    t.join()
    assert not errors and seen == {200}
    assert len(other.list_agents()) == 200


def test_close_commits_a_pending_batch(tmp_path):
    node = Store(tmp_path / "cpm.db")
    a = _pid()
    with node.db.grouped(), node.transaction():
        node.admit(a, "", 1)
    node.close()
    again = Store(tmp_path / "cpm.db")
    assert again.is_admitted(a)
    again.close()


def test_group_committed_writes_survive_kill_9_uncommitted_do_not(tmp_path):
    """Whatever ``commit_batch`` returned for is on disk after SIGKILL; a batch still
    open at the kill (never acknowledged) is gone as a whole."""
    committed, pending = [_pid() for _ in range(50)], [_pid() for _ in range(50)]
    code = textwrap.dedent(
        f"""
        import os, signal
        from cpm.store import Store
        s = Store({str(tmp_path / 'cpm.db')!r})
        for peers in ({committed!r}, {pending!r}):
            with s.db.grouped():
                for i, p in enumerate(peers):
                    with s.transaction():
                        s.admit(p, "org", 1)
                        s.put_profile(p, 1, [float(i)] * 32, "h", 2)
            if peers[0] == {committed[0]!r}:
                s.db.commit_batch()
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    s = Store(tmp_path / "cpm.db")
    stored = _profiles(s)
    assert {p: stored.get(p) for p in committed} == {p: float(i) for i, p in enumerate(committed)}
    assert not any(p in stored for p in pending) and not any(s.is_admitted(p) for p in pending)
    s.close()


def test_count_fresh_is_the_number_of_fresh_profiles(two):
    """The engine's quorum check counts instead of loading every vector (ingest cost)."""
    node, _ = two
    peers = [_pid() for _ in range(5)]
    for p in peers:
        node.admit(p, "", 1)
    for p in peers:
        node.put_profile(p, 1, [0.5] * 32, "h", 2)
    node.put_profile(peers[0], 2, [0.5] * 32, "h", 3)
    node.put_profile(_pid(), 1, [0.5] * 32, "h", 2)  # never admitted
    node.revoke(peers[1], 4)
    assert node.count_fresh(1) == len(node.fresh_profiles(1)) == 4
    assert node.count_fresh(2) == 1 and node.count_fresh(3) == 0


def test_strategy_state_is_written_once_per_batch_as_its_last_statement(two):
    node, other = two
    calls = []

    def state(v: int):
        def build() -> dict:
            calls.append(v)
            return {"v": v}
        return build

    a = _pid()
    node.admit(a, "", 1)
    with node.db.grouped():
        for v in range(3):  # three feedbacks of one batch
            with node.transaction():
                node.touch(a, 10 + v)
                node.save_bandit_state_at_commit("linucb", state(v), 10 + v)
    assert calls == [] and other.load_bandit_state() is None  # nothing serialised, nothing committed
    node.db.commit_batch()
    assert calls == [2] and other.load_bandit_state() == ("linucb", {"v": 2})  # once, the latest
    node.save_bandit_state_at_commit("linucb", state(3), 20)  # outside a batch: written at once
    assert calls == [2, 3] and other.load_bandit_state() == ("linucb", {"v": 3})


def test_a_failing_deferred_write_fails_the_batch_and_is_not_retried(two):
    node, other = two
    a = _pid()
    node.admit(a, "", 1)

    def broken() -> dict:
        raise ValueError("state cannot be serialised")

    with node.db.grouped(), node.transaction():
        node.put_profile(a, 1, [1.0] * 32, "h", 2)
        node.save_bandit_state_at_commit("linucb", broken, 2)
    with pytest.raises(BatchCommitError):
        node.db.commit_batch()
    assert _profiles(other) == {} and other.load_bandit_state() is None  # the whole batch rolled back
    with node.db.grouped(), node.transaction():  # the next batch does not inherit the broken write
        node.put_profile(a, 1, [2.0] * 32, "h", 3)
    node.db.commit_batch()
    assert _profiles(other) == {a: 2.0} and other.load_bandit_state() is None
