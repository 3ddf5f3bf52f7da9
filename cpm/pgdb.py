"""The PostgreSQL backend's connection (``cpm.store_postgres``): ``cpm.batchdb.BatchDb``'s
group commit on one psycopg 3 connection.

Why a subclass: the batch logic — what may be acknowledged when, a savepoint per
message, the deferred strategy-state write, hooks, a commit on a worker thread — is
the SQLite backend's, tested once (tests/unit/test_store_contract.py runs it on both).
Only the driver-facing steps differ:

* ``_begin``: ``BEGIN`` plus ``pg_advisory_xact_lock(WRITE_LOCK, schema)`` in one round
  trip — one writer per store at a time, as SQLite's ``BEGIN IMMEDIATE``; that keeps the trigger-kept
  tallies exact (``cpm.schema_postgres``) and makes a second writer wait at most
  ``lock_timeout`` (then ``StoreUnavailable``, as SQLite's busy timeout).
* ``_commit``: PostgreSQL answers ``COMMIT`` on a transaction that an error aborted with
  a silent ``ROLLBACK``. Acknowledging after that would lose acknowledged messages, so
  the transaction status is checked before and the command tag after: anything but a
  real ``COMMIT`` raises.
* durability: the session runs with ``synchronous_commit = on`` whatever the server
  default, so a COMMIT returns only once its WAL is flushed (``fsync`` is the server's:
  ``health()`` warns when it is off).
* errors: ``psycopg.OperationalError`` (connection lost, server shutting down, lock or
  statement timeout, serialization failure, deadlock, disk full) and writes refused by
  a read-only session or a standby become ``StoreUnavailable``. A lost connection is
  re-opened at the next statement outside a transaction; a batch it held is failed
  (its COMMIT raises) and nothing of it was acknowledged.
"""

from __future__ import annotations

import re
from typing import Any

import psycopg
import structlog
from psycopg import errors as pg_errors
from psycopg.pq import TransactionStatus

from cpm.batchdb import BatchDb, Result
from cpm.schema_postgres import WRITE_LOCK
from cpm.store import StoreError, StoreNotFound, StoreUnavailable

log = structlog.get_logger(__name__)

# what a retry may cure: transient server or network trouble, a lock held too long, a
# read-only session or standby (after a failover the next connection may be primary)
_UNAVAILABLE = (psycopg.OperationalError, pg_errors.ReadOnlySqlTransaction, pg_errors.InFailedSqlTransaction)
# connection failures that are the operator's to fix, not transient (exit 3, not 1)
_MISCONFIGURED = re.compile(r"authentication failed|no pg_hba\.conf entry|role \S+ does not exist|"
                            r"invalid (?:connection option|URI|integer value)|missing \"=\"", re.I)
_NO_DATABASE = re.compile(r"database \S+ does not exist", re.I)
# ends the session of a writer idle inside a transaction this long (docs/operations.md,
# "High availability"); generous: a batch stays open while the loop matches a big round
IDLE_IN_TRANSACTION_MS = 60_000


def connect(conninfo: str, where: str, *, readonly: bool, lock_timeout_ms: int,
            connect_timeout_s: int = 10) -> psycopg.Connection[Any]:
    """One autocommit connection with the session settings the store relies on.

    Raises ``StoreNotFound`` (no such database, ``readonly``), ``StoreError`` (no such
    database for a writer: the operator creates it; bad credentials or URL) or
    ``StoreUnavailable`` (the server is not reachable now)."""
    try:
        conn = psycopg.connect(conninfo, autocommit=True, connect_timeout=connect_timeout_s)
    except psycopg.ProgrammingError as exc:  # a malformed URL
        raise StoreError(f"{where}: {exc}") from None
    except psycopg.OperationalError as exc:
        text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        if _NO_DATABASE.search(str(exc)):
            if readonly:
                raise StoreNotFound(f"{where}: {text}") from None
            raise StoreError(f"{where}: {text} (create it first, e.g. `createdb`)") from None
        if _MISCONFIGURED.search(str(exc)):
            raise StoreError(f"{where}: {text}") from None
        raise StoreUnavailable(f"{where}: {text}") from None
    try:
        conn.execute(f"SET lock_timeout = {int(lock_timeout_ms)}")
        conn.execute("SET synchronous_commit = on")
        # a process that hangs inside a transaction (SIGSTOP, a stuck thread) would hold
        # the write lock — and stop every replica's writes — until the server ends it
        conn.execute(f"SET idle_in_transaction_session_timeout = {IDLE_IN_TRANSACTION_MS}")
        if readonly:
            conn.execute("SET default_transaction_read_only = on")
    except psycopg.Error as exc:
        conn.close()
        raise StoreUnavailable(f"{where}: {exc}") from None
    return conn


class PgBatchDb(BatchDb):
    """``BatchDb`` on one psycopg connection (autocommit mode, explicit transactions)."""

    driver_errors = (psycopg.Error,)

    def __init__(self, conninfo: str, where: str, *, readonly: bool = False, lock_timeout_ms: int = 5000) -> None:
        self.conninfo = conninfo
        self.where = where
        self.readonly = readonly
        self.lock_timeout_ms = lock_timeout_ms
        self.lock_key = 0  # the store's schema (its oid): set by the store once the schema exists
        super().__init__(self._connect())

    def _connect(self) -> psycopg.Connection[Any]:
        return connect(self.conninfo, self.where, readonly=self.readonly, lock_timeout_ms=self.lock_timeout_ms)

    def execute(self, sql: str, args: Any = ()) -> Result:
        with self.lock:
            if self.conn.closed:
                if self._in_tx or self._batch is not None:  # the transaction died with it
                    raise StoreUnavailable(f"{self.where}: connection lost; the open transaction was rolled back")
                self.conn = self._connect()
                log.info("cpm.store.reconnected", location=self.where)
            try:
                cur = self.conn.execute(sql, args if args else None)
                return Result(cur.fetchall() if cur.description is not None else [], cur.rowcount)
            except _UNAVAILABLE as exc:
                raise StoreUnavailable(f"{self.where}: {str(exc).strip()}") from exc

    def backend_pid(self) -> int:
        """The server process serving this connection (benchmarks read its CPU time)."""
        return int(self.conn.info.backend_pid)

    # ---- the driver-facing steps of BatchDb -----------------------------------------
    def _begin(self) -> None:
        if self.readonly:
            self.execute("BEGIN READ ONLY")
            return
        try:  # one round trip; the lock wait is bounded by lock_timeout
            self.execute(f"BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK}, {int(self.lock_key)})")
        except StoreUnavailable:
            self._rollback_quietly()
            raise

    def _commit(self) -> None:
        with self.lock:
            status = self._status()
            if status is not TransactionStatus.INTRANS:  # aborted or gone: COMMIT would roll back silently
                raise StoreUnavailable(f"{self.where}: transaction {status.name.lower()}, nothing committed")
            try:
                tag = self.conn.execute("COMMIT").statusmessage
            except _UNAVAILABLE as exc:
                raise StoreUnavailable(f"{self.where}: COMMIT failed: {str(exc).strip()}") from exc
            if tag != "COMMIT":
                raise StoreUnavailable(f"{self.where}: COMMIT answered {tag!r}, nothing committed")

    def _rollback(self) -> None:
        if not self.conn.closed:
            self.execute("ROLLBACK")

    def _rollback_quietly(self) -> None:
        try:
            self._rollback()
        except (psycopg.Error, StoreError) as exc:
            log.warning("cpm.store.rollback_failed", location=self.where, error=str(exc))

    def _status(self) -> TransactionStatus:
        return TransactionStatus.UNKNOWN if self.conn.closed else self.conn.info.transaction_status

    def _in_transaction(self) -> bool:
        return self._status() in (TransactionStatus.INTRANS, TransactionStatus.INERROR)

    def _transaction_usable(self) -> bool:
        return self._status() is TransactionStatus.INTRANS
