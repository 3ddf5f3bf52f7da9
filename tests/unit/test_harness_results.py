"""harness.results: per-round aggregation, results.json / rounds.csv, plots, compare stats."""

from __future__ import annotations

import csv
import json
import math

import pytest

from harness import results as R
from harness.plots import plot_curves

PEERS = ["peerA", "peerB", "peerC", "peerD"]


def _pairs() -> list[R.PairRecord]:
    return [
        R.PairRecord(1, "peerA", "peerB", arm=0, directive_id="d1", ok=True, raw_reward=0.5, reward=1.0, kb=10.0),
        R.PairRecord(1, "peerC", "peerD", arm=1, directive_id="d2", ok=False, raw_reward=None, reward=None),
        R.PairRecord(2, "peerA", "peerB", arm=0, directive_id="d3", ok=True, raw_reward=0.25, reward=-0.5, kb=5.0),
        R.PairRecord(2, "peerD", "peerC", arm=2, directive_id="d4", ok=True, raw_reward=-0.1, reward=0.2, kb=5.0),
        R.PairRecord(3, "peerB", "peerA", arm=0, directive_id="d5", ok=None),  # no feedback yet
    ]


def _pass1() -> dict[int, dict[str, float]]:
    return {
        1: {"peerA": 0.5, "peerB": 0.1, "peerC": 0.2, "peerD": 0.2},
        2: {"peerA": 0.5, "peerB": 0.3, "peerC": 0.2, "peerD": 0.4},
        3: {"peerA": 0.6, "peerB": 0.4},
    }


def test_round_rows_aggregate_feedback_and_cumulate_raw_reward() -> None:
    rows = R.build_round_rows(_pairs(), _pass1(), rounds=[3, 1, 2])
    assert [r.round for r in rows] == [1, 2, 3]
    r1, r2, r3 = rows
    assert (r1.pairs, r1.feedback, r1.failures) == (2, 2, 1)
    assert r1.mean_raw_reward == pytest.approx(0.5)  # the failed pair has no reward
    assert r1.mean_reward == pytest.approx(1.0)
    assert r1.cumulative_reward == pytest.approx(0.5)
    assert r2.cumulative_reward == pytest.approx(0.5 + 0.25 - 0.1)
    assert r2.mean_pass1 == pytest.approx((0.5 + 0.3 + 0.2 + 0.4) / 4)
    assert (r3.pairs, r3.feedback) == (1, 0)
    assert r3.mean_reward is None and r3.cumulative_reward == pytest.approx(r2.cumulative_reward)
    assert r3.agents_reporting == 2


def test_agent_finals_use_first_and_latest_pass1_and_count_roles() -> None:
    peers = {p: {"name": f"node-{i}", "family": "synthetic"} for i, p in enumerate(PEERS)}
    finals = {a.peer: a for a in R.build_agent_finals(peers, _pairs(), _pass1(), {"peerA": 0.7})}
    assert finals["peerA"].pass1_initial == 0.5 and finals["peerA"].pass1_final == 0.7
    assert finals["peerC"].pass1_final == 0.2  # last per-round value when no final profile
    assert finals["peerB"].reward_sum == pytest.approx(0.75)
    assert (finals["peerA"].taught, finals["peerA"].learned) == (2, 1)
    assert finals["peerB"].name == "node-1"


def test_summary_gain_is_final_minus_initial() -> None:
    rows = [{"round": 1, "pairs": 2, "cumulative_reward": 1.0, "mean_pass1": 0.2}]
    agents = [{"pass1_initial": 0.2, "pass1_final": 0.5}, {"pass1_initial": 0.4, "pass1_final": 0.4}]
    s = R.summarize(rows, agents)
    assert s["final_pass1"] == pytest.approx(0.45)
    assert s["gain"] == pytest.approx(0.15)
    assert s["cumulative_reward"] == 1.0 and s["pairs"] == 2


def test_mean_std_ignores_missing_and_non_finite() -> None:
    assert R.mean_std([]) == (None, None)
    assert R.mean_std([None, 2.0]) == (2.0, 0.0)
    mu, sd = R.mean_std([1.0, 3.0, float("nan")])
    assert mu == 2.0 and sd == pytest.approx(math.sqrt(2.0))


def test_pair_matrix_counts_teacher_rows_student_columns() -> None:
    m = R.pair_matrix(_pairs(), PEERS)
    assert m[0][1] == 2  # A taught B twice
    assert m[1][0] == 1
    assert m[3][2] == 1 and m[2][3] == 1
    assert sum(map(sum, m)) == len(_pairs())


def test_write_run_outputs_produces_json_csv_and_pngs(tmp_path) -> None:
    pairs = _pairs()
    rows = R.build_round_rows(pairs, _pass1(), rounds=[1, 2, 3])
    peers = {p: {"name": f"node-{i}"} for i, p in enumerate(PEERS)}
    agents = R.build_agent_finals(peers, pairs, _pass1(), {})
    doc = R.results_document(
        config={"nodes": 4, "rounds": 3, "strategy": "linucb", "agent": "synthetic"},
        status="ok",
        rows=rows,
        agents=agents,
        pairs=pairs,
        rounds_completed=3,
    )
    paths = R.write_run_outputs(tmp_path, doc, pairs, {p: peers[p]["name"] for p in PEERS})

    loaded = R.load_results(paths["results"])
    assert loaded["rounds_completed"] == 3
    assert [r["round"] for r in loaded["rounds"]] == [1, 2, 3]
    assert len(loaded["pairs"]) == 5 and loaded["pairs"][0]["teacher"] == "peerA"
    assert loaded["summary"]["pairs"] == 5

    with open(paths["rounds_csv"], newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [int(r["round"]) for r in table] == [1, 2, 3]
    assert float(table[1]["cumulative_reward"]) == pytest.approx(0.65)
    assert table[2]["mean_reward"] == ""  # missing stays empty, not "None"

    for key in ("rounds_plot", "pairs_plot"):
        data = paths[key].read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_results_json_refuses_nan(tmp_path) -> None:
    with pytest.raises(ValueError):
        R.write_json(tmp_path / "x.json", {"v": float("nan")})


def test_load_results_rejects_other_documents(tmp_path) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"schema": "something-else"}))
    with pytest.raises(ValueError):
        R.load_results(path)


def test_curves_plot_handles_uneven_series_and_missing_bands(tmp_path) -> None:
    curves = [
        {"strategy": "linucb", **R.aggregate_curves([[0.1, 0.2, 0.3], [0.1, 0.3]], spread="ci95")},
        {"strategy": "random", **R.aggregate_curves([[0.1, None, 0.15]], spread="std")},
        {"strategy": "empty", **R.aggregate_curves([], spread="std")},
    ]
    out = plot_curves(tmp_path / "compare.png", curves, title="t", band="b")
    assert out.read_bytes()[:4] == b"\x89PNG"


def _t_cdf_upper_half(t: float, df: int, steps: int = 20_000) -> float:
    """P(0 < T < t) for Student's t by Simpson's rule (independent of the table)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    h = t / steps
    f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(steps + 1)]
    return h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 9, 19, 30])
def test_t975_table_is_the_two_sided_95_percent_quantile(df: int) -> None:
    assert _t_cdf_upper_half(R.t975(df), df) == pytest.approx(0.475, abs=2e-4)


def test_ci95_is_a_t_interval_and_absent_for_one_value() -> None:
    mu, half, n = R.ci95([0.1, 0.2, 0.3, None])
    assert (mu, n) == (pytest.approx(0.2), 3)
    assert half == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert R.ci95([0.4]) == (0.4, None, 1)
    assert R.ci95([]) == (None, None, 0)


def test_curve_after_rounds_starts_at_initial_and_ends_at_final() -> None:
    doc = {"rounds": [{"mean_pass1": 0.2}, {"mean_pass1": 0.25}, {"mean_pass1": 0.3}],
           "summary": {"initial_pass1": 0.21, "final_pass1": 0.4}}
    curve = R.curve_after_rounds(doc)
    assert curve == [0.21, 0.25, 0.3, 0.4]  # r = 0 … R; round 1's profile is the initial value
    assert R.area_under(curve) == pytest.approx(((0.21 + 0.25) / 2 + (0.25 + 0.3) / 2 + (0.3 + 0.4) / 2) / 3)
    assert R.area_under([0.1, None, 0.2]) is None and R.curve_after_rounds({"rounds": []}) == []


def test_aggregate_curves_bands() -> None:
    agg = R.aggregate_curves([[0.1, 0.2], [0.3, 0.4]], spread="std")
    assert agg["x"] == [0, 1] and agg["mean"] == [pytest.approx(0.2), pytest.approx(0.3)] and agg["n"] == 2
    assert agg["hi"][0] - agg["mean"][0] == pytest.approx(math.sqrt(0.02))
    ci = R.aggregate_curves([[0.1, 0.2], [0.3, 0.4]], spread="ci95")
    assert ci["hi"][0] - ci["mean"][0] == pytest.approx(12.706 * math.sqrt(0.02) / math.sqrt(2))
    one = R.aggregate_curves([[0.1, 0.2]], spread="ci95")
    assert one["lo"] == [None, None] and one["mean"] == [0.1, 0.2]  # one seed: no band
    with pytest.raises(ValueError):
        R.aggregate_curves([], spread="sem")


def test_round_rows_sum_bytes_of_pairs_with_feedback() -> None:
    rows = R.build_round_rows(_pairs(), _pass1(), rounds=[1, 2, 3])
    assert [r.bytes for r in rows] == [10 * 1024, 10 * 1024, 0]
    agents = {a.peer: a for a in R.build_agent_finals({p: {} for p in PEERS}, _pairs(), _pass1(), {})}
    assert agents["peerA"].pass1_rounds == [0.5, 0.5, 0.6]
    assert agents["peerC"].pass1_rounds == [0.2, 0.2, None]
