"""cpm.store_sqlite: what only the SQLite backend promises — WAL with full sync, foreign
commits noticed, a foreign schema version or a non-database refused, the store URL
forms. The behaviour every backend shares is in test_store_contract.py."""

from __future__ import annotations

import sqlite3

import pytest

from cpm.store import StoreError, StoreNotFound, StoreUnavailable, open_store
from cpm.store_sqlite import SqliteStore
from protocol.envelope import Identity


@pytest.fixture()
def store(tmp_path):
    s = SqliteStore(tmp_path / "cpm.db")
    yield s
    s.close()


def _pid() -> str:
    return Identity.generate().peer_id


def test_wal_and_full_sync(store):
    assert str(store.pragma("journal_mode")).lower() == "wal"
    assert int(store.pragma("synchronous")) == 2  # FULL
    assert store.schema_version() == 1


def test_second_connection_changes_data_version(tmp_path):
    node = SqliteStore(tmp_path / "cpm.db")
    admin = SqliteStore(tmp_path / "cpm.db")
    before = node.data_version()
    admin.admit(_pid(), "", 1)
    assert node.data_version() != before
    node.close()
    admin.close()


def test_schema_version_mismatch_is_refused(tmp_path):
    SqliteStore(tmp_path / "cpm.db").close()
    db = sqlite3.connect(tmp_path / "cpm.db")
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema version 99"):
        SqliteStore(tmp_path / "cpm.db")
    ro = open_store(tmp_path / "cpm.db", readonly=True)  # the doctor still reads it, to say so
    assert ro.health().schema_version == 99
    ro.close()


def test_not_a_database_is_a_store_error(tmp_path):
    (tmp_path / "cpm.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a database"):
        SqliteStore(tmp_path / "cpm.db")
    with pytest.raises(StoreError, match="not a database"):
        open_store(tmp_path / "cpm.db", readonly=True)


def test_location_forms(tmp_path):
    """``sqlite:PATH`` and a plain path (str or Path) name the same file."""
    a = _pid()
    first = open_store(f"sqlite:{tmp_path / 'cpm.db'}")
    first.admit(a, "", 1)
    assert first.location == str(tmp_path / "cpm.db")
    first.close()
    for target in (tmp_path / "cpm.db", str(tmp_path / "cpm.db"), f"SQLite:{tmp_path / 'cpm.db'}"):
        s = open_store(target)
        assert s.is_admitted(a), target
        s.close()
    with pytest.raises(StoreError, match="no database path"):
        open_store("sqlite:")
    with pytest.raises(StoreNotFound):
        open_store(tmp_path / "missing.db", readonly=True)
    assert not (tmp_path / "missing.db").exists()


def test_a_busy_database_is_unavailable_not_unusable(tmp_path):
    """Another writer holding the lock past the busy timeout: ``StoreUnavailable``
    (retry later; the CLI exits 1), not the ``StoreError`` of a broken file (exit 3)."""
    node = SqliteStore(tmp_path / "cpm.db", busy_timeout_ms=50)
    admin = SqliteStore(tmp_path / "cpm.db", busy_timeout_ms=50)
    with node.grouped(), node.transaction():  # the node's open batch holds the write lock
        node.admit(_pid(), "", 1)
    with pytest.raises(StoreUnavailable, match="locked"):
        admin.admit(_pid(), "", 2)
    node.commit_batch()
    admin.admit(_pid(), "", 3)
    node.close()
    admin.close()


def test_readonly_store_refuses_writes(tmp_path):
    SqliteStore(tmp_path / "cpm.db").close()
    ro = open_store(tmp_path / "cpm.db", readonly=True)
    with pytest.raises(StoreUnavailable, match="readonly"):
        ro.admit(_pid(), "", 1)
    ro.close()


def test_a_later_migration_runs_once_in_the_opening_transaction(store):
    """``cpm.schema.MIGRATIONS``: a step newer than the stored version runs once, in
    order; the baseline is idempotent and re-applied; the version is recorded."""
    from cpm import schema

    ran: list[int] = []

    def v2(db) -> None:
        ran.append(2)
        db.execute("ALTER TABLE agents ADD COLUMN note TEXT")  # fails if it ever ran twice

    steps = (*schema.MIGRATIONS, schema.Migration(2, "test: a column", v2))
    for _ in range(2):
        with store.db.transaction() as db:
            assert schema.migrate(db, steps) == 2
    assert ran == [2] and store.schema_version() == 2
    with pytest.raises(StoreError, match="schema version 2 is not supported"):
        SqliteStore(store.path)  # this build knows version 1 only
