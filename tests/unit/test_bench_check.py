"""The `make bench-check` comparison (benchmarks/bench_check.py): pure logic, no timing.

A ratio fails when it misses its target or is more than 10 % worse than the last
recorded value of the same machine and mode, in either direction of "better"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bench_check as bc
from benchmarks.bench_check import Ratio, compare


def _status(value: float, last: float | None, better: str, target: float | None = None) -> str:
    return compare([Ratio("r", value, target, better)], None if last is None else {"r": last})[0].status


def test_higher_is_better_fails_only_past_ten_percent() -> None:
    assert _status(0.91, 1.0, "higher") == "ok"
    assert _status(0.90, 1.0, "higher") == "ok"  # exactly 10 % is allowed
    assert _status(0.89, 1.0, "higher") == "REGRESSED"
    assert _status(5.0, 1.0, "higher") == "ok"  # improvements never fail


def test_lower_is_better_uses_the_same_ten_percent_of_goodness() -> None:
    assert _status(1.10, 1.0, "lower") == "ok"
    assert _status(1.11, 1.0, "lower") == "ok"  # 1/1.11 = 0.9009 ≥ 0.9
    assert _status(1.12, 1.0, "lower") == "REGRESSED"
    assert _status(0.5, 1.0, "lower") == "ok"


def test_target_is_checked_with_or_without_history() -> None:
    assert _status(0.7, None, "higher", target=0.8) == "MISSED TARGET"
    assert _status(0.8, None, "higher", target=0.8) == "new"
    assert _status(1.3, 1.25, "lower", target=1.2) == "MISSED TARGET"
    assert _status(1.5, 1.0, "lower", target=1.2) == "REGRESSED, MISSED TARGET"
    assert compare([Ratio("r", 1.0, None, "higher")], {"other": 2.0})[0].status == "new"


def test_failed_rows_and_bad_direction() -> None:
    rows = compare([Ratio("a", 1.0, None, "higher"), Ratio("b", 0.5, 0.8, "higher")], {"a": 1.0})
    assert [r.failed for r in rows] == [False, True]
    with pytest.raises(ValueError):
        Ratio("x", 1.0, None, "sideways")


def test_a_regression_never_becomes_its_own_baseline() -> None:
    rows = compare([Ratio("a", 0.5, None, "higher"), Ratio("b", 2.0, None, "higher"),
                    Ratio("c", 0.1, 0.8, "higher")], {"a": 1.0, "b": 1.0, "c": 0.1})
    # a regressed: keeps 1.0; b improved: 2.0; c misses its target but did not regress: 0.1
    assert bc.next_baseline(rows) == {"a": 1.0, "b": 2.0, "c": 0.1}


def test_results_parsing_drops_unmeasured_ratios() -> None:
    doc = {"ratios": [{"name": "a", "value": 1.5, "target": 2.0, "better": "lower"},
                      {"name": "b", "value": None, "target": None, "better": "higher"},
                      {"name": "c", "value": float("nan"), "target": None, "better": "higher"}]}
    assert bc.ratios_from_results(doc) == [Ratio("a", 1.5, 2.0, "lower")]


def test_main_records_then_compares_with_the_same_machine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    res = tmp_path / "results.json"
    hist = tmp_path / "hist"

    def run(value: float) -> int:
        res.write_text(json.dumps({"started": "t", "quick": True,
                                   "ratios": [{"name": "knexa/bare", "value": value, "target": None,
                                               "better": "higher"}]}))
        return bc.main(["--results", str(res), "--history-dir", str(hist)])

    assert run(1.0) == 0  # first run: "new", recorded
    assert run(0.95) == 0
    assert run(0.80) == 1  # 0.80 < 0.9 · 0.95
    assert run(0.80) == 1  # still compared with 0.95: the regression was not taken as baseline
    assert "REGRESSED" in capsys.readouterr().out
    (hist_file,) = hist.iterdir()
    assert [r["ratios"]["knexa/bare"] for r in json.loads(hist_file.read_text())["runs"]] == [1.0, 0.95, 0.95, 0.95]
    assert bc.main(["--results", str(tmp_path / "missing.json"), "--history-dir", str(hist)]) == 2
