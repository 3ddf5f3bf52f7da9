"""The PostgreSQL backend of the CPM store (``cpm.store``), for operators who keep their
state in a database server they already run, back up and replicate.

Same contract as the SQLite backend (tests/unit/test_store_contract.py runs every test
on both): nothing is acknowledged before its COMMIT returned (``synchronous_commit =
on``: the WAL is flushed), group commit with a savepoint per message
(``cpm.pgdb.PgBatchDb``, which reuses ``cpm.batchdb``'s batch logic), one writer at a
time (an advisory lock per write transaction, as SQLite's file lock), the per-request
questions answered from trigger-kept tallies (``cpm.schema_postgres``), and the schema
created or migrated on a read-write open, never on a read-only one.

Locations: any libpq URL, ``postgresql://user@host:port/dbname?…`` (``postgres://``
too). The database must exist (``createdb``); the tables live in the first schema of the
session's ``search_path`` — add ``?options=-csearch_path%3Dknexa`` to keep them in their
own schema, which a writer creates when it is missing. Passwords belong in libpq's
``~/.pgpass`` / ``PGPASSFILE``, not in the URL (``location`` never shows one).

Errors: connection loss, timeouts, serialization failures and writes refused by a
standby surface as ``StoreUnavailable`` (retry; the node's ticker does); a missing
database or schema as ``StoreNotFound`` when opened read-only, ``StoreError`` otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
import structlog
from psycopg import errors as pg_errors

from cpm.batchdb import BatchedStore
from cpm.pgdb import PgBatchDb
from cpm.schema_postgres import ACTIVITY_BUCKET_MS, SCHEMA_VERSION, SchemaError, integrity, migrate
from cpm.store import (
    AgentRow,
    DirectiveRow,
    FeedbackRow,
    ProfileRecord,
    RoundRow,
    Store,
    StoreError,
    StoreHealth,
    StoreNotFound,
    StoreUnavailable,
    redact_location,
)

log = structlog.get_logger(__name__)

_AGENT = ("peer_id, org, admitted, revoked, admitted_at, registered_at, last_seen, family, listen_addrs, "
          "agent_version")
_ROUND = "round, state, opened_at, matched_at, closed_at"
_DIRECTIVE = ("directive_id, round, teacher, student, arm, params, score, context, state, issued_at, expires_at, "
              "envelope")
_FEEDBACK = "directive_id, round, loss_pre, loss_post, kb, ok, failure, raw_reward, reward, received_at"
_SAVE_BANDIT_STATE = (
    "INSERT INTO bandit_state (id, strategy, state, updated_at, gen) VALUES (1, %s, %s, %s, 1) "
    "ON CONFLICT (id) DO UPDATE SET strategy = excluded.strategy, state = excluded.state, "
    "updated_at = excluded.updated_at, gen = bandit_state.gen + 1 RETURNING gen"
)


def open_postgres(target: str, *, readonly: bool = False) -> Store:
    """``cpm.store.open_store`` for ``postgresql://…`` and ``postgres://…``."""
    return PostgresStore(target, readonly=readonly)


class PostgresStore(BatchedStore):
    """``cpm.store.Store`` on one PostgreSQL connection. One instance per process."""

    def __init__(self, url: str, *, readonly: bool = False, lock_timeout_ms: int = 5000) -> None:
        self.url = url
        self.readonly = readonly
        self._where = redact_location(url)
        self._db = PgBatchDb(url, self._where, readonly=readonly, lock_timeout_ms=lock_timeout_ms)
        self._bandit_gen = 0  # generation of the strategy state this process last read or wrote
        try:
            self._open_schema()
        except SchemaError as exc:
            self._db.conn.close()
            raise StoreError(f"{self._where}: {exc}") from None
        except StoreError:
            self._db.conn.close()
            raise
        except psycopg.Error as exc:  # e.g. no privilege to create the schema
            self._db.conn.close()
            raise StoreError(f"{self._where}: {str(exc).strip()}") from None

    def _open_schema(self) -> None:
        schema = self._db.execute("SELECT current_schema()").fetchone()[0]
        if schema is None:  # no schema of the search_path exists
            wanted = self._first_search_path_schema()
            if self.readonly or wanted is None:
                raise StoreNotFound(f"{self._where}: schema {wanted or '(none)'} does not exist")
            try:
                self._db.execute(f"CREATE SCHEMA IF NOT EXISTS {_quote_ident(wanted)}")
            except (pg_errors.UniqueViolation, pg_errors.DuplicateSchema):
                pass  # another process created it at the same moment (IF NOT EXISTS is not atomic)
            else:
                log.info("cpm.store.schema_created", location=self._where, schema=wanted)
        self._db.lock_key = int(self._one(
            "SELECT (oid::int8 % 2147483647)::int4 FROM pg_namespace WHERE nspname = current_schema()"))
        if self.readonly:  # no migration: the doctor reports a foreign version instead
            if self._db.execute("SELECT to_regclass('schema_version')").fetchone()[0] is None:
                raise StoreNotFound(f"{self._where}: no CPM store here (knexa-cpm init --store …)")
            return
        with self._db.transaction():
            before = self._one("SELECT to_regclass('schema_version')") is not None
            version = migrate(self._db.execute)
        if not before:
            log.info("cpm.store.created", location=self._where, schema_version=version)

    def _first_search_path_schema(self) -> str | None:
        path = self._db.execute("SELECT current_setting('search_path')").fetchone()[0]
        for item in str(path).split(","):
            name = item.strip()
            if name.startswith('"') and name.endswith('"'):
                name = name[1:-1].replace('""', '"')
            if name and name != "$user":
                return name
        return None

    def close(self) -> None:
        self._db.close()

    @property
    def location(self) -> str:
        return self._where

    # ---- plumbing ---------------------------------------------------------------
    @property
    def db(self) -> PgBatchDb:
        """The connection with its batch machinery — for this backend's own tests and
        the ingest benchmark's server CPU, not part of ``cpm.store.Store``."""
        return self._db






    def _one(self, sql: str, args: Sequence[Any] = ()) -> Any:
        row = self._db.execute(sql, args).fetchone()
        return None if row is None else row[0]

    def schema_version(self) -> int:
        return int(self._one("SELECT max(version) FROM schema_version"))

    def health(self) -> StoreHealth:
        """Schema version, integrity (tables, triggers, tallies), the durability settings
        the node relies on, counts — reads only."""
        try:
            version = self._one("SELECT max(version) FROM schema_version")
            server = self._one("SHOW server_version")
            fsync = self._one("SHOW fsync")
            standby = bool(self._one("SELECT pg_is_in_recovery()"))
            counts = self.counts()
            check = integrity(self._db.execute)
        except (psycopg.Error, StoreUnavailable) as exc:
            raise StoreError(f"{self._where}: {exc}") from None
        warning = None
        if fsync != "on":
            warning = "fsync=off: a committed (acknowledged) message can be lost in a crash of the server"
        elif standby:
            warning = "the server is a standby (in recovery): the node cannot write here"
        return StoreHealth(
            location=self._where, schema_version=None if version is None else int(version),
            schema_expected=SCHEMA_VERSION, integrity=check, durability="synchronous_commit=on",
            durability_warning=warning,
            durability_hint="set fsync = on in postgresql.conf; point `store` at the primary",
            counts=counts, backend=f"PostgreSQL {str(server).split()[0]}")

    # ---- agents -----------------------------------------------------------------
    def admit(self, peer_id: str, org: str, now_ms: int) -> None:
        with self._db.transaction() as db:
            db.execute(
                "INSERT INTO agents (peer_id, org, admitted, revoked, admitted_at) VALUES (%s, %s, TRUE, FALSE, %s) "
                "ON CONFLICT (peer_id) DO UPDATE SET admitted = TRUE, revoked = FALSE, "
                "admitted_at = excluded.admitted_at, "
                "org = CASE WHEN excluded.org <> '' THEN excluded.org ELSE agents.org END",
                (peer_id, org, now_ms))

    def revoke(self, peer_id: str, now_ms: int) -> bool:
        with self._db.transaction() as db:
            cur = db.execute("UPDATE agents SET admitted = FALSE, revoked = TRUE WHERE peer_id = %s", (peer_id,))
            if cur.rowcount > 0:
                return True
            db.execute("INSERT INTO agents (peer_id, admitted, revoked) VALUES (%s, FALSE, TRUE)", (peer_id,))
            return False

    def admission(self, peer_id: str) -> tuple[bool, bool]:
        row = self._db.execute("SELECT admitted, revoked FROM agents WHERE peer_id = %s", (peer_id,)).fetchone()
        return (False, False) if row is None else (bool(row[0]), bool(row[1]))

    def is_admitted(self, peer_id: str) -> bool:
        admitted, revoked = self.admission(peer_id)
        return admitted and not revoked

    def is_revoked(self, peer_id: str) -> bool:
        return self.admission(peer_id)[1]

    def register(self, peer_id: str, *, org: str, family: str, listen_addrs: Sequence[str], agent_version: str,
                 now_ms: int, admit: bool = False) -> None:
        with self._db.transaction() as db:
            db.execute(
                "INSERT INTO agents (peer_id, org, admitted, revoked, admitted_at) VALUES (%s, %s, %s, FALSE, %s) "
                "ON CONFLICT (peer_id) DO NOTHING", (peer_id, org, admit, now_ms if admit else None))
            db.execute(
                "UPDATE agents SET registered_at = %s, last_seen = %s, family = %s, listen_addrs = %s, "
                "agent_version = %s, org = CASE WHEN org = '' THEN %s ELSE org END WHERE peer_id = %s",
                (now_ms, now_ms, family, list(listen_addrs), agent_version, org, peer_id))

    def touch(self, peer_id: str, now_ms: int) -> None:
        with self._db.transaction() as db:
            db.execute("UPDATE agents SET last_seen = %s WHERE peer_id = %s", (now_ms, peer_id))

    def get_agent(self, peer_id: str) -> AgentRow | None:
        row = self._db.execute(f"SELECT {_AGENT} FROM agents WHERE peer_id = %s", (peer_id,)).fetchone()
        return None if row is None else _agent(row)

    def list_agents(self) -> list[AgentRow]:
        return [_agent(r) for r in self._db.execute(f"SELECT {_AGENT} FROM agents ORDER BY peer_id")]

    def count_active(self, since_ms: int) -> int:
        """Whole seconds after ``since_ms`` from ``activity_tally``, the second holding
        it counted exactly along ``agents_active`` (as the SQLite backend)."""
        bucket = since_ms // ACTIVITY_BUCKET_MS
        return int(self._one(
            "SELECT (SELECT COALESCE(SUM(agents), 0) FROM activity_tally WHERE bucket > %s)::bigint + "
            "(SELECT COUNT(*) FROM agents WHERE admitted AND NOT revoked AND registered_at IS NOT NULL "
            "AND last_seen >= %s AND last_seen < %s)", (bucket, since_ms, (bucket + 1) * ACTIVITY_BUCKET_MS)))

    # ---- profiles ---------------------------------------------------------------
    def put_profile(self, peer_id: str, round_: int, vector: Sequence[float], transfer_hash: str, now_ms: int) -> None:
        with self._db.transaction() as db:
            db.execute("UPDATE agents SET last_seen = %s WHERE peer_id = %s", (now_ms, peer_id))
            db.execute(
                "INSERT INTO profiles (peer_id, round, vector, transfer_hash, received_at) VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT (peer_id, round) DO UPDATE SET vector = excluded.vector, "
                "transfer_hash = excluded.transfer_hash, received_at = excluded.received_at",
                (peer_id, round_, [float(v) for v in vector], transfer_hash, now_ms))

    def fresh_profiles(self, round_: int) -> list[tuple[str, list[float]]]:
        rows = self._db.execute(
            "SELECT p.peer_id, p.vector FROM profiles p JOIN agents a ON a.peer_id = p.peer_id "
            "WHERE p.round = %s AND a.admitted AND NOT a.revoked ORDER BY p.peer_id", (round_,))
        return [(r[0], list(r[1])) for r in rows]

    def count_fresh(self, round_: int) -> int:
        """From ``round_tally`` in O(log n) (``cpm.schema_postgres``)."""
        fresh = self._one("SELECT fresh FROM round_tally WHERE round = %s", (round_,))
        return 0 if fresh is None else int(fresh)

    def first_profile_at(self, round_: int) -> int | None:
        first = self._one("SELECT MIN(received_at) FROM profiles WHERE round = %s", (round_,))
        return None if first is None else int(first)

    def list_profiles(self, round_: int | None = None) -> list[ProfileRecord]:
        sql = "SELECT peer_id, round, vector, transfer_hash, received_at FROM profiles"
        args: tuple[Any, ...] = ()
        if round_ is not None:
            sql += " WHERE round = %s"
            args = (round_,)
        rows = self._db.execute(sql + " ORDER BY round, peer_id", args)
        return [ProfileRecord(peer_id=r[0], round=int(r[1]), vector=list(r[2]), transfer_hash=r[3],
                              received_at=int(r[4])) for r in rows]

    # ---- rounds -----------------------------------------------------------------
    def open_round(self, round_: int, now_ms: int) -> None:
        with self._db.transaction() as db:
            db.execute("INSERT INTO rounds (round, state, opened_at) VALUES (%s, 'open', %s)", (round_, now_ms))

    def set_round_matched(self, round_: int, now_ms: int) -> None:
        with self._db.transaction() as db:
            db.execute("UPDATE rounds SET state = 'matched', matched_at = %s WHERE round = %s", (now_ms, round_))

    def set_round_closed(self, round_: int, now_ms: int) -> None:
        with self._db.transaction() as db:
            db.execute("UPDATE rounds SET state = 'closed', closed_at = %s WHERE round = %s", (now_ms, round_))

    def latest_round(self) -> RoundRow | None:
        row = self._db.execute(f"SELECT {_ROUND} FROM rounds ORDER BY round DESC LIMIT 1").fetchone()
        return None if row is None else RoundRow(*row)

    def get_round(self, round_: int) -> RoundRow | None:
        row = self._db.execute(f"SELECT {_ROUND} FROM rounds WHERE round = %s", (round_,)).fetchone()
        return None if row is None else RoundRow(*row)

    def list_rounds(self) -> list[RoundRow]:
        return [RoundRow(*r) for r in self._db.execute(f"SELECT {_ROUND} FROM rounds ORDER BY round")]

    # ---- directives -------------------------------------------------------------
    def add_directive(self, d: DirectiveRow) -> None:
        with self._db.transaction() as db:
            db.execute(
                f"INSERT INTO directives ({_DIRECTIVE}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (d.directive_id, d.round, d.teacher, d.student, d.arm, json.dumps(d.params, sort_keys=True),
                 float(d.score), [float(v) for v in d.context], d.state, d.issued_at, d.expires_at, d.envelope))

    def get_directive(self, directive_id: str) -> DirectiveRow | None:
        row = self._db.execute(f"SELECT {_DIRECTIVE} FROM directives WHERE directive_id = %s",
                               (directive_id,)).fetchone()
        return None if row is None else _directive(row)

    def directives_for_round(self, round_: int) -> list[DirectiveRow]:
        rows = self._db.execute(f"SELECT {_DIRECTIVE} FROM directives WHERE round = %s ORDER BY directive_id",
                                (round_,))
        return [_directive(r) for r in rows]

    def list_directives(self, round_: int | None = None) -> list[DirectiveRow]:
        if round_ is not None:
            return self.directives_for_round(round_)
        return [_directive(r) for r in self._db.execute(
            f"SELECT {_DIRECTIVE} FROM directives ORDER BY round, directive_id")]

    def directive_for_peer(self, round_: int, peer_id: str) -> DirectiveRow | None:
        row = self._db.execute(
            f"SELECT {_DIRECTIVE} FROM directives WHERE round = %s AND (teacher = %s OR student = %s) "
            "ORDER BY (student = %s) DESC, directive_id LIMIT 1",  # central-kd hub: any one of its
            (round_, peer_id, peer_id, peer_id)).fetchone()
        return None if row is None else _directive(row)

    def set_directive_state(self, directive_id: str, state: str) -> None:
        with self._db.transaction() as db:
            db.execute("UPDATE directives SET state = %s WHERE directive_id = %s", (state, directive_id))

    def has_issued(self, round_: int) -> bool:
        return bool(self._one(
            "SELECT EXISTS (SELECT 1 FROM directives WHERE round = %s AND state = 'issued')", (round_,)))

    def expirable(self, round_: int, now_ms: int) -> list[DirectiveRow]:
        rows = self._db.execute(
            f"SELECT {_DIRECTIVE} FROM directives WHERE round = %s AND state = 'issued' AND expires_at < %s "
            "ORDER BY directive_id", (round_, now_ms))
        return [_directive(r) for r in rows]

    def next_expiry(self, round_: int) -> int | None:
        first = self._one("SELECT MIN(expires_at) FROM directives WHERE round = %s AND state = 'issued'", (round_,))
        return None if first is None else int(first)

    # ---- feedback ---------------------------------------------------------------
    def add_feedback(self, f: FeedbackRow) -> bool:
        """Insert unless this directive already has feedback; True if inserted (a racing
        second process waits on the write lock, then finds the row)."""
        with self._db.transaction() as db:
            cur = db.execute(
                f"INSERT INTO feedback ({_FEEDBACK}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (directive_id) DO NOTHING",
                (f.directive_id, f.round, f.loss_pre, f.loss_post, f.kb, bool(f.ok), f.failure, f.raw_reward,
                 f.reward, f.received_at))
            return cur.rowcount > 0

    def get_feedback(self, directive_id: str) -> FeedbackRow | None:
        row = self._db.execute(f"SELECT {_FEEDBACK} FROM feedback WHERE directive_id = %s", (directive_id,)).fetchone()
        return None if row is None else FeedbackRow(*row)

    def list_feedback(self, round_: int | None = None) -> list[FeedbackRow]:
        if round_ is not None:
            rows = self._db.execute(f"SELECT {_FEEDBACK} FROM feedback WHERE round = %s ORDER BY directive_id",
                                    (round_,))
        else:
            rows = self._db.execute(f"SELECT {_FEEDBACK} FROM feedback ORDER BY round, directive_id")
        return [FeedbackRow(*r) for r in rows]

    # ---- bandit state -----------------------------------------------------------
    def save_bandit_state(self, strategy: str, state: dict[str, Any], now_ms: int) -> None:
        with self._db.transaction() as db:
            self._bandit_gen = int(db.execute(_SAVE_BANDIT_STATE, (strategy, json.dumps(state), now_ms)).fetchone()[0])

    def save_bandit_state_at_commit(self, strategy: str, state: Callable[[], dict[str, Any]], now_ms: int) -> None:
        """As the SQLite backend: in a batch, serialised once, right before its COMMIT."""
        def write() -> None:
            row = self._db.execute(_SAVE_BANDIT_STATE, (strategy, json.dumps(state()), now_ms)).fetchone()
            self._bandit_gen = int(row[0])

        if not self._db.defer_until_commit("bandit_state", write):
            self.save_bandit_state(strategy, state(), now_ms)

    def load_bandit_state(self) -> tuple[str, dict[str, Any]] | None:
        row = self._db.execute("SELECT strategy, state, gen FROM bandit_state WHERE id = 1").fetchone()
        if row is None:
            self._bandit_gen = 0
            return None
        self._bandit_gen = int(row[2])
        return row[0], json.loads(row[1])

    def bandit_state_stale(self) -> bool:
        """Whether another process (a replica, ``cpm.lease``) saved the strategy state
        since this one last read or wrote it. Ask inside the write transaction that will
        build on the state: it holds the write lock, so the answer stays true until COMMIT.
        Not part of ``cpm.store.Store``: a single-node store has no other writer of it."""
        gen = self._one("SELECT gen FROM bandit_state WHERE id = 1")
        return int(gen or 0) != self._bandit_gen

    # ---- stats ------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """One statement: a consistent snapshot (the node commits meanwhile)."""
        row = self._db.execute(
            "SELECT (SELECT COUNT(*) FROM agents), "
            "(SELECT COUNT(*) FROM agents WHERE admitted AND NOT revoked), "
            "(SELECT COUNT(*) FROM agents WHERE revoked), (SELECT COUNT(*) FROM profiles), "
            "(SELECT COUNT(*) FROM rounds), (SELECT COUNT(*) FROM feedback), (SELECT COUNT(*) FROM directives), "
            "(SELECT COUNT(*) FROM directives WHERE state = 'issued'), "
            "(SELECT COUNT(*) FROM directives WHERE state = 'used'), "
            "(SELECT COUNT(*) FROM directives WHERE state = 'expired'), "
            "(SELECT COUNT(*) FROM directives WHERE state = 'failed')").fetchone()
        keys = ("agents", "admitted", "revoked", "profiles", "rounds", "feedback", "directives", "directives_issued",
                "directives_used", "directives_expired", "directives_failed")
        return {k: int(v) for k, v in zip(keys, row)}


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _agent(r: Sequence[Any]) -> AgentRow:
    return AgentRow(peer_id=r[0], org=r[1], admitted=bool(r[2]), revoked=bool(r[3]), admitted_at=r[4],
                    registered_at=r[5], last_seen=r[6], family=r[7], listen_addrs=tuple(r[8]), agent_version=r[9])


def _directive(r: Sequence[Any]) -> DirectiveRow:
    return DirectiveRow(directive_id=r[0], round=int(r[1]), teacher=r[2], student=r[3], arm=int(r[4]),
                        params=json.loads(r[5]), score=float(r[6]), context=list(r[7]), state=r[8],
                        issued_at=int(r[9]), expires_at=int(r[10]), envelope=bytes(r[11]))
