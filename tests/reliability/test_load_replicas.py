"""The load run (benchmarks/load.py) against two CPM replicas on one PostgreSQL store
(issue #18), at small scale: 40 agents with their own identities and connections, 5
rounds, two real ``knexa-cpm serve --lease`` processes sharing one database (tests/pg.py's
throwaway server; skipped, loudly, where no PostgreSQL server binary exists) and one
identity key. Agent i lists replica i mod 2 first, so both replicas ingest.

What an operator relies on with replicas under load: nothing acknowledged is lost,
nothing is counted twice (a feedback rewarded once, no agent in two directives of a
round, a profile stored once), every round is matched exactly once — by the lease
holder — and closed. The full 500 × 50 run is ``python -m benchmarks.load --agents 500
--rounds 50 --replicas 2 --store postgresql --json`` (docs/reliability.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.load import replicas_ok, run
from tests.pg import PgTestServer
from tests.reliability.summary import record

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(1200)]

AGENTS, ROUNDS = 40, 5


def test_load_two_replicas_on_postgresql_lose_and_duplicate_nothing(tmp_path: Path,
                                                                    pg_server: PgTestServer) -> None:
    rep = run(AGENTS, ROUNDS, 2, "linucb", tmp_path, timeout_s=1100, replicas=2, store="postgresql",
              url=pg_server.new_database("load"))
    db, replicas, by_replica = rep["database"], rep["replicas"], rep["acked_by_replica"]
    record("load", f"{AGENTS} agents x {ROUNDS} rounds, 2 CPM replicas on PostgreSQL",
           passed=rep["feedback_lost"] == 0 and replicas_ok(rep), lost=rep["feedback_lost"],
           detail=f"profiles by replica {[r['profiles_ingested'] for r in replicas]}, "
                  f"rounds matched by replica {[r['rounds_matched'] for r in replicas]}, "
                  f"retries={rep['client_retries']}, failovers={rep['client_failovers']}")
    # nothing lost, nothing refused, every agent through every round
    assert rep["rounds_closed"] == ROUNDS, rep
    assert rep["feedback_lost"] == 0 and rep["feedback_duplicates"] == 0, rep
    assert rep["client_refusals"] == 0 and rep["agents_gave_up"] == 0, rep
    assert rep["agents_registered"] == AGENTS, rep
    assert rep["profiles_stored"] == rep["profiles_acked"] == AGENTS * ROUNDS, rep
    assert rep["feedback_stored"] == rep["feedback_acked"] == rep["directives_issued"] > 0, rep
    # nothing twice, as the shared database sees it
    assert db["rewards_counted"] == db["feedback_rows"] == rep["feedback_stored"], db
    assert db["agents_in_two_directives"] == 0 and db["profiles_stored_twice"] == 0, db
    # both replicas ingested (their own logs, and the agents' view), each profile on one
    assert all(r["profiles_ingested"] > 0 and r["exit"] == 0 for r in replicas), replicas
    ingested = sum(r["profiles_ingested"] for r in replicas)  # a retry after a lost Ack logs twice, stores once
    assert rep["profiles_stored"] <= ingested <= rep["profiles_stored"] + rep["client_retries"], replicas
    assert sum(r["feedback_ingested"] for r in replicas) == rep["feedback_stored"], replicas
    assert sum(by_replica["Profile"]) == AGENTS * ROUNDS, by_replica
    # agent i starts on replica i mod 2; one that never failed over stayed there
    # (a loaded machine makes some first dials time out: those agents move over)
    assert all(n > 0 for n in by_replica["stayed_agents"]), by_replica
    assert by_replica["stayed_profiles"] == [ROUNDS * n for n in by_replica["stayed_agents"]], by_replica
    # every round matched once, by a lease holder
    assert sum(r["rounds_matched"] for r in replicas) == ROUNDS, replicas
    assert sum(r["lease_acquired"] for r in replicas) == db["lease_epoch"] >= 1, (replicas, db)
    assert replicas_ok(rep)
