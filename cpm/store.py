"""The CPM's storage seam: everything the round engine, the service, the admin tools,
the harness and the benchmarks may ask of the database — and nothing about how a
backend keeps it.

Why a seam: SQLite details (connections, SQL, PRAGMAs, savepoints) used to show through
``Store``, so a second backend would have touched most of ``cpm/``, the harness and the
benchmarks. Now callers see only this module: the row types, the ``Store`` protocol,
the errors, and ``open_store``, which maps a location to a backend. Two backends: SQLite
(``cpm.store_sqlite``, with ``cpm.batchdb`` and ``cpm.schema``), the default, and
PostgreSQL (``cpm.store_postgres``, with ``cpm.pgdb`` and ``cpm.schema_postgres``;
driver from the ``postgres`` extra) — each one module plus one line in ``BACKENDS``
(docs/architecture.md, "Storage seam"). ``tests/unit/test_store_contract.py`` states
the contract below as tests, run on both backends.

The contract every backend keeps:

* **Durable before answered.** A write method, or an outermost ``transaction()``,
  called outside ``grouped()`` returns only once its writes are committed durably
  (SQLite: ``synchronous=FULL``; PostgreSQL: ``synchronous_commit=on``), so the node
  may acknowledge what it stored.
* **Atomic messages.** ``transaction()`` is one atomic unit, rolled back on any
  exception; an inner ``transaction()`` joins the outer one. A message's effects
  (feedback row + directive state + bandit state) land together or not at all.
* **Group commit.** Inside ``grouped()`` an outermost ``transaction()`` writes into the
  shared open *batch* (one savepoint per message: a failing message rolls back only
  itself) and nothing is committed until ``commit_batch()`` — one durable commit for
  many messages. ``cpm.groupcommit`` answers a message only after the commit of its
  batch returned, and fails every message of a batch whose commit failed
  (``BatchCommitError``: the whole batch rolled back). ``commit_batch`` may run on a
  worker thread while the event loop reads; calls from two threads are serialised by
  the backend. A standalone ``transaction()`` while a batch is open joins it and
  commits it (``on_end`` hook). ``save_bandit_state_at_commit`` defers the (large)
  strategy state to the batch's commit: serialised once per batch, same transaction.
* **Several processes.** The admin CLI writes from another process while the node
  runs; every read sees what others committed (the allowlist is read per request).
* **Restart-safe.** All engine state is in the store; ``close()`` commits a pending
  batch (nothing in it was acknowledged, but the engine's own transitions should
  not be lost).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypedDict, runtime_checkable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# ---- rows ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgentRow:
    peer_id: str
    org: str
    admitted: bool
    revoked: bool
    admitted_at: int | None
    registered_at: int | None
    last_seen: int | None
    family: str
    listen_addrs: tuple[str, ...]
    agent_version: str


@dataclass(frozen=True, slots=True)
class RoundRow:
    round: int
    state: str  # open | matched | closed
    opened_at: int
    matched_at: int | None
    closed_at: int | None


@dataclass(frozen=True, slots=True)
class DirectiveRow:
    directive_id: str
    round: int
    teacher: str
    student: str
    arm: int
    params: dict[str, Any]
    score: float
    context: list[float]
    state: str  # issued | used | expired | failed
    issued_at: int
    expires_at: int
    envelope: bytes  # the CPM-signed Directive, served verbatim


@dataclass(frozen=True, slots=True)
class FeedbackRow:
    directive_id: str
    round: int
    loss_pre: float
    loss_post: float
    kb: float
    ok: bool
    failure: str
    raw_reward: float | None
    reward: float | None
    received_at: int


class ProfileRecord(TypedDict):
    """One stored profile as ``list_profiles`` returns it: a dict because the export
    (``knexa-cpm export --format json``) writes it as is."""

    peer_id: str
    round: int
    vector: list[float]
    transfer_hash: str
    received_at: int


@dataclass(frozen=True, slots=True)
class StoreHealth:
    """What ``knexa-cpm doctor`` reports about a store, read without changing it."""

    location: str  # for messages (the SQLite backend: the file's path)
    schema_version: int | None  # None: the store records none
    schema_expected: int  # what this build reads and writes
    integrity: str  # "ok", or the backend's first complaint
    durability: str  # the durable mode the node runs in, e.g. "WAL"
    durability_warning: str | None  # set when the store is not in that mode now …
    durability_hint: str  # … and what to do about it
    counts: dict[str, int]  # ``Store.counts()``
    backend: str = ""  # engine and version, e.g. "SQLite 3.45.1", "PostgreSQL 15.18"


# ---- errors ----------------------------------------------------------------------------


class StoreError(Exception):
    """The store is unusable (wrong schema version, not a database, cannot be opened).
    Base of every storage error, so callers that only report can catch one type; the
    CLI maps it to exit 3 (configuration), except ``StoreUnavailable`` (exit 1)."""


class StoreNotFound(StoreError):
    """Nothing at the location, and the caller asked not to create it (``readonly``)."""


class StoreUnavailable(StoreError):
    """The store could not do it now — another writer held the lock past the busy (lock)
    timeout, the disk is full, an I/O error, the database server is unreachable or the
    connection was lost: nothing of the operation was stored; try again later (the
    node's ticker does)."""


class UnsupportedBackend(StoreError):
    """``open_store`` got a location whose scheme no backend of this build handles."""


class BatchCommitError(StoreError):
    """The commit of a group-commit batch failed; the whole batch was rolled back."""

    def __init__(self, batch: int, cause: BaseException) -> None:
        super().__init__(f"commit of batch {batch} failed: {cause}")
        self.batch = batch
        self.cause = cause


# ---- the protocol ----------------------------------------------------------------------

BatchOpenHook = Callable[[int], None]
BatchEndHook = Callable[[int, BaseException | None], None]


@runtime_checkable
class GroupCommit(Protocol):
    """What ``cpm.groupcommit.GroupCommitter`` needs: the open batch, its commit, and
    hooks called when a batch opens or is ended by a standalone writer."""

    @property
    def open_batch(self) -> int | None:
        """Number of the batch holding uncommitted writes, or None."""
        ...

    def commit_batch(self) -> int | None:
        """Commit the open batch durably (may run on a worker thread); returns its
        number, None if none was open. On failure: rolled back, ``BatchCommitError``."""
        ...

    def set_batch_hooks(self, on_open: BatchOpenHook | None, on_end: BatchEndHook | None) -> None:
        """``on_open(batch)`` right when a batch opens (it must then get committed);
        ``on_end(batch, error)`` when a standalone ``transaction()`` committed it."""
        ...


@runtime_checkable
class Store(GroupCommit, Protocol):
    """The CPM database as the rest of the code sees it. One instance per process and
    connection; not for concurrent use except ``commit_batch`` (see the module doc).
    Times are epoch milliseconds; peer IDs are base58 strings."""

    @property
    def location(self) -> str:
        """Where the data lives, for messages (never a secret: no password)."""
        ...

    def close(self) -> None: ...

    # -- transactions and group commit
    def transaction(self) -> AbstractContextManager[None]:
        """Atomic unit, re-entrant; commits before returning unless inside ``grouped()``."""
        ...

    def grouped(self) -> AbstractContextManager[None]:
        """Writes inside join the shared batch instead of committing on their own."""
        ...

    # -- health
    def schema_version(self) -> int: ...

    def health(self) -> StoreHealth:
        """For the doctor: version, integrity, durability mode, counts. Raises
        ``StoreError`` when the store cannot even answer that."""
        ...

    def counts(self) -> dict[str, int]:
        """agents, admitted, revoked, profiles, rounds, feedback, directives, and
        directives_<state> for issued, used, expired, failed."""
        ...

    # -- agents (the allowlist is read on every request: keep these cheap)
    def admit(self, peer_id: str, org: str, now_ms: int) -> None:
        """Admit (and un-revoke); an empty ``org`` keeps the known one."""
        ...

    def revoke(self, peer_id: str, now_ms: int) -> bool:
        """Revoke; an unknown peer is recorded revoked. Returns whether it was known."""
        ...

    def admission(self, peer_id: str) -> tuple[bool, bool]:
        """(admitted, revoked), one lookup."""
        ...

    def is_admitted(self, peer_id: str) -> bool: ...

    def is_revoked(self, peer_id: str) -> bool: ...

    def register(self, peer_id: str, *, org: str, family: str, listen_addrs: Sequence[str],
                 agent_version: str, now_ms: int, admit: bool = False) -> None:
        """Record a Register (sets registered_at and last_seen; an admin's org wins).
        ``admit`` inserts an unknown peer admitted; it never un-revokes."""
        ...

    def touch(self, peer_id: str, now_ms: int) -> None:
        """last_seen = now."""
        ...

    def get_agent(self, peer_id: str) -> AgentRow | None: ...

    def list_agents(self) -> list[AgentRow]:
        """Ordered by peer ID."""
        ...

    def count_active(self, since_ms: int) -> int:
        """Admitted, unrevoked, registered agents with last_seen ≥ ``since_ms`` (the
        quorum's denominator; asked per request, so not O(agents))."""
        ...

    # -- profiles
    def put_profile(self, peer_id: str, round_: int, vector: Sequence[float], transfer_hash: str,
                    now_ms: int) -> None:
        """Latest profile per (agent, round) wins; refreshes last_seen."""
        ...

    def fresh_profiles(self, round_: int) -> list[tuple[str, list[float]]]:
        """Profiles of ``round_`` from admitted, unrevoked agents, ordered by peer ID."""
        ...

    def count_fresh(self, round_: int) -> int:
        """``len(fresh_profiles(round_))`` without loading them (asked per request)."""
        ...

    def first_profile_at(self, round_: int) -> int | None:
        """Earliest received_at of ``round_``'s profiles (the round timer's start)."""
        ...

    def list_profiles(self, round_: int | None = None) -> list[ProfileRecord]:
        """Ordered by round, then peer ID."""
        ...

    # -- rounds
    def open_round(self, round_: int, now_ms: int) -> None: ...

    def set_round_matched(self, round_: int, now_ms: int) -> None: ...

    def set_round_closed(self, round_: int, now_ms: int) -> None: ...

    def latest_round(self) -> RoundRow | None: ...

    def get_round(self, round_: int) -> RoundRow | None: ...

    def list_rounds(self) -> list[RoundRow]:
        """Ordered by round."""
        ...

    # -- directives
    def add_directive(self, d: DirectiveRow) -> None: ...

    def get_directive(self, directive_id: str) -> DirectiveRow | None: ...

    def directives_for_round(self, round_: int) -> list[DirectiveRow]:
        """Ordered by directive ID."""
        ...

    def list_directives(self, round_: int | None = None) -> list[DirectiveRow]:
        """Ordered by round, then directive ID."""
        ...

    def directive_for_peer(self, round_: int, peer_id: str) -> DirectiveRow | None:
        """The directive of ``round_`` naming ``peer_id``; as a student first (a
        central-kd hub teaches many: any one of those, the lowest ID)."""
        ...

    def set_directive_state(self, directive_id: str, state: str) -> None: ...

    def has_issued(self, round_: int) -> bool:
        """Whether a directive of ``round_`` is still ``issued`` (asked per request)."""
        ...

    def expirable(self, round_: int, now_ms: int) -> list[DirectiveRow]:
        """``issued`` directives of ``round_`` with expires_at < now, by directive ID."""
        ...

    def next_expiry(self, round_: int) -> int | None:
        """Earliest expires_at among ``round_``'s ``issued`` directives."""
        ...

    # -- feedback
    def add_feedback(self, f: FeedbackRow) -> bool:
        """Insert unless this directive already has feedback; True if inserted (also
        when another process raced us: exactly once)."""
        ...

    def get_feedback(self, directive_id: str) -> FeedbackRow | None: ...

    def list_feedback(self, round_: int | None = None) -> list[FeedbackRow]:
        """Ordered by round, then directive ID."""
        ...

    # -- strategy state (one row: strategy name + JSON-able state)
    def save_bandit_state(self, strategy: str, state: dict[str, Any], now_ms: int) -> None: ...

    def save_bandit_state_at_commit(self, strategy: str, state: Callable[[], dict[str, Any]],
                                    now_ms: int) -> None:
        """In an open batch: ``state()`` is called and saved right before the batch's
        commit, once per batch (a later call replaces an earlier one); outside a
        batch: saved now. ``state`` must read nothing the loop changes meanwhile (the
        engine is gated while a batch commits)."""
        ...

    def load_bandit_state(self) -> tuple[str, dict[str, Any]] | None: ...


# ---- backends --------------------------------------------------------------------------

# scheme → "module:function" that opens such a location; imported on first use, so a
# backend's driver is only needed by whoever uses it. Adding a backend = its module +
# one line here (and the contract test's parametrization).
BACKENDS: dict[str, str] = {
    "sqlite": "cpm.store_sqlite:open_sqlite",
    "postgresql": "cpm.store_postgres:open_postgres",
    "postgres": "cpm.store_postgres:open_postgres",
}
# the optional dependency (pyproject extra) a backend's driver comes from
EXTRAS: dict[str, str] = {"postgresql": "postgres", "postgres": "postgres"}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")  # two characters at least: not a drive letter


def scheme_of(target: str | os.PathLike[str]) -> str:
    """The backend a location names: ``sqlite:PATH`` and a plain path (or ``Path``) are
    SQLite; ``postgresql://…`` is PostgreSQL. A plain path whose first component holds
    a colon must be written ``./name:…`` or ``sqlite:name:…``."""
    if isinstance(target, os.PathLike):
        return "sqlite"
    match = _SCHEME.match(target)
    return match.group(1).lower() if match else "sqlite"


def has_password(target: str | os.PathLike[str]) -> bool:
    """Whether a URL location carries a password (``user:pw@`` or ``?password=``)."""
    if scheme_of(target) == "sqlite":
        return False
    parts = urlsplit(os.fspath(target))
    return parts.password is not None or any(k == "password" for k, _ in parse_qsl(parts.query))


def redact_location(target: str | os.PathLike[str]) -> str:
    """A location fit for messages and logs: a URL without its password."""
    text = os.fspath(target)
    if not has_password(text):
        return text
    parts = urlsplit(text)
    netloc = parts.netloc.rpartition("@")[2]
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "password"])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def open_store(target: str | os.PathLike[str], *, readonly: bool = False) -> Store:
    """Open (and, unless ``readonly``, create or migrate) the store at ``target``.

    ``readonly``: for observers (doctor, harness, load benchmark) — no migration, no
    write, ``StoreNotFound`` when nothing is there. Raises ``UnsupportedBackend`` for a
    scheme this build does not handle, or whose driver is not installed (a backend is
    imported on first use: its driver is an optional dependency), ``StoreError`` when
    the store is unusable.
    """
    scheme = scheme_of(target)
    spec = BACKENDS.get(scheme)
    if spec is None:
        raise UnsupportedBackend(f"{scheme}: unknown store backend (this build has: {', '.join(sorted(BACKENDS))})")
    module, _, function = spec.partition(":")
    try:
        backend = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:  # our own module missing: a broken install, not a choice
            raise
        raise UnsupportedBackend(f"{scheme}: the driver of this store backend is not installed ({exc.name}): "
                                 f"pip install 'knexa[{EXTRAS.get(scheme, scheme)}]'") from None
    opener: Callable[..., Store] = getattr(backend, function)
    return opener(os.fspath(target), readonly=readonly)


def store_location(home: Path, configured: str = "") -> str:
    """The location a home's ``store`` setting names: empty → the home's SQLite file;
    a relative SQLite path is relative to the home; a URL as it is."""
    from cpm.config import db_path

    if not configured:
        return f"sqlite:{db_path(home)}"
    if scheme_of(configured) != "sqlite":
        return configured
    path = configured[len("sqlite:"):] if configured.lower().startswith("sqlite:") else configured
    return f"sqlite:{Path(home) / Path(path).expanduser()}"


def home_store_location(home: Path) -> str:
    """Where the store of a CPM home lives: its config's ``store`` key (default: the
    home's SQLite file — also for a home that has no config yet)."""
    from cpm.config import config_path, load_config

    configured = load_config(home).store if config_path(home).exists() else ""
    return store_location(home, configured)


def open_home_store(home: Path, *, readonly: bool = False) -> Store:
    """``open_store`` for a CPM home (the CLI, the doctor, the harness)."""
    return open_store(home_store_location(home), readonly=readonly)
