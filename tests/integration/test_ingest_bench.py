"""benchmarks/ingest.py runs end to end on a tiny load and checks what it measured:
every acked profile is the one stored (read back from disk), in every mode."""

from __future__ import annotations

import pytest

from benchmarks import ingest

pytestmark = pytest.mark.timeout(180)


def test_tiny_run_verifies_every_mode() -> None:
    modes = ("group", "per_message", "group_pipelined", "echo")
    out = ingest.run(profiles=24, clients=2, modes=modes, pipeline=4)
    for mode in modes:
        r = out[mode]
        assert r["verified"] is True, r
        assert r["acked"] == 24 and r["profiles_per_s"] > 0 and r["cpm_cpu_us_per_profile"] > 0
    assert out["group"]["engine_counted"] == 24 and out["group"]["stored_rows"] == 2
    assert out["group_pipelined"]["in_flight"] == 4 and out["group"]["in_flight"] == 1
    assert out["group_pipelined"]["batches"] < out["group_pipelined"]["acked"]  # bursts share commits
    assert "batches" not in out["per_message"] and out["verify"]["ops_per_s"] > 0
    assert out["ratio_group_vs_per_message"] > 0 and out["commit_ms"] > 0


def test_tiny_run_on_postgresql_verifies(pg_server) -> None:
    """``--store postgresql://…``: a fresh schema per mode in that database; every acked
    profile is the one stored there (read back through a new connection)."""
    out = ingest.run(profiles=12, clients=2, modes=("group",), stores=(pg_server.url("knexa"),))
    r = out["group@postgresql"]
    assert r["verified"] is True and r["store"] == "postgresql", r
    assert r["acked"] == 12 and r["stored_rows"] == 2 and r["engine_counted"] == 12
    assert out["results"] == ["group@postgresql"] and "group" not in out
