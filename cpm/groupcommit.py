"""Group commit for the running CPM: many requests, one COMMIT (one fsync), and no
answer before the COMMIT that holds its request returned.

Why: ``synchronous=FULL`` costs an fsync per COMMIT (milliseconds: ``commit_ms`` in
``benchmarks/ingest.py``), so committing per message caps the node at one message per
fsync and stalls its event loop for every one. Here requests write into one open batch
(``Store.grouped()``; the SQLite backend gives each message a SAVEPOINT, ``cpm.batchdb``),
a committer task commits the batch shortly after it opened — on a worker thread, so the
loop keeps reading and verifying requests while the disk syncs — and then wakes every
request of the batch, which only then sends its answer. It needs only the store's
``GroupCommit`` side (``open_batch``, ``commit_batch``, ``set_batch_hooks``;
``cpm.store``), whatever the backend.

Protocol for callers (``cpm.service``), all on the trio thread:

1. ``await gate()`` before touching the engine/store: never while a COMMIT is running on
   the worker thread (the store is not shared between threads beyond ``commit_batch``);
2. the engine call itself is synchronous; right after it, with no ``await`` in between,
   ``join()`` returns the batch that now holds everything the call wrote *or read*
   (batches commit in order and a new one opens only after the previous one ended);
3. ``await wait(batch)`` before answering: returns once it is committed, raises
   ``CommitFailed`` if its COMMIT failed (then nothing of it is stored and every request
   of that batch is answered with an error — the client retries).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog
import trio

from cpm.store import BatchCommitError, GroupCommit
from protocol.errors import Unavailable

log = structlog.get_logger(__name__)

COMMIT_WINDOW_S = 0.002  # a batch waits at most this long for more requests to join …
COMMIT_MAX_BATCH = 256  # … unless this many requests already wait on it


class CommitFailed(Unavailable):
    """The batch holding this request's effects could not be committed: nothing of it
    is stored; the client gets ``Error{unavailable}`` and retries."""


class Batch:
    """Waiters of one open batch."""

    __slots__ = ("number", "done", "full", "waiters", "error")

    def __init__(self, number: int) -> None:
        self.number = number
        self.done = trio.Event()
        self.full = trio.Event()
        self.waiters = 0
        self.error: BaseException | None = None


class GroupCommitter:
    """Commits the open batch as soon as no more requests are joining it (at most
    ``window_s`` after it opened, at once when ``max_batch`` joined); a failed COMMIT
    fails every waiter and calls ``on_failure``."""

    def __init__(self, store: GroupCommit, *, window_s: float = COMMIT_WINDOW_S, max_batch: int = COMMIT_MAX_BATCH,
                 in_thread: bool = True, on_failure: Callable[[BaseException], None] | None = None) -> None:
        self.store = store
        self.window_s = window_s
        self.max_batch = max_batch
        self.in_thread = in_thread
        self.on_failure = on_failure
        self.committing = False
        self.stats = {"batches": 0, "messages": 0, "failed_batches": 0}
        self._pending: dict[int, Batch] = {}
        self._kick = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
        # on_end: a standalone writer (the admin handler) committed the open batch
        store.set_batch_hooks(on_open=lambda _number: self._kick.set(), on_end=self._resolve)

    async def gate(self) -> None:
        while self.committing:
            await self._idle.wait()

    def join(self) -> Batch | None:
        """The batch holding what the engine call that just returned wrote or read;
        None when nothing is pending (it was all committed already)."""
        number = self.store.open_batch
        if number is None:
            return None
        batch = self._batch(number)
        batch.waiters += 1
        if batch.waiters >= self.max_batch:
            batch.full.set()
        return batch

    async def wait(self, batch: Batch | None) -> None:
        if batch is None:
            return
        await batch.done.wait()
        if batch.error is not None:
            raise CommitFailed(f"commit failed: {batch.error}")

    def _batch(self, number: int) -> Batch:
        batch = self._pending.get(number)
        if batch is None:
            batch = self._pending[number] = Batch(number)
        return batch

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._kick.wait()
            self._kick = trio.Event()
            number = self.store.open_batch
            if number is None:
                continue
            await self._gather(self._batch(number))
            await self.commit()

    async def _gather(self, batch: Batch) -> None:
        """Let requests join while they keep coming: one scheduler tick at a time, at most
        ``window_s``, at once when ``max_batch`` wait. A lone request is committed after
        one tick (its answer waits only for the fsync); under load the batch fills."""
        deadline = trio.current_time() + self.window_s
        while not batch.full.is_set() and trio.current_time() < deadline:
            seen = batch.waiters
            await trio.sleep(0)
            if batch.waiters == seen:
                return

    async def commit(self) -> None:
        """Commit the open batch now (worker thread or loop) and resolve its waiters."""
        self.committing = True
        self._idle = trio.Event()
        error: BaseException | None = None
        try:
            if self.in_thread:  # not abandoned on cancel: a COMMIT is never left half-observed
                number = await trio.to_thread.run_sync(self.store.commit_batch)
            else:
                number = self.store.commit_batch()
        except BatchCommitError as exc:
            number, error = exc.batch, exc.cause
        finally:
            self.committing = False
            self._idle.set()
        if number is not None:
            self._resolve(number, error)

    def _resolve(self, number: int, error: BaseException | None) -> None:
        batch = self._pending.pop(number, None) or Batch(number)
        self.stats["batches"] += 1
        self.stats["messages"] += batch.waiters
        if error is not None:
            self.stats["failed_batches"] += 1
            log.error("cpm.commit.failed", batch=number, waiters=batch.waiters, error=str(error))
            if self.on_failure is not None:
                self.on_failure(error)
        batch.error = error
        batch.done.set()
