"""cpm.store_postgres: what only the PostgreSQL backend has to get right — the shared
behaviour runs on it in test_store_contract.py.

Each test here is a way PostgreSQL differs from SQLite that could lose an acknowledged
message or wedge the node: a COMMIT of an aborted transaction that PostgreSQL turns
into a silent ROLLBACK, a connection lost mid-batch, a second writer waiting on the
write lock, a database or schema that is not there, two processes migrating a fresh
database at once, tallies that drifted. All against the session's throwaway server
(tests/pg.py).
"""

from __future__ import annotations

import threading

import pytest

from cpm import schema_postgres
from cpm.store import BatchCommitError, StoreError, StoreNotFound, StoreUnavailable, open_store
from cpm.store_postgres import PostgresStore
from protocol.envelope import Identity
from tests.pg import PgTestServer


def _pid() -> str:
    return Identity.generate().peer_id


@pytest.fixture()
def node(pg_url: str):
    s = PostgresStore(pg_url)
    yield s
    s.close()


def _profiles(store) -> dict[str, float]:
    return {p["peer_id"]: p["vector"][0] for p in store.list_profiles(1)}


def test_missing_database_unreachable_server_and_no_password_in_messages(pg_server: PgTestServer) -> None:
    missing = pg_server.url("no_such_db")
    with pytest.raises(StoreNotFound, match="does not exist"):
        open_store(missing, readonly=True)
    with pytest.raises(StoreError, match="createdb") as info:
        open_store(missing)
    assert not isinstance(info.value, StoreNotFound)
    with pytest.raises(StoreUnavailable):  # nothing listens there: retry later (exit 1), not a config error
        open_store("postgresql://postgres@127.0.0.1:1/knexa")
    url = pg_server.new_store().replace("postgres@", "postgres:s3cret@")
    s = open_store(url)  # trust auth ignores the password; the location must not show it
    try:
        assert "s3cret" not in s.location and s.location.startswith("postgresql://postgres@127.0.0.1:")
    finally:
        s.close()


def test_the_store_lives_in_its_own_schema(pg_server: PgTestServer, node: PostgresStore, pg_url: str) -> None:
    node.admit(_pid(), "", 1)
    rows = pg_server.sql(pg_server.url("knexa"), "SELECT table_schema FROM information_schema.tables "
                         "WHERE table_name = 'agents' AND table_schema LIKE 't\\_%%'")
    assert len(rows) >= 1
    assert pg_server.sql(pg_url, "SELECT current_schema()")[0][0] in {r[0] for r in rows}
    health = node.health()
    assert health.backend.startswith("PostgreSQL 15") and health.integrity == "ok"
    assert health.durability == "synchronous_commit=on" and health.durability_warning is None


def test_a_second_writer_waits_for_the_lock_then_is_unavailable(pg_url: str) -> None:
    """One writer at a time, as SQLite: while the node's batch is open another writer
    waits ``lock_timeout``, then gets ``StoreUnavailable`` (the CLI exits 1)."""
    node = PostgresStore(pg_url)
    admin = PostgresStore(pg_url, lock_timeout_ms=100)
    try:
        with node.grouped(), node.transaction():
            node.admit(_pid(), "", 1)
        with pytest.raises(StoreUnavailable, match="lock timeout"):
            admin.admit(_pid(), "", 2)
        node.commit_batch()
        admin.admit(_pid(), "", 3)
        assert len(node.list_agents()) == 2
    finally:
        node.close()
        admin.close()


def test_a_lost_connection_is_unavailable_then_reopened(pg_server: PgTestServer, node: PostgresStore,
                                                        pg_url: str) -> None:
    a, b = _pid(), _pid()
    node.admit(a, "", 1)
    pg_server.sql(pg_url, "SELECT pg_terminate_backend(%s)", (node.db.backend_pid(),))
    with pytest.raises(StoreUnavailable):
        node.is_admitted(a)
    assert node.is_admitted(a)  # the next call reconnected; what was committed is there
    with node.grouped(), node.transaction():  # a batch whose connection dies before its COMMIT …
        node.admit(b, "", 2)
    pg_server.sql(pg_url, "SELECT pg_terminate_backend(%s)", (node.db.backend_pid(),))
    with pytest.raises(BatchCommitError):  # … fails as a whole: nothing of it was acknowledged
        node.commit_batch()
    assert node.open_batch is None and not node.is_admitted(b) and node.is_admitted(a)
    node.admit(b, "", 3)
    assert node.is_admitted(b)


def test_an_aborted_transaction_is_never_taken_for_committed(pg_url: str, node: PostgresStore) -> None:
    """PostgreSQL answers COMMIT on a transaction that an error aborted with a silent
    ROLLBACK: the batch (or the standalone transaction) must fail, not be acknowledged."""
    other = PostgresStore(pg_url)
    a, b = _pid(), _pid()
    try:
        with node.grouped(), node.transaction():
            node.admit(a, "", 1)
        with pytest.raises(Exception):  # a statement that fails outside any message's savepoint
            node.db.execute("SELECT 1 / 0")
        with pytest.raises(StoreUnavailable, match="rolled back"), node.grouped(), node.transaction():
            node.admit(b, "", 2)  # no new message may join a batch that is already lost
        with pytest.raises(BatchCommitError, match="nothing committed"):
            node.commit_batch()
        assert not other.is_admitted(a) and not other.is_admitted(b)
        with pytest.raises(StoreUnavailable, match="nothing committed"):
            with node.transaction():
                node.admit(a, "", 3)
                try:
                    node.db.execute("SELECT 1 / 0")
                except Exception:  # noqa: BLE001 — a caller that swallowed a failed statement
                    pass
        assert not other.is_admitted(a)
        node.admit(a, "", 4)  # and the store is usable again
        assert other.is_admitted(a)
    finally:
        other.close()


def test_concurrent_first_opens_migrate_once(pg_url: str) -> None:
    errors: list[BaseException] = []
    stores: list[PostgresStore] = []
    lock = threading.Lock()

    def open_one() -> None:
        try:
            s = PostgresStore(pg_url)
            with lock:
                stores.append(s)
        except BaseException as exc:  # noqa: BLE001 — reported to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == [] and len(stores) == 4
        assert {s.schema_version() for s in stores} == {schema_postgres.SCHEMA_VERSION}
        assert int(stores[0].db.execute("SELECT count(*) FROM schema_version").fetchone()[0]) == 1
    finally:
        for s in stores:
            s.close()


def test_a_later_migration_runs_once_and_a_newer_schema_is_refused(pg_server: PgTestServer, node: PostgresStore,
                                                                   pg_url: str) -> None:
    later = schema_postgres.SCHEMA_VERSION + 1
    v2 = schema_postgres.Migration(later, "test: a column", ("ALTER TABLE agents ADD COLUMN note TEXT",))
    steps = (*schema_postgres.MIGRATIONS, v2)
    for _ in range(2):  # the second run finds the later version and applies nothing (ADD COLUMN twice would fail)
        with node.transaction():
            assert schema_postgres.migrate(node.db.execute, steps) == later
    assert node.schema_version() == later
    with pytest.raises(StoreError, match=f"schema version {later} is not supported"):
        PostgresStore(pg_url)  # this build knows the versions up to SCHEMA_VERSION only
    ro = open_store(pg_url, readonly=True)  # the doctor still reads it, to say so
    try:
        assert ro.health().schema_version == later
    finally:
        ro.close()


def test_health_finds_a_drifted_tally_and_a_disabled_trigger(pg_server: PgTestServer, node: PostgresStore,
                                                             pg_url: str) -> None:
    a = _pid()
    node.admit(a, "", 1)
    node.put_profile(a, 1, [0.5] * 32, "h", 2)
    assert node.health().integrity == "ok" and node.count_fresh(1) == 1
    pg_server.sql(pg_url, "UPDATE round_tally SET fresh = 5 WHERE round = 1")
    assert node.health().integrity == "round_tally says 5 for 1, the rows say 1"
    pg_server.sql(pg_url, "UPDATE round_tally SET fresh = 1 WHERE round = 1")
    pg_server.sql(pg_url, "ALTER TABLE agents DISABLE TRIGGER activity_agent_update")
    assert "activity_agent_update" in node.health().integrity
