"""cpm.batchdb via cpm.store_sqlite: a COMMIT that SQLite itself refuses (as a full disk
would) fails the whole batch cleanly and leaves the store usable. The group-commit
behaviour every backend shares (per-message rollback, nothing visible before
``commit_batch``, hooks, worker-thread commit, kill -9) is in test_store_contract.py."""

from __future__ import annotations

import sqlite3

import pytest

from cpm.store import BatchCommitError
from cpm.store_sqlite import SqliteStore
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
    node, other = SqliteStore(tmp_path / "cpm.db"), SqliteStore(tmp_path / "cpm.db")
    yield node, other
    node.close()
    other.close()


def _profiles(store: SqliteStore) -> dict[str, float]:
    return {p["peer_id"]: p["vector"][0] for p in store.list_profiles(1)}


def test_failed_commit_rolls_back_the_whole_batch_and_store_stays_usable(two):
    node, other = two
    a, b = _pid(), _pid()
    node.admit(a, "", 1)
    with node.grouped(), node.transaction():
        node.put_profile(a, 1, [1.0] * 32, "h", 2)
        node.admit(b, "", 2)
    batch = node.open_batch
    node.db.conn.set_authorizer(_deny_commit)
    with pytest.raises(BatchCommitError) as info:
        node.commit_batch()
    node.db.conn.set_authorizer(None)
    assert info.value.batch == batch and node.open_batch is None
    assert not node.db.conn.in_transaction
    assert _profiles(node) == {} and not node.is_admitted(b)  # rolled back, also for the node
    with node.grouped(), node.transaction():
        node.put_profile(a, 1, [5.0] * 32, "h", 3)
    assert node.commit_batch() == batch + 1
    assert _profiles(other) == {a: 5.0}


def test_standalone_writer_failing_commit_reports_the_batch(two):
    node, _ = two
    ended: list[tuple[int, object]] = []
    node.set_batch_hooks(None, lambda batch, err: ended.append((batch, err)))
    with node.grouped(), node.transaction():
        node.admit(_pid(), "", 1)
    batch = node.open_batch
    node.db.conn.set_authorizer(_deny_commit)
    with pytest.raises(sqlite3.DatabaseError):
        node.admit(_pid(), "", 2)
    node.db.conn.set_authorizer(None)
    assert [b for b, _ in ended] == [batch] and isinstance(ended[0][1], BatchCommitError)
    assert node.list_agents() == []
