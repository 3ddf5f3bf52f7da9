"""The PostgreSQL backend's schema (``cpm.store_postgres``): tables, the trigger-kept
tallies, its ordered migrations and the integrity checks the doctor runs.

Why the same tallies as SQLite (``cpm.schema``), kept by PL/pgSQL triggers: the engine
asks ``count_fresh`` and ``count_active`` twice per profile. Computed in SQL they walk
every profile of the round and every active agent — measured on this backend with
10 000 registered agents (``python -m benchmarks.pg_tally``; docs/performance.md,
"PostgreSQL backend"): 15.5 ms per ``count_fresh`` as a join count against 0.1 ms from
the tally row, 2.1 against 0.3 ms for ``count_active``, so ingesting a round would again
be O(N²) (~35 ms per profile at 10 000 agents); the triggers add 0.36 ms to a profile
write in a batch (1.23 against 0.87 ms). The triggers run inside the
writing transaction — the node's or the admin CLI's — and roll back with it. They are
exact because writers are serialised (``cpm.pgdb``: every write transaction first takes
``WRITE_LOCK``, an advisory lock, as SQLite's ``BEGIN IMMEDIATE`` takes its file lock),
so a trigger always sees every earlier writer's rows; under plain READ COMMITTED with
concurrent writers an admission change racing a profile insert could miss or count a
row twice.

Types: times are BIGINT epoch ms, vectors ``double precision[]`` (exact float round
trip, no JSON parse), ``listen_addrs`` ``text[]``, flags BOOLEAN; identifiers are
``COLLATE "C"`` so every ``ORDER BY peer_id`` is the byte order SQLite and Python use
(the contract orders by peer ID). JSON documents (directive params, the strategy state)
stay TEXT: they are written and read whole, never queried.

Migrations: ``MIGRATIONS`` is the ordered list; ``schema_version`` holds the number of
the last one applied. ``migrate`` runs the missing ones in the opening transaction,
which holds ``WRITE_LOCK``: two processes opening a fresh database at once apply each
migration once (docs/cpm.md, "Schema versions and migrations").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

ACTIVITY_BUCKET_MS = 1000  # as cpm.schema: count_active's arithmetic is shared
# pg_advisory_xact_lock(WRITE_LOCK, <schema oid>) is held by every write transaction (and
# so by migrations): one writer per store, stores in other schemas of the same database
# undisturbed. b"knxa" as an int4 — any constant no other application uses would do.
WRITE_LOCK = 0x6B6E7861

_ID = 'TEXT COLLATE "C"'

BASELINE = (
    f"""CREATE TABLE agents (
    peer_id {_ID} PRIMARY KEY,
    org TEXT NOT NULL DEFAULT '',
    admitted BOOLEAN NOT NULL DEFAULT FALSE,
    revoked BOOLEAN NOT NULL DEFAULT FALSE,
    admitted_at BIGINT,
    registered_at BIGINT,
    last_seen BIGINT,
    family TEXT NOT NULL DEFAULT '',
    listen_addrs TEXT[] NOT NULL DEFAULT '{{}}',
    agent_version TEXT NOT NULL DEFAULT ''
)""",
    # the quorum denominator counts these (Store.count_active): a range over last_seen
    """CREATE INDEX agents_active ON agents (last_seen)
    WHERE admitted AND NOT revoked AND registered_at IS NOT NULL""",
    f"""CREATE TABLE profiles (
    peer_id {_ID} NOT NULL,
    round BIGINT NOT NULL,
    vector DOUBLE PRECISION[] NOT NULL,
    transfer_hash TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    PRIMARY KEY (peer_id, round)
)""",
    "CREATE INDEX profiles_round_received ON profiles (round, received_at)",
    """CREATE TABLE rounds (
    round BIGINT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('open', 'matched', 'closed')),
    opened_at BIGINT NOT NULL,
    matched_at BIGINT,
    closed_at BIGINT
)""",
    f"""CREATE TABLE directives (
    directive_id {_ID} PRIMARY KEY,
    round BIGINT NOT NULL,
    teacher {_ID} NOT NULL,
    student {_ID} NOT NULL,
    arm INTEGER NOT NULL,
    params TEXT NOT NULL,
    score DOUBLE PRECISION NOT NULL DEFAULT 0,
    context DOUBLE PRECISION[] NOT NULL DEFAULT '{{}}',
    state TEXT NOT NULL CHECK (state IN ('issued', 'used', 'expired', 'failed')),
    issued_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    envelope BYTEA NOT NULL
)""",
    "CREATE INDEX directives_round ON directives (round, directive_id)",
    # a matched round's open directives: is any left, which expire next
    "CREATE INDEX directives_issued ON directives (round, expires_at) WHERE state = 'issued'",
    f"""CREATE TABLE feedback (
    directive_id {_ID} PRIMARY KEY,
    round BIGINT NOT NULL,
    loss_pre DOUBLE PRECISION NOT NULL,
    loss_post DOUBLE PRECISION NOT NULL,
    kb DOUBLE PRECISION NOT NULL,
    ok BOOLEAN NOT NULL,
    failure TEXT NOT NULL DEFAULT '',
    raw_reward DOUBLE PRECISION,
    reward DOUBLE PRECISION,
    received_at BIGINT NOT NULL
)""",
    "CREATE INDEX feedback_round ON feedback (round, directive_id)",
    """CREATE TABLE bandit_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    strategy TEXT NOT NULL,
    state TEXT NOT NULL,
    updated_at BIGINT NOT NULL
)""",
    # round_tally.fresh = the profiles of the round whose agent is admitted and not
    # revoked (Store.fresh_profiles' definition)
    "CREATE TABLE round_tally (round BIGINT PRIMARY KEY, fresh BIGINT NOT NULL DEFAULT 0)",
    """CREATE FUNCTION knexa_tally_profile() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' AND EXISTS (SELECT 1 FROM agents WHERE peer_id = OLD.peer_id AND admitted AND NOT revoked)
    THEN
        UPDATE round_tally SET fresh = fresh - 1 WHERE round = OLD.round;
    END IF;
    IF TG_OP <> 'DELETE' AND EXISTS (SELECT 1 FROM agents WHERE peer_id = NEW.peer_id AND admitted AND NOT revoked)
    THEN
        INSERT INTO round_tally (round, fresh) VALUES (NEW.round, 1)
            ON CONFLICT (round) DO UPDATE SET fresh = round_tally.fresh + 1;
    END IF;
    RETURN NULL;
END $$""",
    """CREATE TRIGGER tally_profile_insert AFTER INSERT ON profiles
    FOR EACH ROW EXECUTE FUNCTION knexa_tally_profile()""",
    """CREATE TRIGGER tally_profile_delete AFTER DELETE ON profiles
    FOR EACH ROW EXECUTE FUNCTION knexa_tally_profile()""",
    # the CPM never moves a profile (its upsert sets vector/hash/time only); exact anyway
    """CREATE TRIGGER tally_profile_move AFTER UPDATE OF peer_id, round ON profiles FOR EACH ROW
    WHEN (OLD.peer_id IS DISTINCT FROM NEW.peer_id OR OLD.round IS DISTINCT FROM NEW.round)
    EXECUTE FUNCTION knexa_tally_profile()""",
    # admit / revoke / re-admit / insert / delete: every round the agent has a profile in moves by ±1
    """CREATE FUNCTION knexa_tally_agent() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    was BOOLEAN := TG_OP <> 'INSERT' AND OLD.admitted AND NOT OLD.revoked;
    now_ BOOLEAN := TG_OP <> 'DELETE' AND NEW.admitted AND NOT NEW.revoked;
    peer TEXT := CASE WHEN TG_OP = 'DELETE' THEN OLD.peer_id ELSE NEW.peer_id END;
BEGIN
    IF was IS DISTINCT FROM now_ THEN
        INSERT INTO round_tally (round, fresh)
            SELECT round, CASE WHEN now_ THEN 1 ELSE -1 END FROM profiles WHERE peer_id = peer
            ON CONFLICT (round) DO UPDATE SET fresh = round_tally.fresh + excluded.fresh;
    END IF;
    RETURN NULL;
END $$""",
    """CREATE TRIGGER tally_agent_update AFTER UPDATE OF admitted, revoked ON agents FOR EACH ROW
    WHEN ((OLD.admitted AND NOT OLD.revoked) IS DISTINCT FROM (NEW.admitted AND NOT NEW.revoked))
    EXECUTE FUNCTION knexa_tally_agent()""",
    """CREATE TRIGGER tally_agent_insert AFTER INSERT ON agents FOR EACH ROW
    WHEN (NEW.admitted AND NOT NEW.revoked) EXECUTE FUNCTION knexa_tally_agent()""",
    """CREATE TRIGGER tally_agent_delete AFTER DELETE ON agents FOR EACH ROW
    WHEN (OLD.admitted AND NOT OLD.revoked) EXECUTE FUNCTION knexa_tally_agent()""",
    # activity_tally.agents = admitted, unrevoked, registered agents per second of last_seen
    "CREATE TABLE activity_tally (bucket BIGINT PRIMARY KEY, agents BIGINT NOT NULL)",
    f"""CREATE FUNCTION knexa_activity_agent() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    was BOOLEAN := TG_OP <> 'INSERT' AND {{active_old}};
    now_ BOOLEAN := TG_OP <> 'DELETE' AND {{active_new}};
BEGIN
    IF was THEN
        UPDATE activity_tally SET agents = agents - 1 WHERE bucket = OLD.last_seen / {ACTIVITY_BUCKET_MS};
        DELETE FROM activity_tally WHERE bucket = OLD.last_seen / {ACTIVITY_BUCKET_MS} AND agents <= 0;
    END IF;
    IF now_ THEN
        INSERT INTO activity_tally (bucket, agents) VALUES (NEW.last_seen / {ACTIVITY_BUCKET_MS}, 1)
            ON CONFLICT (bucket) DO UPDATE SET agents = activity_tally.agents + 1;
    END IF;
    RETURN NULL;
END $$""",
    # every request touches last_seen: no call at all while the agent stays in its second
    f"""CREATE TRIGGER activity_agent_update AFTER UPDATE OF last_seen, admitted, revoked, registered_at
    ON agents FOR EACH ROW
    WHEN (({{active_old}} OR {{active_new}}) AND NOT ({{active_old}} AND {{active_new}}
          AND OLD.last_seen / {ACTIVITY_BUCKET_MS} = NEW.last_seen / {ACTIVITY_BUCKET_MS}))
    EXECUTE FUNCTION knexa_activity_agent()""",
    """CREATE TRIGGER activity_agent_insert AFTER INSERT ON agents FOR EACH ROW
    WHEN ({active_new}) EXECUTE FUNCTION knexa_activity_agent()""",
    """CREATE TRIGGER activity_agent_delete AFTER DELETE ON agents FOR EACH ROW
    WHEN ({active_old}) EXECUTE FUNCTION knexa_activity_agent()""",
)

_ACTIVE = "({0}.admitted AND NOT {0}.revoked AND {0}.registered_at IS NOT NULL AND {0}.last_seen IS NOT NULL)"
BASELINE = tuple(s.replace("{active_old}", _ACTIVE.format("OLD")).replace("{active_new}", _ACTIVE.format("NEW"))
                 for s in BASELINE)


@dataclass(frozen=True, slots=True)
class Migration:
    """One step of the schema: applied once, in order, in the opening transaction."""

    version: int
    what: str
    statements: Sequence[str]


# Replicas (cpm.lease, docs/operations.md "High availability"): the round lease — one row
# per lease name; ``epoch`` grows by one at every change of holder and fences a former
# holder's writes — and a generation of the strategy state, so a replica notices that
# another one saved it since it last read or wrote it (and reloads before it builds on it).
REPLICAS = (
    f"""CREATE TABLE lease (
    name {_ID} PRIMARY KEY,
    holder TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    acquired_at TIMESTAMPTZ NOT NULL
)""",
    "ALTER TABLE bandit_state ADD COLUMN gen BIGINT NOT NULL DEFAULT 0",
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "baseline: tables, indexes, round and activity tallies", BASELINE),
    Migration(2, "replicas: the round lease and the strategy state's generation", REPLICAS),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


class SchemaError(Exception):
    """The database holds a schema version this build cannot use."""


def migrate(execute: Callable[..., Any], migrations: Sequence[Migration] = MIGRATIONS) -> int:
    """Apply the migrations the database lacks; call inside one write transaction that
    holds ``WRITE_LOCK`` (all or nothing, one migrator at a time). Returns the version."""
    execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = execute("SELECT max(version) FROM schema_version").fetchone()
    current = 0 if row is None or row[0] is None else int(row[0])
    latest = migrations[-1].version
    if current > latest:
        raise SchemaError(f"schema version {current} is not supported (this build: {latest})")
    for m in migrations:
        if m.version > current:
            for stmt in m.statements:
                execute(stmt)
    if current < latest:
        execute("DELETE FROM schema_version")
        execute("INSERT INTO schema_version (version) VALUES (%s)", (latest,))
    return latest


# ---- integrity (the doctor; reads only) -------------------------------------------------

TABLES = ("schema_version", "agents", "profiles", "rounds", "directives", "feedback", "bandit_state", "round_tally",
          "activity_tally", "lease")
TRIGGERS = ("tally_profile_insert", "tally_profile_delete", "tally_profile_move", "tally_agent_update",
            "tally_agent_insert", "tally_agent_delete", "activity_agent_update", "activity_agent_insert",
            "activity_agent_delete")

# rounds whose tally differs from the count it stands for (the first, if any)
TALLY_DRIFT = """SELECT round, COALESCE(t.fresh, 0), COALESCE(c.n, 0)
FROM round_tally t FULL JOIN (
    SELECT p.round, count(*) AS n FROM profiles p JOIN agents a ON a.peer_id = p.peer_id
    WHERE a.admitted AND NOT a.revoked GROUP BY p.round) c USING (round)
WHERE COALESCE(t.fresh, 0) <> COALESCE(c.n, 0) ORDER BY round LIMIT 1"""
ACTIVITY_DRIFT = f"""SELECT bucket, COALESCE(t.agents, 0), COALESCE(c.n, 0)
FROM activity_tally t FULL JOIN (
    SELECT last_seen / {ACTIVITY_BUCKET_MS} AS bucket, count(*) AS n FROM agents
    WHERE admitted AND NOT revoked AND registered_at IS NOT NULL AND last_seen IS NOT NULL GROUP BY 1) c
    USING (bucket)
WHERE COALESCE(t.agents, 0) <> COALESCE(c.n, 0) ORDER BY bucket LIMIT 1"""


def integrity(execute: Callable[..., Any]) -> str:
    """"ok", or the first complaint: a table or trigger missing, a tally that drifted
    from what it counts (O(profiles): for the doctor, never on a request path)."""
    tables = {r[0] for r in execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")}
    for table in TABLES:
        if table not in tables:
            return f"table {table} is missing"
    triggers = {r[0] for r in execute(
        "SELECT tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
        "WHERE c.relnamespace = current_schema()::regnamespace AND NOT t.tgisinternal AND t.tgenabled <> 'D'")}
    for trigger in TRIGGERS:
        if trigger not in triggers:
            return f"trigger {trigger} is missing or disabled"
    for name, sql in (("round_tally", TALLY_DRIFT), ("activity_tally", ACTIVITY_DRIFT)):
        row = execute(sql).fetchone()
        if row is not None:
            return f"{name} says {row[1]} for {row[0]}, the rows say {row[2]}"
    return "ok"
