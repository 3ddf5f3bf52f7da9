"""benchmarks/feedback.py runs end to end on a small federation: every directive of the
matched round gets its feedback stored in both modes, with the reputation it primed in
the saved state (the once-per-batch write itself: tests/unit/test_store_contract.py)."""

from __future__ import annotations

from benchmarks import feedback


def test_feedback_benchmark_stores_every_feedback_in_both_modes() -> None:
    res = feedback.run(agents=60, batch=8)
    for mode in ("batched", "per_feedback"):
        r = res[mode]
        assert r["feedbacks"] == 30 and r["stored"] == 30  # K_p = N/2 pairs, all reported
        assert r["teachers_in_state"] == 60 and r["state_kib"] > 0
    assert res["verified"] is True
    assert res["ratio_per_feedback_over_batched"] > 0
