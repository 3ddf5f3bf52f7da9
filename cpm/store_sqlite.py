"""The SQLite backend of the CPM store (``cpm.store``): one file in WAL mode; nothing is
acknowledged before it is committed.

Why SQLite/WAL: the CPM must survive ``kill -9`` with nothing acknowledged lost, and the
admin CLI (another process) must be able to admit/revoke while the node runs. WAL lets
that second writer in without stopping readers; ``synchronous=FULL`` makes every COMMIT
durable across power loss (an ``Ack`` is only sent after the COMMIT returned). The
running node reads the allowlist from the database on every request, so admin changes
apply immediately; ``data_version()`` lets callers notice foreign commits cheaply.

All writes go through ``transaction()``: by default each one is a ``BEGIN IMMEDIATE`` …
``COMMIT`` (one fsync); the running node uses group commit instead (``grouped()`` +
``commit_batch()``, see ``cpm.batchdb``): many messages, one fsync, still nothing
acknowledged before its COMMIT returned. The schema and its trigger-kept tallies are in
``cpm.schema``. These three modules are the only ones that know SQL.

Errors: ``sqlite3.OperationalError`` (locked past the busy timeout, disk full, I/O)
surfaces as ``StoreUnavailable`` (``cpm.batchdb``); a file that is not a usable
database as ``StoreError`` when it is opened.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog

from cpm.batchdb import BatchDb, BatchedStore
from cpm.schema import ACTIVITY_BUCKET_MS, SCHEMA_VERSION, SchemaError, migrate
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
)

log = structlog.get_logger(__name__)

_SAVE_BANDIT_STATE = (
    "INSERT INTO bandit_state (id, strategy, state, updated_at) VALUES (1, ?, ?, ?) "
    "ON CONFLICT(id) DO UPDATE SET strategy = excluded.strategy, state = excluded.state, "
    "updated_at = excluded.updated_at"
)


def open_sqlite(target: str, *, readonly: bool = False) -> Store:
    """``cpm.store.open_store`` for ``sqlite:PATH`` or a plain path."""
    path = target[len("sqlite:"):] if target.lower().startswith("sqlite:") else target
    if not path:
        raise StoreError(f"{target!r}: no database path")
    return SqliteStore(path, readonly=readonly)


class SqliteStore(BatchedStore):
    """``cpm.store.Store`` on one SQLite connection. One instance per process."""

    def __init__(self, path: Path | str, *, busy_timeout_ms: int = 5000, readonly: bool = False) -> None:
        self.path = str(path)
        self.readonly = readonly
        if readonly and not Path(self.path).exists():
            raise StoreNotFound(f"{self.path} not found")
        target = Path(self.path).absolute().as_uri() + "?mode=ro" if readonly else self.path
        try:
            conn = sqlite3.connect(target, uri=readonly, isolation_level=None, timeout=busy_timeout_ms / 1000,
                                   check_same_thread=False)  # commit_batch may run on a worker thread
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from None
        conn.row_factory = sqlite3.Row
        self._db = BatchDb(conn)
        mode = "wal"
        try:
            self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            if readonly:  # no migration: the doctor reports a foreign version instead
                self._db.execute("SELECT version FROM schema_version")  # is it a CPM database at all?
            else:
                mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.execute("PRAGMA foreign_keys=ON")
                self._migrate()
        except (sqlite3.DatabaseError, StoreUnavailable) as exc:
            conn.close()
            raise StoreError(f"{self.path}: {exc}") from None
        except StoreError:  # a schema version this build cannot use (cpm.schema)
            conn.close()
            raise
        if str(mode).lower() != "wal":
            log.warning("cpm.store.no_wal", path=self.path, mode=mode)

    def close(self) -> None:
        self._db.close()

    @property
    def location(self) -> str:
        return self.path

    # ---- plumbing ---------------------------------------------------------------
    @property
    def db(self) -> BatchDb:
        """The SQLite connection with its batch machinery — for this backend's own
        tests (fault injection), not part of ``cpm.store.Store``."""
        return self._db






    def _migrate(self) -> None:
        with self._db.transaction() as db:
            try:
                migrate(db)
            except SchemaError as exc:
                raise StoreError(str(exc)) from None

    def schema_version(self) -> int:
        return int(self._db.execute("SELECT version FROM schema_version").fetchone()[0])

    def data_version(self) -> int:
        """Changes whenever *another* connection commits (SQLite ``PRAGMA data_version``)."""
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def pragma(self, name: str) -> Any:
        return self._db.execute(f"PRAGMA {name}").fetchone()[0]

    def health(self) -> StoreHealth:
        """WAL mode (so admin commands from another process never block the node for
        long), ``quick_check``, schema version, counts — reads only."""
        try:
            mode = str(self.pragma("journal_mode")).lower()
            integrity = str(self.pragma("quick_check"))
            row = self._db.execute("SELECT version FROM schema_version").fetchone()
            counts = self.counts()
        except (sqlite3.DatabaseError, StoreUnavailable) as exc:
            raise StoreError(f"{self.path}: {exc}") from None
        return StoreHealth(
            location=self.path, schema_version=None if row is None else int(row[0]),
            schema_expected=SCHEMA_VERSION, integrity=integrity, durability="WAL",
            durability_warning=None if mode == "wal" else f"journal_mode={mode}",
            durability_hint="`knexa-cpm serve` switches it to WAL on start; a filesystem without WAL support "
                            "(network FS) is not supported",
            counts=counts, backend=f"SQLite {sqlite3.sqlite_version}")

    # ---- agents -----------------------------------------------------------------
    def admit(self, peer_id: str, org: str, now_ms: int) -> None:
        with self._db.transaction() as db:
            db.execute(
                "INSERT INTO agents (peer_id, org, admitted, revoked, admitted_at) VALUES (?, ?, 1, 0, ?) "
                "ON CONFLICT(peer_id) DO UPDATE SET admitted = 1, revoked = 0, admitted_at = excluded.admitted_at, "
                "org = CASE WHEN excluded.org != '' THEN excluded.org ELSE agents.org END",
                (peer_id, org, now_ms),
            )

    def revoke(self, peer_id: str, now_ms: int) -> bool:
        """Mark revoked (an unknown peer is recorded as revoked too: a pre-emptive ban).
        Returns whether the peer was known before."""
        with self._db.transaction() as db:
            cur = db.execute("UPDATE agents SET admitted = 0, revoked = 1 WHERE peer_id = ?", (peer_id,))
            if cur.rowcount > 0:
                return True
            db.execute("INSERT INTO agents (peer_id, admitted, revoked) VALUES (?, 0, 1)", (peer_id,))
            return False

    def admission(self, peer_id: str) -> tuple[bool, bool]:
        """(admitted, revoked) in one query — the check every request makes."""
        row = self._db.execute("SELECT admitted, revoked FROM agents WHERE peer_id = ?", (peer_id,)).fetchone()
        return (False, False) if row is None else (bool(row["admitted"]), bool(row["revoked"]))

    def is_admitted(self, peer_id: str) -> bool:
        admitted, revoked = self.admission(peer_id)
        return admitted and not revoked

    def is_revoked(self, peer_id: str) -> bool:
        return self.admission(peer_id)[1]

    def register(
        self,
        peer_id: str,
        *,
        org: str,
        family: str,
        listen_addrs: Sequence[str],
        agent_version: str,
        now_ms: int,
        admit: bool = False,
    ) -> None:
        """Record a Register. ``admit`` (open admission) inserts unknown peers as admitted;
        it never un-revokes a revoked one."""
        addrs = json.dumps(list(listen_addrs))
        with self._db.transaction() as db:
            exists = db.execute("SELECT 1 FROM agents WHERE peer_id = ?", (peer_id,)).fetchone()
            if exists is None:
                db.execute(
                    "INSERT INTO agents (peer_id, org, admitted, revoked, admitted_at) VALUES (?, ?, ?, 0, ?)",
                    (peer_id, org, 1 if admit else 0, now_ms if admit else None),
                )
            db.execute(
                "UPDATE agents SET registered_at = ?, last_seen = ?, family = ?, listen_addrs = ?, "
                "agent_version = ?, org = CASE WHEN org = '' THEN ? ELSE org END WHERE peer_id = ?",
                (now_ms, now_ms, family, addrs, agent_version, org, peer_id),
            )

    def touch(self, peer_id: str, now_ms: int) -> None:
        with self._db.transaction() as db:
            db.execute("UPDATE agents SET last_seen = ? WHERE peer_id = ?", (now_ms, peer_id))

    def get_agent(self, peer_id: str) -> AgentRow | None:
        row = self._db.execute("SELECT * FROM agents WHERE peer_id = ?", (peer_id,)).fetchone()
        return _agent(row) if row is not None else None

    def list_agents(self) -> list[AgentRow]:
        return [_agent(r) for r in self._db.execute("SELECT * FROM agents ORDER BY peer_id")]

    def count_active(self, since_ms: int) -> int:
        """Admitted, registered agents seen since ``since_ms`` (the quorum denominator).
        Asked on every request, so it is O(active window in seconds), not O(agents):
        whole seconds after ``since_ms`` come from ``activity_tally`` (``cpm.schema``),
        the second that holds ``since_ms`` is counted exactly along ``agents_active``."""
        bucket = since_ms // ACTIVITY_BUCKET_MS
        row = self._db.execute(
            "SELECT (SELECT COALESCE(SUM(agents), 0) FROM activity_tally WHERE bucket > ?) + "
            "(SELECT COUNT(*) FROM agents WHERE admitted = 1 AND revoked = 0 AND registered_at IS NOT NULL "
            "AND last_seen >= ? AND last_seen < ?)", (bucket, since_ms, (bucket + 1) * ACTIVITY_BUCKET_MS)).fetchone()
        return int(row[0])

    def put_profile(self, peer_id: str, round_: int, vector: Sequence[float], transfer_hash: str, now_ms: int) -> None:
        """Latest profile per (agent, round) wins; also refreshes ``last_seen``."""
        with self._db.transaction() as db:
            db.execute(
                "INSERT INTO profiles (peer_id, round, vector, transfer_hash, received_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(peer_id, round) DO UPDATE SET vector = excluded.vector, "
                "transfer_hash = excluded.transfer_hash, received_at = excluded.received_at",
                (peer_id, round_, json.dumps([float(v) for v in vector]), transfer_hash, now_ms),
            )
            db.execute("UPDATE agents SET last_seen = ? WHERE peer_id = ?", (now_ms, peer_id))

    def fresh_profiles(self, round_: int) -> list[tuple[str, list[float]]]:
        """Profiles of ``round_`` from currently admitted agents, ordered by peer ID."""
        rows = self._db.execute(
            "SELECT p.peer_id, p.vector FROM profiles p JOIN agents a ON a.peer_id = p.peer_id "
            "WHERE p.round = ? AND a.admitted = 1 AND a.revoked = 0 ORDER BY p.peer_id",
            (round_,),
        )
        return [(r["peer_id"], json.loads(r["vector"])) for r in rows]

    def count_fresh(self, round_: int) -> int:
        """``len(fresh_profiles(round_))`` in O(log n): read from ``round_tally``, which
        triggers keep equal to that join count (``cpm.schema``). The engine asks on every
        request; counting the join made ingesting a round of N agents cost O(N²)."""
        row = self._db.execute("SELECT fresh FROM round_tally WHERE round = ?", (round_,)).fetchone()
        return 0 if row is None else int(row[0])

    def first_profile_at(self, round_: int) -> int | None:
        row = self._db.execute("SELECT MIN(received_at) FROM profiles WHERE round = ?", (round_,)).fetchone()
        return None if row[0] is None else int(row[0])

    def list_profiles(self, round_: int | None = None) -> list[ProfileRecord]:
        sql = "SELECT peer_id, round, vector, transfer_hash, received_at FROM profiles"
        args: tuple[Any, ...] = ()
        if round_ is not None:
            sql += " WHERE round = ?"
            args = (round_,)
        rows = self._db.execute(sql + " ORDER BY round, peer_id", args)
        return [ProfileRecord(peer_id=r["peer_id"], round=r["round"], vector=json.loads(r["vector"]),
                              transfer_hash=r["transfer_hash"], received_at=r["received_at"]) for r in rows]

    # ---- rounds -----------------------------------------------------------------
    def open_round(self, round_: int, now_ms: int) -> None:
        with self._db.transaction() as db:
            db.execute("INSERT INTO rounds (round, state, opened_at) VALUES (?, 'open', ?)", (round_, now_ms))

    def set_round_matched(self, round_: int, now_ms: int) -> None:
        with self._db.transaction() as db:
            db.execute("UPDATE rounds SET state = 'matched', matched_at = ? WHERE round = ?", (now_ms, round_))

    def set_round_closed(self, round_: int, now_ms: int) -> None:
        with self._db.transaction() as db:
            db.execute("UPDATE rounds SET state = 'closed', closed_at = ? WHERE round = ?", (now_ms, round_))

    def latest_round(self) -> RoundRow | None:
        row = self._db.execute("SELECT * FROM rounds ORDER BY round DESC LIMIT 1").fetchone()
        return _round(row) if row is not None else None

    def get_round(self, round_: int) -> RoundRow | None:
        row = self._db.execute("SELECT * FROM rounds WHERE round = ?", (round_,)).fetchone()
        return _round(row) if row is not None else None

    def list_rounds(self) -> list[RoundRow]:
        return [_round(r) for r in self._db.execute("SELECT * FROM rounds ORDER BY round")]

    # ---- directives -------------------------------------------------------------
    def add_directive(self, d: DirectiveRow) -> None:
        with self._db.transaction() as db:
            db.execute(
                "INSERT INTO directives (directive_id, round, teacher, student, arm, params, score, context, "
                "state, issued_at, expires_at, envelope) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    d.directive_id,
                    d.round,
                    d.teacher,
                    d.student,
                    d.arm,
                    json.dumps(d.params, sort_keys=True),
                    float(d.score),
                    json.dumps([float(v) for v in d.context]),
                    d.state,
                    d.issued_at,
                    d.expires_at,
                    d.envelope,
                ),
            )

    def get_directive(self, directive_id: str) -> DirectiveRow | None:
        row = self._db.execute("SELECT * FROM directives WHERE directive_id = ?", (directive_id,)).fetchone()
        return _directive(row) if row is not None else None

    def directives_for_round(self, round_: int) -> list[DirectiveRow]:
        rows = self._db.execute("SELECT * FROM directives WHERE round = ? ORDER BY directive_id", (round_,))
        return [_directive(r) for r in rows]

    def list_directives(self, round_: int | None = None) -> list[DirectiveRow]:
        if round_ is not None:
            return self.directives_for_round(round_)
        return [_directive(r) for r in self._db.execute("SELECT * FROM directives ORDER BY round, directive_id")]

    def directive_for_peer(self, round_: int, peer_id: str) -> DirectiveRow | None:
        row = self._db.execute(
            "SELECT * FROM directives WHERE round = ? AND (teacher = ? OR student = ?) "
            "ORDER BY (student = ?) DESC, directive_id LIMIT 1",  # central-kd hub: any one of its
            (round_, peer_id, peer_id, peer_id),
        ).fetchone()
        return _directive(row) if row is not None else None

    def set_directive_state(self, directive_id: str, state: str) -> None:
        with self._db.transaction() as db:
            db.execute("UPDATE directives SET state = ? WHERE directive_id = ?", (state, directive_id))

    def has_issued(self, round_: int) -> bool:
        """Whether a directive of ``round_`` still awaits feedback or expiry — asked on
        every request while a round is matched: O(log n) on ``directives_issued`` (a
        count made each feedback cost O(pairs), a round O(pairs²))."""
        row = self._db.execute(
            "SELECT EXISTS (SELECT 1 FROM directives WHERE round = ? AND state = 'issued')", (round_,)
        ).fetchone()
        return bool(row[0])

    def expirable(self, round_: int, now_ms: int) -> list[DirectiveRow]:
        rows = self._db.execute(
            "SELECT * FROM directives WHERE round = ? AND state = 'issued' AND expires_at < ? ORDER BY directive_id",
            (round_, now_ms),
        )
        return [_directive(r) for r in rows]

    def next_expiry(self, round_: int) -> int | None:
        row = self._db.execute(
            "SELECT MIN(expires_at) FROM directives WHERE round = ? AND state = 'issued'", (round_,)
        ).fetchone()
        return None if row[0] is None else int(row[0])

    # ---- feedback ---------------------------------------------------------------
    def add_feedback(self, f: FeedbackRow) -> bool:
        """Insert unless this directive already has feedback; True if inserted."""
        with self._db.transaction() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO feedback (directive_id, round, loss_pre, loss_post, kb, ok, failure, "
                "raw_reward, reward, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    f.directive_id,
                    f.round,
                    f.loss_pre,
                    f.loss_post,
                    f.kb,
                    1 if f.ok else 0,
                    f.failure,
                    f.raw_reward,
                    f.reward,
                    f.received_at,
                ),
            )
            return cur.rowcount > 0

    def get_feedback(self, directive_id: str) -> FeedbackRow | None:
        row = self._db.execute("SELECT * FROM feedback WHERE directive_id = ?", (directive_id,)).fetchone()
        return _feedback(row) if row is not None else None

    def list_feedback(self, round_: int | None = None) -> list[FeedbackRow]:
        if round_ is not None:
            rows = self._db.execute("SELECT * FROM feedback WHERE round = ? ORDER BY directive_id", (round_,))
        else:
            rows = self._db.execute("SELECT * FROM feedback ORDER BY round, directive_id")
        return [_feedback(r) for r in rows]

    # ---- bandit state -----------------------------------------------------------
    def save_bandit_state(self, strategy: str, state: dict[str, Any], now_ms: int) -> None:
        with self._db.transaction() as db:
            db.execute(_SAVE_BANDIT_STATE, (strategy, json.dumps(state), now_ms))

    def save_bandit_state_at_commit(self, strategy: str, state: Callable[[], dict[str, Any]], now_ms: int) -> None:
        """``save_bandit_state(strategy, state(), now_ms)`` — inside a group-commit batch
        deferred to the batch's COMMIT (``BatchDb.defer_until_commit``), so the strategy
        state and the reputation (JSON that grows with the number of teachers) are
        serialised once per batch instead of once per feedback. Same guarantee: the state
        commits in the same transaction as every feedback row of the batch."""
        def write() -> None:
            self._db.execute(_SAVE_BANDIT_STATE, (strategy, json.dumps(state()), now_ms))

        if not self._db.defer_until_commit("bandit_state", write):
            self.save_bandit_state(strategy, state(), now_ms)

    def load_bandit_state(self) -> tuple[str, dict[str, Any]] | None:
        row = self._db.execute("SELECT strategy, state FROM bandit_state WHERE id = 1").fetchone()
        return None if row is None else (row["strategy"], json.loads(row["state"]))

    # ---- stats ------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        q = self._db.execute
        out = {
            "agents": int(q("SELECT COUNT(*) FROM agents").fetchone()[0]),
            "admitted": int(q("SELECT COUNT(*) FROM agents WHERE admitted = 1 AND revoked = 0").fetchone()[0]),
            "revoked": int(q("SELECT COUNT(*) FROM agents WHERE revoked = 1").fetchone()[0]),
            "profiles": int(q("SELECT COUNT(*) FROM profiles").fetchone()[0]),
            "rounds": int(q("SELECT COUNT(*) FROM rounds").fetchone()[0]),
            "feedback": int(q("SELECT COUNT(*) FROM feedback").fetchone()[0]),
            "directives": int(q("SELECT COUNT(*) FROM directives").fetchone()[0]),
        }
        for state in ("issued", "used", "expired", "failed"):
            row = q("SELECT COUNT(*) FROM directives WHERE state = ?", (state,)).fetchone()
            out[f"directives_{state}"] = int(row[0])
        return out


def _agent(r: sqlite3.Row) -> AgentRow:
    return AgentRow(
        peer_id=r["peer_id"],
        org=r["org"],
        admitted=bool(r["admitted"]),
        revoked=bool(r["revoked"]),
        admitted_at=r["admitted_at"],
        registered_at=r["registered_at"],
        last_seen=r["last_seen"],
        family=r["family"],
        listen_addrs=tuple(json.loads(r["listen_addrs"])),
        agent_version=r["agent_version"],
    )


def _round(r: sqlite3.Row) -> RoundRow:
    return RoundRow(r["round"], r["state"], r["opened_at"], r["matched_at"], r["closed_at"])


def _directive(r: sqlite3.Row) -> DirectiveRow:
    return DirectiveRow(
        directive_id=r["directive_id"],
        round=r["round"],
        teacher=r["teacher"],
        student=r["student"],
        arm=r["arm"],
        params=json.loads(r["params"]),
        score=float(r["score"]),
        context=json.loads(r["context"]),
        state=r["state"],
        issued_at=r["issued_at"],
        expires_at=r["expires_at"],
        envelope=bytes(r["envelope"]),
    )


def _feedback(r: sqlite3.Row) -> FeedbackRow:
    return FeedbackRow(
        directive_id=r["directive_id"],
        round=r["round"],
        loss_pre=float(r["loss_pre"]),
        loss_post=float(r["loss_post"]),
        kb=float(r["kb"]),
        ok=bool(r["ok"]),
        failure=r["failure"],
        raw_reward=r["raw_reward"],
        reward=r["reward"],
        received_at=r["received_at"],
    )
