"""cpm.schema tallies: ``count_fresh`` and ``count_active`` read trigger-kept counters
instead of counting rows. They must equal the plain queries they replace after any mix
of writes — by this connection, by a second one (the admin CLI is another process), and
writes rolled back — and a database written before the tallies existed must be filled.
The same random sequences run on every backend (PostgreSQL keeps its tallies with
PL/pgSQL triggers, cpm/schema_postgres.py), checked against the definitions through the
``Store`` API itself."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest

from cpm.schema import ACTIVITY_BUCKET_MS, TABLES
from cpm.store import Store, open_store
from cpm.store_sqlite import SqliteStore
from tests.unit.test_store_contract import location  # noqa: F401 — the backend-parametrized fixture

FRESH_SQL = ("SELECT COUNT(*) FROM profiles p JOIN agents a ON a.peer_id = p.peer_id "
             "WHERE p.round = ? AND a.admitted = 1 AND a.revoked = 0")
ACTIVE_SQL = ("SELECT COUNT(*) FROM agents WHERE admitted = 1 AND revoked = 0 AND registered_at IS NOT NULL "
              "AND last_seen >= ?")
ROUNDS = (1, 2, 3)


class Rollback(Exception):
    pass


def plain_counts(path: Path, sinces: list[int]) -> tuple[list[int], list[int]]:
    con = sqlite3.connect(path)
    try:
        fresh = [con.execute(FRESH_SQL, (r,)).fetchone()[0] for r in ROUNDS]
        active = [con.execute(ACTIVE_SQL, (s,)).fetchone()[0] for s in sinces]
        return fresh, active
    finally:
        con.close()


def random_op(rng: random.Random, store: Store, peers: list[str], now: int) -> None:
    peer = rng.choice(peers)
    op = rng.choice(("admit", "revoke", "register", "touch", "profile", "profile"))
    if op == "admit":
        store.admit(peer, "org", now)
    elif op == "revoke":
        store.revoke(peer, now)
    elif op == "register":
        store.register(peer, org="org", family="qwen2", listen_addrs=[], agent_version="t", now_ms=now,
                       admit=rng.random() < 0.5)
    elif op == "touch":
        store.touch(peer, now)
    else:
        store.put_profile(peer, rng.choice(ROUNDS), [0.5] * 32, "h", now)


@pytest.mark.parametrize("seed", range(4))
def test_tallies_equal_the_plain_counts_after_random_writes(tmp_path, seed):
    rng = random.Random(seed)
    path = tmp_path / "cpm.db"
    node, cli = SqliteStore(path), SqliteStore(path)  # cli: a second connection, like the admin CLI process
    peers = [f"peer{i:03d}" for i in range(24)]
    now = 1_700_000_000_000
    try:
        for step in range(400):
            now += rng.choice((0, 1, 7, 250, 999, 1000, 1001, 4000))
            who = cli if rng.random() < 0.2 else node
            if rng.random() < 0.15:  # a message whose transaction fails: its writes (and tallies) roll back
                with pytest.raises(Rollback), node.transaction():
                    random_op(rng, node, peers, now)
                    raise Rollback
            elif rng.random() < 0.2:  # group commit: savepoints in one batch, committed later
                with node.grouped(), node.transaction():
                    random_op(rng, node, peers, now)
                if rng.random() < 0.5:
                    node.commit_batch()
            else:
                if who is cli:
                    node.commit_batch()  # the CLI could not write while the node holds a batch
                random_op(rng, who, peers, now)
            if step % 10 == 0 or step == 399:
                node.commit_batch()
                base = now - rng.randrange(0, 20_000)
                # the edges of a bucket are where an off-by-one would hide
                sinces = [base, base - base % ACTIVITY_BUCKET_MS, base - base % ACTIVITY_BUCKET_MS - 1,
                          base - base % ACTIVITY_BUCKET_MS + ACTIVITY_BUCKET_MS, 0, now + 1]
                fresh, active = plain_counts(path, sinces)
                for store in (node, cli):
                    assert [store.count_fresh(r) for r in ROUNDS] == fresh, (seed, step)
                    assert [store.count_active(s) for s in sinces] == active, (seed, step, sinces)
        assert sum(fresh) > 0 and max(active) > 0  # the sequence exercised non-empty tallies
    finally:
        node.close()
        cli.close()


def defined_counts(store: Store, sinces: list[int]) -> tuple[list[int], list[int]]:
    """What the tallies stand for, from the rows (``fresh_profiles``, ``list_agents``)."""
    agents = [a for a in store.list_agents() if a.admitted and not a.revoked and a.registered_at is not None
              and a.last_seen is not None]
    return ([len(store.fresh_profiles(r)) for r in ROUNDS],
            [sum(1 for a in agents if a.last_seen >= s) for s in sinces])


@pytest.mark.parametrize("seed", range(2))
def test_tallies_equal_their_definitions_on_every_backend(location: str, seed: int) -> None:  # noqa: F811
    rng = random.Random(100 + seed)
    node, cli = open_store(location), open_store(location)  # cli: the admin CLI's own connection
    peers = [f"peer{i:03d}" for i in range(16)]
    now = 1_700_000_000_000
    try:
        for step in range(200):
            now += rng.choice((0, 1, 7, 250, 999, 1000, 1001, 4000))
            if rng.random() < 0.15:  # a message whose transaction fails: its tally changes roll back too
                with pytest.raises(Rollback), node.transaction():
                    random_op(rng, node, peers, now)
                    raise Rollback
            elif rng.random() < 0.25:  # group commit: savepoints in one batch, committed later
                with node.grouped(), node.transaction():
                    random_op(rng, node, peers, now)
                if rng.random() < 0.5:
                    node.commit_batch()
            else:
                who = cli if rng.random() < 0.25 else node
                if who is cli:
                    node.commit_batch()  # one writer at a time: the CLI waits for the node's batch
                random_op(rng, who, peers, now)
            if step % 20 == 0 or step == 199:
                node.commit_batch()
                base = now - rng.randrange(0, 20_000)
                edge = base - base % ACTIVITY_BUCKET_MS
                sinces = [base, edge, edge - 1, edge + ACTIVITY_BUCKET_MS, 0, now + 1]
                fresh, active = defined_counts(cli, sinces)
                for store in (node, cli):
                    assert [store.count_fresh(r) for r in ROUNDS] == fresh, (seed, step)
                    assert [store.count_active(s) for s in sinces] == active, (seed, step, sinces)
        assert sum(fresh) > 0 and max(active) > 0
    finally:
        node.close()
        cli.close()


def test_a_database_from_before_the_tallies_is_filled_on_open(tmp_path):
    path = tmp_path / "old.db"
    con = sqlite3.connect(path, isolation_level=None)
    for stmt in TABLES.split(";"):  # the tables only: no tally tables, no triggers
        if stmt.strip():
            con.execute(stmt)
    con.execute("INSERT INTO schema_version (version) VALUES (1)")
    rows = [("a", 1, 0, 5, 1_000), ("b", 1, 0, 5, 2_500), ("c", 1, 1, 5, 2_600), ("d", 0, 0, None, None)]
    con.executemany("INSERT INTO agents (peer_id, admitted, revoked, registered_at, last_seen) VALUES (?, ?, ?, ?, ?)",
                    rows)
    for peer, round_ in (("a", 1), ("b", 1), ("c", 1), ("a", 2), ("d", 2)):
        con.execute("INSERT INTO profiles (peer_id, round, vector, transfer_hash, received_at) VALUES (?, ?, '[]', 'h', 1)",
                    (peer, round_))
    con.close()
    store = SqliteStore(path)
    try:
        assert [store.count_fresh(r) for r in (1, 2, 3)] == [2, 1, 0]
        assert [store.count_active(s) for s in (0, 1_001, 2_500, 2_501)] == [2, 1, 1, 0]
        store.revoke("b", 3_000)  # and the triggers keep them from then on
        assert store.count_fresh(1) == 1 and store.count_active(0) == 1
    finally:
        store.close()
