"""Two CPM replicas on one PostgreSQL store, end to end (issue #18): real ``knexa-cpm
serve --lease`` processes sharing one identity key and one database (tests/pg.py's
throwaway server), four real daemons that know both addresses, and a ``kill -9`` of the
replica holding the round lease between directives and feedback, and inside a matching
(before its transaction commits; the test-only hold of ``cpm.faults``).

What an operator relies on: the other replica takes the lease over, the daemons move to
it, the rounds go on, and the database shows nothing acknowledged lost, no reward
counted twice and no agent in two directives of a round (``benchmarks.failover``
checks; it also runs the 10-kill measurement in docs/reliability.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.failover import Cluster
from knexad.config import STATE_FILE
from tests.pg import PgTestServer

pytestmark = pytest.mark.timeout(420)


def test_kill9_of_the_lease_holder_mid_round_loses_nothing(tmp_path: Path, pg_server: PgTestServer) -> None:
    cluster = Cluster(tmp_path, pg_server.new_database("ha"), n_daemons=4, lease_s=2.0)
    try:
        cluster.start()
        result = cluster.trial("feedback", rounds_after=1, timeout_s=300)
        assert result["epoch"] >= 2  # a new holder, a new term
        assert result["takeover_s"] >= 0  # never before the old lease expired (the database's clock)
        survivor = cluster.replicas[1 - result["killed"]]
        assert survivor is not None and survivor.events("cpm.lease.acquired")
        assert sum(len(d.events("cpm.failover")) for d in cluster.daemons) >= 1  # daemons moved over
        totals = cluster.check()
        assert totals["feedback"] >= 2 and totals["rewards"] == totals["feedback"]
    finally:
        cluster.stop()


def test_kill9_inside_matching_leaves_the_round_to_be_matched_once_by_the_new_holder(
        tmp_path: Path, pg_server: PgTestServer) -> None:
    """kill -9 *inside* the matching (the test-only hold of ``cpm.faults``: the holder has
    written the round's directives and ``matched`` state and not committed). Nothing of
    that matching may survive, and the replica taking over must match the round once:
    counted in the database, every agent in at most one directive of the round, every
    directive of the round from one matching, one reward per feedback row."""
    cluster = Cluster(tmp_path, pg_server.new_database("ha_match"), n_daemons=4, lease_s=2.0)
    try:
        cluster.start()
        result = cluster.trial("matching", rounds_after=1, timeout_s=300)
        r = result["matched_round"]
        assert result["state"] == "open"  # the killed matching never committed
        killed = [p for p in cluster.replica_procs() if p.events("cpm.match.holding")]
        assert len(killed) == 1 and not killed[0].alive()
        assert not [e for e in killed[0].events("cpm.round.matched") if int(e["round"]) == r]
        assert result["matched_by"] != killed[0].name
        # the database, counted: one directive per pair per round, one per agent
        per_pair = cluster.sql("SELECT round, teacher, student, count(*) FROM directives "
                               "GROUP BY round, teacher, student HAVING count(*) > 1")
        assert per_pair == []
        per_agent = cluster.sql(
            "SELECT round, p, count(*) FROM (SELECT round, teacher AS p FROM directives UNION ALL "
            "SELECT round, student FROM directives) x GROUP BY round, p HAVING count(*) > 1")
        assert per_agent == []
        (n_dir, n_matchings, issued_at), = cluster.sql(
            "SELECT count(*), count(DISTINCT issued_at), min(issued_at) FROM directives WHERE round = %s", (r,))
        (matched_at,), = cluster.sql("SELECT matched_at FROM rounds WHERE round = %s", (r,))
        assert n_dir >= 1 and n_matchings == 1 and issued_at == matched_at
        totals = cluster.check()  # acked profiles/feedback stored, received directives stored
        assert totals["feedback"] >= 1 and totals["rewards"] == totals["feedback"]
        (n_fb, n_distinct), = cluster.sql("SELECT count(*), count(DISTINCT directive_id) FROM feedback")
        assert n_fb == n_distinct == totals["feedback"]
        # each daemon's status file names the replica it talks to (`knexad doctor` shows it)
        addrs = [f"/ip4/127.0.0.1/tcp/{port}/p2p/{cluster.peer_id}" for port in cluster.ports]
        for i, d in enumerate(cluster.daemons):
            moved = d.events("cpm.failover")
            expected = moved[-1]["to"] if moved else (addrs if i % 2 == 0 else addrs[::-1])[0]
            assert json.loads((tmp_path / f"d{i}" / STATE_FILE).read_text())["cpm_addr"] == expected
    finally:
        cluster.stop()


@pytest.mark.slow
def test_a_paused_lease_holder_is_replaced_and_steps_down_when_it_resumes(tmp_path: Path,
                                                                          pg_server: PgTestServer) -> None:
    """SIGSTOP, not kill: the holder stays connected (a session advisory lock would keep
    the rounds stuck); the lease lapses, another replica runs the rounds, and the old one,
    resumed, finds its term gone and serves as a follower — no round matched twice."""
    cluster = Cluster(tmp_path, pg_server.new_database("ha_pause"), n_daemons=4, lease_s=2.0)
    try:
        cluster.start()
        result = cluster.pause_trial(rounds_after=1, timeout_s=300)
        assert result["lost"] in ("expired", "fenced")
    finally:
        cluster.stop()
