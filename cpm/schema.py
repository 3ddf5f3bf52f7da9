"""The CPM database schema, and the per-round tally that keeps the engine's per-request
questions O(log n).

Why a tally: the engine asks "how many fresh profiles does the open round have?" on
every request (quorum). As a ``COUNT(*)`` over a join of profiles and agents that walks
every profile of the round, so ingesting a round of N agents cost O(N²): with the
other per-request counts, 15 ms of CPU per profile at 10 000 agents
(``python -m benchmarks.ingest --registered 10000``; docs/performance.md).
``round_tally.fresh`` holds that count, kept exact by triggers inside the same
transactions as the writes that change it — whichever process writes (the node, or the
admin CLI revoking an agent from another process), and rolled back with them. The
triggers mirror ``Store.fresh_profiles``' definition: a profile of an admitted,
unrevoked agent. The quorum's denominator, agents active since t, had the same
problem (a range count over every active agent): ``activity_tally`` counts admitted,
registered agents per second of ``last_seen``, so it is a sum over the active window's
seconds plus an exact index count inside the one second that straddles t.
``tests/unit/test_store_tally.py`` checks both against the plain queries after random
operation sequences.

Versions: ``MIGRATIONS`` is the ordered list of schema steps, ``schema_version`` holds
the number of the last one applied, and ``migrate`` runs the missing ones inside the
opening ``BEGIN IMMEDIATE`` transaction (SQLite's write lock: one migrator at a time, all
or nothing). A database newer than this build is refused, never guessed at. Step 1, the
baseline, is idempotent (``IF NOT EXISTS``) and re-applied on every open: the tallies and
indexes were added to it in place before versions were counted, and a database written
then gains them (with a backfill) that way. Every later step runs exactly once. The
PostgreSQL backend keeps the same scheme (``cpm.schema_postgres``); why not Alembic is in
docs/cpm.md, "Schema versions and migrations".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

TABLES = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS agents (
    peer_id TEXT PRIMARY KEY,
    org TEXT NOT NULL DEFAULT '',
    admitted INTEGER NOT NULL DEFAULT 0,
    revoked INTEGER NOT NULL DEFAULT 0,
    admitted_at INTEGER,
    registered_at INTEGER,
    last_seen INTEGER,
    family TEXT NOT NULL DEFAULT '',
    listen_addrs TEXT NOT NULL DEFAULT '[]',
    agent_version TEXT NOT NULL DEFAULT ''
);
-- the quorum denominator counts these (Store.count_active): a range over last_seen
CREATE INDEX IF NOT EXISTS agents_active ON agents (last_seen)
    WHERE admitted = 1 AND revoked = 0 AND registered_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS profiles (
    peer_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    vector TEXT NOT NULL,
    transfer_hash TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (peer_id, round)
);
-- (round, received_at): serves per-round lookups and MIN(received_at) of a round in
-- O(log n), replacing the old single-column profiles_round
CREATE INDEX IF NOT EXISTS profiles_round_received ON profiles (round, received_at);
DROP INDEX IF EXISTS profiles_round;
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('open', 'matched', 'closed')),
    opened_at INTEGER NOT NULL,
    matched_at INTEGER,
    closed_at INTEGER
);
CREATE TABLE IF NOT EXISTS directives (
    directive_id TEXT PRIMARY KEY,
    round INTEGER NOT NULL,
    teacher TEXT NOT NULL,
    student TEXT NOT NULL,
    arm INTEGER NOT NULL,
    params TEXT NOT NULL,
    score REAL NOT NULL DEFAULT 0,
    context TEXT NOT NULL DEFAULT '[]',
    state TEXT NOT NULL CHECK (state IN ('issued', 'used', 'expired', 'failed')),
    issued_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    envelope BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS directives_round ON directives (round);
-- a matched round's open directives: is any left, which expire next (Store.has_issued, expirable)
CREATE INDEX IF NOT EXISTS directives_issued ON directives (round, expires_at) WHERE state = 'issued';
CREATE TABLE IF NOT EXISTS feedback (
    directive_id TEXT NOT NULL UNIQUE,
    round INTEGER NOT NULL,
    loss_pre REAL NOT NULL,
    loss_post REAL NOT NULL,
    kb REAL NOT NULL,
    ok INTEGER NOT NULL,
    failure TEXT NOT NULL DEFAULT '',
    raw_reward REAL,
    reward REAL,
    received_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS bandit_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    strategy TEXT NOT NULL,
    state TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
"""

_ELIGIBLE_NEW = "EXISTS (SELECT 1 FROM agents WHERE peer_id = NEW.peer_id AND admitted = 1 AND revoked = 0)"
_ELIGIBLE_OLD = "EXISTS (SELECT 1 FROM agents WHERE peer_id = OLD.peer_id AND admitted = 1 AND revoked = 0)"

TALLY_TABLE = """CREATE TABLE IF NOT EXISTS round_tally (
    round INTEGER PRIMARY KEY,
    fresh INTEGER NOT NULL DEFAULT 0
)"""

# Trigger bodies contain ';' — hence a tuple of statements, not one script.
TALLY_TRIGGERS = (
    f"""CREATE TRIGGER IF NOT EXISTS tally_profile_insert AFTER INSERT ON profiles WHEN {_ELIGIBLE_NEW}
BEGIN
    INSERT INTO round_tally (round, fresh) VALUES (NEW.round, 1)
        ON CONFLICT(round) DO UPDATE SET fresh = fresh + 1;
END""",
    f"""CREATE TRIGGER IF NOT EXISTS tally_profile_delete AFTER DELETE ON profiles WHEN {_ELIGIBLE_OLD}
BEGIN
    UPDATE round_tally SET fresh = fresh - 1 WHERE round = OLD.round;
END""",
    # the CPM never moves a profile (its upsert sets vector/hash/time only); exact anyway
    f"""CREATE TRIGGER IF NOT EXISTS tally_profile_move AFTER UPDATE OF peer_id, round ON profiles
BEGIN
    UPDATE round_tally SET fresh = fresh - 1 WHERE round = OLD.round AND {_ELIGIBLE_OLD};
    INSERT INTO round_tally (round, fresh) SELECT NEW.round, 1 WHERE {_ELIGIBLE_NEW}
        ON CONFLICT(round) DO UPDATE SET fresh = fresh + 1;
END""",
    # admit / revoke / re-admit: every round the agent has a profile in moves by ±1
    """CREATE TRIGGER IF NOT EXISTS tally_agent_update AFTER UPDATE OF admitted, revoked ON agents
WHEN (OLD.admitted = 1 AND OLD.revoked = 0) != (NEW.admitted = 1 AND NEW.revoked = 0)
BEGIN
    INSERT INTO round_tally (round, fresh)
        SELECT round, CASE WHEN NEW.admitted = 1 AND NEW.revoked = 0 THEN 1 ELSE -1 END
        FROM profiles WHERE peer_id = NEW.peer_id
        ON CONFLICT(round) DO UPDATE SET fresh = fresh + excluded.fresh;
END""",
    """CREATE TRIGGER IF NOT EXISTS tally_agent_insert AFTER INSERT ON agents WHEN NEW.admitted = 1 AND NEW.revoked = 0
BEGIN
    INSERT INTO round_tally (round, fresh) SELECT round, 1 FROM profiles WHERE peer_id = NEW.peer_id
        ON CONFLICT(round) DO UPDATE SET fresh = fresh + 1;
END""",
    """CREATE TRIGGER IF NOT EXISTS tally_agent_delete AFTER DELETE ON agents WHEN OLD.admitted = 1 AND OLD.revoked = 0
BEGIN
    UPDATE round_tally SET fresh = fresh - 1 WHERE round IN (SELECT round FROM profiles WHERE peer_id = OLD.peer_id);
END""",
)

ACTIVITY_BUCKET_MS = 1000
# an agent counted by Store.count_active (given a recent enough last_seen)
_ACTIVE = "{0}.admitted = 1 AND {0}.revoked = 0 AND {0}.registered_at IS NOT NULL AND {0}.last_seen IS NOT NULL"
_BUCKET = f"CAST({{0}}.last_seen / {ACTIVITY_BUCKET_MS} AS INTEGER)"
_A_OLD, _A_NEW = _ACTIVE.format("OLD"), _ACTIVE.format("NEW")
_B_OLD, _B_NEW = _BUCKET.format("OLD"), _BUCKET.format("NEW")

ACTIVITY_TABLE = """CREATE TABLE IF NOT EXISTS activity_tally (
    bucket INTEGER PRIMARY KEY,
    agents INTEGER NOT NULL
)"""

_ACTIVITY_LEAVE = f"""UPDATE activity_tally SET agents = agents - 1 WHERE {_A_OLD} AND bucket = {_B_OLD};
    DELETE FROM activity_tally WHERE {_A_OLD} AND bucket = {_B_OLD} AND agents <= 0;"""
_ACTIVITY_ENTER = f"""INSERT INTO activity_tally (bucket, agents) SELECT {_B_NEW}, 1 WHERE {_A_NEW}
        ON CONFLICT(bucket) DO UPDATE SET agents = agents + 1;"""

ACTIVITY_TRIGGERS = (
    # every request touches last_seen: skip when the agent stays in its second
    f"""CREATE TRIGGER IF NOT EXISTS activity_agent_update
AFTER UPDATE OF last_seen, admitted, revoked, registered_at ON agents
WHEN ({_A_OLD} OR {_A_NEW}) AND NOT ({_A_OLD} AND {_A_NEW} AND {_B_OLD} = {_B_NEW})
BEGIN
    {_ACTIVITY_LEAVE}
    {_ACTIVITY_ENTER}
END""",
    f"""CREATE TRIGGER IF NOT EXISTS activity_agent_insert AFTER INSERT ON agents WHEN {_A_NEW}
BEGIN
    {_ACTIVITY_ENTER}
END""",
    f"""CREATE TRIGGER IF NOT EXISTS activity_agent_delete AFTER DELETE ON agents WHEN {_A_OLD}
BEGIN
    {_ACTIVITY_LEAVE}
END""",
)

# Fill a tally of a database written before it existed (run once, when its table is created).
ACTIVITY_BACKFILL = f"""INSERT INTO activity_tally (bucket, agents)
    SELECT CAST(last_seen / {ACTIVITY_BUCKET_MS} AS INTEGER), COUNT(*) FROM agents
    WHERE admitted = 1 AND revoked = 0 AND registered_at IS NOT NULL AND last_seen IS NOT NULL
    GROUP BY 1"""

TALLY_BACKFILL = """INSERT INTO round_tally (round, fresh)
    SELECT p.round, COUNT(*) FROM profiles p JOIN agents a ON a.peer_id = p.peer_id
    WHERE a.admitted = 1 AND a.revoked = 0 GROUP BY p.round"""


class SchemaError(Exception):
    """The file holds a schema version this build cannot use."""


def _baseline(db: Any) -> None:
    """Version 1: the tables, and the tallies with their triggers (filled once for a
    database written before they existed). Idempotent."""
    for stmt in TABLES.split(";"):
        if stmt.strip():
            db.execute(stmt)
    for table, create, triggers, backfill in (
        ("round_tally", TALLY_TABLE, TALLY_TRIGGERS, TALLY_BACKFILL),
        ("activity_tally", ACTIVITY_TABLE, ACTIVITY_TRIGGERS, ACTIVITY_BACKFILL),
    ):
        existed = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
        db.execute(create)
        for trigger in triggers:
            db.execute(trigger)
        if existed is None:  # a database written before the tally existed
            db.execute(backfill)


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema step: ``apply(db)`` runs in the opening transaction; ``always``: re-run
    on every open (only the idempotent baseline)."""

    version: int
    what: str
    apply: Callable[[Any], None]
    always: bool = False


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "baseline: tables, indexes, round and activity tallies", _baseline, always=True),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


def migrate(db: Any, migrations: Sequence[Migration] = MIGRATIONS) -> int:
    """Create or upgrade the schema; call inside one write transaction (all or nothing).
    Returns the version the database is at."""
    db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = db.execute("SELECT max(version) FROM schema_version").fetchone()
    current = 0 if row is None or row[0] is None else int(row[0])
    latest = migrations[-1].version
    if current > latest:
        raise SchemaError(f"schema version {current} is not supported (this build: {latest})")
    for m in migrations:
        if m.version > current or m.always:
            m.apply(db)
    if current < latest:
        db.execute("DELETE FROM schema_version")
        db.execute("INSERT INTO schema_version (version) VALUES (?)", (latest,))
    return latest
