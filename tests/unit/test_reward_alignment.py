"""benchmarks.reward_alignment on a hand-built cell: which Feedback counts, and the numbers."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from benchmarks import reward_alignment as RA
from protocol.profile import PASS1, PROFILE_DIM


def _vec(val_pass1: float) -> list[float]:
    v = [0.0] * PROFILE_DIM
    v[PASS1] = val_pass1
    return v


def _cell(tmp_path: Path) -> Path:
    # student S: validation pass@1 per round profile 0.1, 0.3, 0.4, 0.35; test pass@1 per
    # round profile 0.2, 0.5, 0.55, 0.5 and 0.6 after the last round
    profiles = [{"peer_id": "S", "round": r, "vector": _vec(v)} for r, v in ((1, 0.1), (2, 0.3), (3, 0.4), (4, 0.35))]
    profiles += [{"peer_id": "T", "round": r, "vector": _vec(0.5)} for r in (1, 2, 3, 4)]
    pairs = [
        {"round": 1, "teacher": "T", "student": "S", "arm": 1, "ok": True, "raw_reward": 0.2},
        {"round": 2, "teacher": "T", "student": "S", "arm": 0, "ok": True, "raw_reward": 0.05},
        {"round": 2, "teacher": "S", "student": "T", "arm": 0, "ok": False, "raw_reward": -1.0},  # failed
        {"round": 3, "teacher": "T", "student": "S", "arm": 1, "ok": True, "raw_reward": -0.02},
        {"round": 4, "teacher": "T", "student": "S", "arm": 1, "ok": True, "raw_reward": 0.1},  # no round 5
    ]
    agents = [{"peer": "S", "pass1_rounds": [0.2, 0.5, 0.55, 0.5], "pass1_final": 0.6},
              {"peer": "T", "pass1_rounds": [0.5, 0.5, 0.5, 0.5], "pass1_final": 0.5}]
    d = tmp_path / "linucb-s7"
    d.mkdir()
    (d / "cell.json").write_text(json.dumps({"strategy": "linucb", "seed": 7, "agents": agents, "code": "abc"}))
    (d / "cpm-export.json").write_text(json.dumps({"profiles": profiles, "pairs": pairs}))
    return d


def test_rows_take_successful_feedback_with_a_next_profile(tmp_path) -> None:
    d = _cell(tmp_path)
    rows = RA.pair_points(json.loads((d / "cell.json").read_text()), json.loads((d / "cpm-export.json").read_text()))
    assert [(r["round"], r["arm"]) for r in rows] == [(1, 1), (2, 0), (3, 1)]
    assert rows[0]["dval"] == pytest.approx(0.2) and rows[0]["gain"] == pytest.approx(0.3)
    assert rows[1]["dval"] == pytest.approx(0.1) and rows[1]["gain"] == pytest.approx(0.05)
    assert rows[2]["dval"] == pytest.approx(-0.05) and rows[2]["gain"] == pytest.approx(-0.05)


def test_summary_correlations_and_arms(tmp_path) -> None:
    out = RA.analyse(_cell(tmp_path))
    assert out["n"] == 3 and out["code"] == "abc"
    raw, dval, gain = [0.2, 0.05, -0.02], [0.2, 0.1, -0.05], [0.3, 0.05, -0.05]
    assert out["raw_gain"] == pytest.approx(statistics.correlation(raw, gain))
    assert out["dval_gain"] == pytest.approx(statistics.correlation(dval, gain))
    assert out["raw_dval"] == pytest.approx(statistics.correlation(raw, dval))
    assert out["arms"]["1"] == {"n": 2, "mean_gain": pytest.approx(0.125), "mean_raw": pytest.approx(0.09)}
    assert out["arms"]["0"]["mean_gain"] == pytest.approx(0.05)


def test_cli_refuses_an_unfinished_cell(tmp_path, capsys) -> None:
    assert RA.main([str(tmp_path)]) == 2
    assert "not a finished cell" in capsys.readouterr().err
    assert RA.main([str(_cell(tmp_path)), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["strategy"] == "linucb"
