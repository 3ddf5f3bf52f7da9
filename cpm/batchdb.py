"""The store backends' connection with group commit: per-call transactions, or many
messages in one write transaction with one durable commit. This class is the SQLite
backend's (``cpm.store_sqlite``); the PostgreSQL backend subclasses it
(``cpm.pgdb.PgBatchDb``) and replaces only the driver-facing steps (``execute``,
``_begin``, ``_commit``, ``_rollback``, ``_in_transaction``), so the batch logic that
decides what may be acknowledged exists once.

Why: with ``synchronous=FULL`` each COMMIT costs an fsync (milliseconds: ``commit_ms``
in ``benchmarks/ingest.py``), and the CPM must not acknowledge anything that is not
durable. Group commit keeps that guarantee and pays one fsync per *batch*:

* ``grouped()``: inside it, the outermost ``transaction()`` is a ``SAVEPOINT`` in one
  shared ``BEGIN IMMEDIATE`` transaction (the open *batch*), so one bad message rolls
  back only itself. ``commit_batch()`` makes the whole batch durable. The caller
  (``cpm.service.GroupCommitter``) acknowledges a message only after the COMMIT of its
  batch returned, and fails every message of a batch whose COMMIT failed.
* outside ``grouped()`` (CLI, tests, the admin handler) ``transaction()`` commits before
  it returns, as it always did; if a batch is open it joins it and commits the batch.

``commit_batch`` may run on a worker thread so the event loop keeps serving while the
disk syncs: every statement runs under one re-entrant lock and returns its rows already
fetched, so the connection is never used by two threads at once.

Errors leave here backend-neutral where callers act on them: a
``sqlite3.OperationalError`` (locked past the busy timeout, disk full, I/O) becomes
``cpm.store.StoreUnavailable``, a failed batch ``cpm.store.BatchCommitError``.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import structlog

from cpm.store import BatchCommitError, BatchEndHook, BatchOpenHook, StoreError, StoreUnavailable

__all__ = ["BatchCommitError", "BatchDb", "Result"]

log = structlog.get_logger(__name__)


class Result:
    """A statement's rows, fetched while the lock was held (no lazy cursor escapes it)."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def fetchone(self) -> Any:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[Any]:
        return self._rows

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)


class BatchDb:
    """One SQLite connection (``isolation_level=None``) with explicit transactions."""

    # errors of the driver a failed ROLLBACK may raise (logged, not raised: the batch
    # has already failed)
    driver_errors: tuple[type[BaseException], ...] = (sqlite3.Error,)

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.lock = threading.RLock()
        self._in_tx = False
        self._grouping = False
        self._batch: int | None = None  # number of the open batch
        self._batches = 0
        # hooks for the committer; called on the thread that caused the event (the loop)
        self.on_batch_open: Callable[[int], None] | None = None
        self.on_batch_end: Callable[[int, BaseException | None], None] | None = None
        self._before_commit: dict[str, Callable[[], None]] = {}

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Result:
        with self.lock:
            try:
                cur = self.conn.execute(sql, args)
                return Result(cur.fetchall(), cur.rowcount)
            except sqlite3.OperationalError as exc:  # busy, full, I/O: the caller may retry
                raise StoreUnavailable(str(exc)) from exc

    # ---- the driver-facing steps (``cpm.pgdb.PgBatchDb`` replaces them) ----------
    def _begin(self) -> None:
        """Start a write transaction; returns once this connection is the only writer."""
        self.execute("BEGIN IMMEDIATE")

    def _commit(self) -> None:
        """Commit durably, or raise (then the transaction is still open or gone)."""
        self.execute("COMMIT")

    def _rollback(self) -> None:
        self.execute("ROLLBACK")

    def _in_transaction(self) -> bool:
        """Whether a transaction is open on the connection (SQLite may have rolled one
        back by itself, e.g. on a full disk)."""
        return bool(self.conn.in_transaction)

    def _transaction_usable(self) -> bool:
        """Whether the open transaction can take more statements (PostgreSQL: not
        aborted by an error outside a savepoint)."""
        return self._in_transaction()

    def defer_until_commit(self, key: str, write: Callable[[], None]) -> bool:
        """In an open batch: run ``write`` right before the batch's COMMIT, once per
        ``key`` (a later registration replaces an earlier one), on whichever thread
        commits. For a write whose latest value is all that matters — the strategy state,
        tens of KiB of JSON — so a batch of N messages serialises it once, not N times.
        ``write`` must use ``execute`` only (no ``transaction``) and read nothing the
        event loop may be changing (the engine is gated while a batch commits). Returns
        False outside a batch: the caller writes now."""
        with self.lock:
            if self._batch is None:
                return False
            self._before_commit[key] = write
            return True

    @property
    def open_batch(self) -> int | None:
        """Number of the batch holding uncommitted writes, or None."""
        return self._batch

    @contextmanager
    def grouped(self) -> Iterator[None]:
        """Writes inside join the shared batch instead of committing on their own."""
        with self.lock:
            outer = self._grouping
            self._grouping = True
            try:
                yield
            finally:
                self._grouping = outer

    @contextmanager
    def transaction(self) -> Iterator[BatchDb]:
        """One atomic unit (rollback on any exception); an inner call joins the outer."""
        with self.lock:
            if self._in_tx:
                yield self
            elif self._grouping or self._batch is not None:
                with self._savepoint():
                    yield self
                if not self._grouping:  # a standalone writer returns only once durable
                    self._flush()
            else:
                self._begin()
                self._in_tx = True
                try:
                    yield self
                except BaseException:
                    self._rollback()
                    raise
                else:
                    try:
                        self._commit()
                    except BaseException:
                        if self._in_transaction():  # a refused COMMIT must not leave it open
                            self._rollback()
                        raise
                finally:
                    self._in_tx = False

    @contextmanager
    def _savepoint(self) -> Iterator[None]:
        if self._batch is not None and not self._transaction_usable():
            # the database rolled the whole batch back (SQLite: disk full; PostgreSQL: a
            # failed statement outside a savepoint, a lost connection): its COMMIT will
            # fail and fail its waiters; a savepoint now would silently autocommit
            raise StoreUnavailable(f"batch {self._batch} was rolled back by the database")
        if self._batch is None:
            self._begin()
            self._batches += 1
            self._batch = self._batches
            if self.on_batch_open is not None:  # at once: an open batch must always get committed
                self.on_batch_open(self._batch)
        self.execute("SAVEPOINT knexa_msg")
        self._in_tx = True
        try:
            yield
        except BaseException:
            self.execute("ROLLBACK TO knexa_msg")
            self.execute("RELEASE knexa_msg")
            raise
        else:
            self.execute("RELEASE knexa_msg")
        finally:
            self._in_tx = False

    def _flush(self) -> None:
        batch = self._batch
        try:
            self.commit_batch()
        except BatchCommitError as exc:
            if self.on_batch_end is not None:
                self.on_batch_end(exc.batch, exc)
            raise exc.cause from None
        if batch is not None and self.on_batch_end is not None:
            self.on_batch_end(batch, None)

    def commit_batch(self) -> int | None:
        """COMMIT the open batch (one fsync); returns its number, None if there was none.
        On failure the batch is rolled back and ``BatchCommitError`` raised."""
        with self.lock:
            batch = self._batch
            if batch is None:
                return None
            try:
                writes, self._before_commit = list(self._before_commit.values()), {}
                for write in writes:  # the batch's last statements (defer_until_commit)
                    write()
                self._commit()
            except Exception as exc:  # a failed deferred write fails the batch like a failed COMMIT
                if self._in_transaction():
                    try:
                        self._rollback()
                    except (*self.driver_errors, StoreError) as exc2:
                        log.error("cpm.store.rollback_failed", batch=batch, error=str(exc2))
                raise BatchCommitError(batch, exc) from exc
            finally:
                self._batch = None
                self._before_commit = {}
            return batch

    def close(self) -> None:
        """Close; a pending batch is committed first (nothing in it was acknowledged,
        but the engine's own transitions in it should not be lost)."""
        with self.lock:
            if self._batch is not None:
                try:
                    self.commit_batch()
                except BatchCommitError as exc:
                    log.warning("cpm.store.close_commit_failed", error=str(exc))
            self.conn.close()


class BatchedStore:
    """The ``Store`` methods that are the batch machinery's own, shared by every backend
    built on ``BatchDb`` (SQLite, PostgreSQL): they only delegate to ``self._db``."""

    _db: BatchDb

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Atomic unit (rollback on any exception). Re-entrant: an inner ``transaction()``
        joins the outer one. Commits before returning unless inside ``grouped()``."""
        with self._db.transaction():
            yield

    def grouped(self) -> AbstractContextManager[None]:
        return self._db.grouped()

    @property
    def open_batch(self) -> int | None:
        return self._db.open_batch

    def commit_batch(self) -> int | None:
        return self._db.commit_batch()

    def set_batch_hooks(self, on_open: BatchOpenHook | None, on_end: BatchEndHook | None) -> None:
        self._db.on_batch_open = on_open
        self._db.on_batch_end = on_end
