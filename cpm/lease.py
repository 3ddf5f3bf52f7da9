"""Which replica runs the rounds: a lease row in the PostgreSQL store, with a fencing epoch.

Why: N ``knexa-cpm serve`` processes may share one store. Any of them ingests profiles
and feedback and serves directives, but opening, matching, expiring and closing a round
must be done by exactly one at a time, or a round could be matched twice. Why a row that
expires by the *database's* clock rather than a session advisory lock: a leader that
hangs while connected would keep an advisory lock forever. Why an epoch: the fence,
checked under the store's write lock in every transaction that advances the rounds, is
what guarantees that a stale leader writes nothing. Renew, take over, fence, release,
the failure modes and the strategy-state reload: docs/operations.md §13; measured
failover: docs/reliability.md §CPM replica failover.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import structlog

from cpm.pgdb import connect
from cpm.schema_postgres import WRITE_LOCK
from cpm.store import Store, StoreError, StoreUnavailable

log = structlog.get_logger(__name__)

LEASE_NAME = "rounds"
DEFAULT_POLL_S = 0.5  # a follower tries to take over this often


class LeaseUnsupported(StoreError):
    """Replicas need a store that several processes share (PostgreSQL); SQLite is
    single-node: its file lock admits one ``serve`` per home."""


class Leadership:
    """This process's side of the round lease. ``renew`` blocks (call it on a worker
    thread); ``holds``, ``fence`` and ``state_stale`` are for the engine's loop."""

    def __init__(self, store: Any, *, ttl_s: float, poll_s: float = DEFAULT_POLL_S, name: str = LEASE_NAME,
                 holder: str | None = None, monotonic: Callable[[], float] = time.monotonic) -> None:
        if not hasattr(store, "bandit_state_stale") or not hasattr(store, "db"):
            raise LeaseUnsupported(f"{store.location}: replicas (lease_s > 0) need a PostgreSQL store")
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        self.store = store
        self.ttl_s = float(ttl_s)
        self.poll_s = min(float(poll_s), self.ttl_s / 3)
        self.name = name
        # unique per process incarnation: a restarted replica never inherits its old term
        self.holder = holder or f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"
        self.monotonic = monotonic
        self.epoch: int | None = None  # the term this process holds, None when a follower
        self.terms = 0  # terms won by this process (a new term means: reload from the database)
        self._valid_until = 0.0
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()  # one renew at a time (a worker thread) against close

    # ---- the loop side ----------------------------------------------------------------
    def holds(self) -> bool:
        """Locally: a term is held and its local deadline has not passed."""
        return self.epoch is not None and self.monotonic() < self._valid_until

    def fence(self) -> bool:
        """Inside a write transaction of the store (it holds the write lock): whether this
        process still holds its term. False also drops the term locally."""
        epoch = self.epoch
        if epoch is None:
            return False
        row = self.store.db.execute("SELECT holder, epoch FROM lease WHERE name = %s", (self.name,)).fetchone()
        if row is not None and row[0] == self.holder and int(row[1]) == epoch:
            return True
        self._lose("fenced", epoch)
        return False

    def state_stale(self) -> bool:
        return bool(self.store.bandit_state_stale())

    def interval(self) -> float:
        """Seconds until the next ``renew``: a third of the lease for the holder (two
        renewals may fail before it lapses), ``poll_s`` for a follower."""
        return self.ttl_s / 3 if self.epoch is not None else self.poll_s

    # ---- the worker-thread side -------------------------------------------------------
    def renew(self) -> bool:
        """Renew the held term, or take the lease over if it lapsed. Returns whether a
        term is held now. Raises ``StoreUnavailable`` when the database cannot answer
        (the term is then kept only until its local deadline)."""
        with self._lock:
            started = self.monotonic()
            try:
                conn = self._connection()
                epoch = self._renew(conn) if self.epoch is not None else None
                if epoch is None:
                    epoch = self._take_over(conn)
            except psycopg.Error as exc:
                self._drop_connection()
                raise StoreUnavailable(f"{self.store.location}: lease: {str(exc).strip()}") from None
            if epoch is None:
                if self.epoch is not None:
                    self._lose("expired", self.epoch)
                return False
            if epoch != self.epoch:
                self.terms += 1
                log.info("cpm.lease.acquired", holder=self.holder, epoch=epoch, lease_s=self.ttl_s)
            self.epoch = epoch
            self._valid_until = started + self.ttl_s
            return True

    def release(self) -> None:
        """Clean shutdown: let the lease lapse now so a follower takes over at its next poll."""
        with self._lock:
            epoch, self.epoch = self.epoch, None
            try:
                if epoch is not None and self._conn is not None and not self._conn.closed:
                    self._conn.execute(
                        "UPDATE lease SET expires_at = clock_timestamp() - interval '1 millisecond' "
                        "WHERE name = %s AND holder = %s AND epoch = %s", (self.name, self.holder, epoch))
                    log.info("cpm.lease.released", holder=self.holder, epoch=epoch)
            except psycopg.Error as exc:
                log.warning("cpm.lease.release_failed", holder=self.holder, error=str(exc).strip())
            finally:
                self._drop_connection()

    def _renew(self, conn: psycopg.Connection[Any]) -> int | None:
        row = conn.execute(
            "UPDATE lease SET expires_at = clock_timestamp() + make_interval(secs => %s) "
            "WHERE name = %s AND holder = %s AND epoch = %s RETURNING epoch",
            (self.ttl_s, self.name, self.holder, self.epoch)).fetchone()
        return None if row is None else int(row[0])

    def _take_over(self, conn: psycopg.Connection[Any]) -> int | None:
        """Under the store's write lock: ordered against every fenced write. A live lease
        is seen without the lock first, so polling followers do not queue behind batches."""
        live = conn.execute("SELECT expires_at >= clock_timestamp() FROM lease WHERE name = %s",
                            (self.name,)).fetchone()
        if live is not None and live[0]:
            return None
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (WRITE_LOCK, int(self.store.db.lock_key)))
            row = conn.execute(
                "INSERT INTO lease (name, holder, epoch, expires_at, acquired_at) "
                "VALUES (%s, %s, 1, clock_timestamp() + make_interval(secs => %s), clock_timestamp()) "
                "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, epoch = lease.epoch + 1, "
                "expires_at = excluded.expires_at, acquired_at = excluded.acquired_at "
                "WHERE lease.expires_at < clock_timestamp() RETURNING epoch",
                (self.name, self.holder, self.ttl_s)).fetchone()
        return None if row is None else int(row[0])

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            db = self.store.db
            # its own connection: a renew must not wait for the node's open batch
            self._conn = connect(db.conninfo, db.where, readonly=False, lock_timeout_ms=db.lock_timeout_ms,
                                 connect_timeout_s=max(1, int(self.ttl_s / 3)))
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg.Error:
                pass
            self._conn = None

    def _lose(self, why: str, epoch: int) -> None:
        if self.epoch == epoch:
            self.epoch = None
            log.warning("cpm.lease.lost", holder=self.holder, epoch=epoch, reason=why)

    def close(self) -> None:
        self.release()

    def describe(self) -> dict[str, Any]:
        return lease_status(self.store, self.name)


def lease_status(store: Any, name: str = LEASE_NAME) -> dict[str, Any]:
    """The lease row as the database has it, by its clock (``knexa-cpm doctor``, tests);
    reads only. ``holder`` None: no replica ever held it."""
    if not hasattr(store, "db"):
        raise LeaseUnsupported(f"{store.location}: no replica lease in a SQLite store")
    row = store.db.execute(
        "SELECT holder, epoch, expires_at > clock_timestamp(), "
        "EXTRACT(EPOCH FROM expires_at - clock_timestamp()) FROM lease WHERE name = %s", (name,)).fetchone()
    if row is None:
        return {"holder": None, "epoch": 0, "live": False, "expires_in_s": None}
    return {"holder": row[0], "epoch": int(row[1]), "live": bool(row[2]), "expires_in_s": float(row[3])}


def leadership_for(store: Store, lease_s: float, *, poll_s: float = DEFAULT_POLL_S) -> Leadership | None:
    """The lease of a replica (``lease_s > 0``), None for a single node (``lease_s == 0``).
    Raises ``LeaseUnsupported`` for a store several processes cannot share (SQLite)."""
    if lease_s <= 0:
        return None
    return Leadership(store, ttl_s=lease_s, poll_s=poll_s)
