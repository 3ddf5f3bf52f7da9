"""``benchmarks.ha_ingest --quick`` end to end (issue #18): the SQLite node, one
PostgreSQL replica and two replicas sharing one database and identity, each as real
``knexa-cpm serve`` processes driven by real signed clients, on tests/pg.py's throwaway
server (skipped, loudly, where no server binary exists).

What the figures in docs/performance.md ("HA ingest") rest on, asserted as counts:
every profile sent was acknowledged, each acknowledged profile was logged as accepted
exactly once and by the replica its client used (so the two-replica figures really
split the load), and the database holds each client's last acknowledged profile.
Timings are reported, never asserted.
"""

from __future__ import annotations

import pytest

from benchmarks.ha_ingest import CONFIGS, run
from tests.pg import PgTestServer

pytestmark = pytest.mark.timeout(600)

PROFILES, CLIENTS = 60, 4


def test_quick_run_acks_and_stores_every_profile_once_per_configuration(pg_server: PgTestServer) -> None:
    rep = run(PROFILES, CLIENTS, rounds=1, server=pg_server.server)
    assert [t["config"] for t in rep["trials"]] == list(CONFIGS)
    assert set(rep["summary"]) == set(CONFIGS)
    for t in rep["trials"]:
        checks = t["checks"]
        assert checks == {"sent": PROFILES, "acked": PROFILES, "acked_sum_clients": PROFILES,
                          "accepted_logged": PROFILES, "stored_rows": CLIENTS, "clients_miscounted": 0,
                          "accepted_on_other_replica": 0, "last_ack_missing": 0, "ok": True}, t
        assert t["verified"] and t["acked"] == PROFILES
        per = t["per_replica"]
        assert len(per) == t["replicas"] == (2 if t["config"] == "pg2" else 1)
        # every client sends at least its first profile, and client i uses replica i % 2
        assert all(r["acked"] > 0 for r in per) and sum(r["acked"] for r in per) == PROFILES
        assert sum(r["lease_holder"] for r in per) == (0 if t["config"] == "sqlite" else 1)
        for key in ("profiles_per_s", "replicas_cpu_us_per_profile", "pg_cpu_us_per_profile",
                    "client_cpu_us_per_profile", "total_cpu_us_per_profile", "cores_busy"):
            assert isinstance(t[key], float) and t[key] >= 0, key
        assert ("pg_activity" in t) == (t["config"] != "sqlite")
        if "pg_activity" in t:
            assert t["pg_activity"]["samples"] >= 0
    assert rep["verified"]
    s = rep["summary"]
    assert s["pg2"]["trials"] == 1 and len(s["pg2"]["per_replica"]) == 2 and "rate_vs_pg1" in s["pg2"]
    assert "lock_wait_share" in s["pg1"] and "lock_wait_share" not in s["sqlite"]
