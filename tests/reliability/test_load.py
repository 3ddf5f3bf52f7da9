"""A reduced load run (benchmarks/load.py) inside the reliability suite: 100 agents with
their own identities and connections, 10 rounds against a real CPM process. The full
500 × 50 run is ``python -m benchmarks.load --agents 500 --rounds 50 --json``
(docs/reliability.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.load import run
from tests.reliability.summary import record

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(1200)]


def test_load_100_agents_10_rounds(tmp_path: Path) -> None:
    rep = run(100, 10, 2, "linucb", tmp_path, timeout_s=1100)
    rss = rep["cpm_rss_mb"]
    ok = (rep["rounds_closed"] == 10 and rep["feedback_lost"] == 0 and rep["feedback_duplicates"] == 0
          and rep["client_refusals"] == 0 and rep["profiles_stored"] == rep["profiles_acked"] == 1000
          and rep["feedback_stored"] == rep["feedback_acked"] == rep["directives_issued"])
    record("load", "100 agents x 10 rounds, one CPM process", passed=ok, lost=rep["feedback_lost"],
           detail=f"{rep['profiles_per_s']} profiles/s, {rep['directives_per_s']} directives/s, "
                  f"retries={rep['client_retries']}, CPM RSS {rss['first_round']}->{rss['last']} MB")
    assert ok, rep
    assert rss["growth_second_half_mb"] is not None and rss["growth_second_half_mb"] < 50, rss
