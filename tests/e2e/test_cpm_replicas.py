"""Two CPM replicas on one PostgreSQL store, end to end (issue #18): real ``knexa-cpm
serve --lease`` processes sharing one identity key and one database (tests/pg.py's
throwaway server), four real daemons that know both addresses, and a ``kill -9`` of the
replica holding the round lease between directives and feedback.

What an operator relies on: the other replica takes the lease over, the daemons move to
it, the rounds go on, and the database shows nothing acknowledged lost, no reward
counted twice and no agent in two directives of a round (``benchmarks.failover``
checks; it also runs the 10-kill measurement in docs/reliability.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.failover import Cluster
from tests.pg import PgTestServer

pytestmark = pytest.mark.timeout(420)


def test_kill9_of_the_lease_holder_mid_round_loses_nothing(tmp_path: Path, pg_server: PgTestServer) -> None:
    cluster = Cluster(tmp_path, pg_server.new_database("ha"), n_daemons=4, lease_s=2.0)
    try:
        cluster.setup()
        cluster.start_replica(0)
        cluster.start_replica(1)
        cluster.start_daemons()
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


@pytest.mark.slow
def test_a_paused_lease_holder_is_replaced_and_steps_down_when_it_resumes(tmp_path: Path,
                                                                          pg_server: PgTestServer) -> None:
    """SIGSTOP, not kill: the holder stays connected (a session advisory lock would keep
    the rounds stuck); the lease lapses, another replica runs the rounds, and the old one,
    resumed, finds its term gone and serves as a follower — no round matched twice."""
    cluster = Cluster(tmp_path, pg_server.new_database("ha_pause"), n_daemons=4, lease_s=2.0)
    try:
        cluster.setup()
        cluster.start_replica(0)
        cluster.start_replica(1)
        cluster.start_daemons()
        result = cluster.pause_trial(rounds_after=1, timeout_s=300)
        assert result["lost"] in ("expired", "fenced")
    finally:
        cluster.stop()
