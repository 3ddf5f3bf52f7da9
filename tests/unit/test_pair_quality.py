"""benchmarks.pair_quality: per-pair student gains, teacher-ahead shares and the
not-learning drift, by round block, pooled by strategy."""

from __future__ import annotations

import json

import pytest

from benchmarks.pair_quality import analyse, cell_points, main


def _cell(strategy: str = "linucb", seed: int = 0) -> dict:
    # three agents, 2 rounds; curves are test pass@1 before r1, before r2, after r2
    return {
        "strategy": strategy, "seed": seed, "rounds_completed": 2,
        "agents": [
            {"peer": "a", "pass1_rounds": [0.5, 0.5], "pass1_final": 0.4},
            {"peer": "b", "pass1_rounds": [0.1, 0.3], "pass1_final": 0.3},
            {"peer": "c", "pass1_rounds": [0.2, 0.2], "pass1_final": 0.5},
        ],
        "pair_rows": [
            {"round": 1, "teacher": "a", "student": "b", "arm": 1, "ok": True},   # b +0.2, teacher ahead
            {"round": 2, "teacher": "b", "student": "c", "arm": 0, "ok": True},   # c +0.3, teacher ahead
            {"round": 2, "teacher": "c", "student": "a", "arm": 2, "ok": False},  # failed: not counted
        ],
    }


def test_points_split_learners_from_the_drift() -> None:
    pairs, drift = cell_points(_cell())
    assert [(p["round"], p["arm"], round(p["gain"], 6), p["teacher_ahead"]) for p in pairs] == \
        [(1, 1, 0.2, True), (2, 0, 0.3, True)]
    # round 1: a and c did not learn (0.0, 0.0); round 2: a (the failed pair's student) and b
    assert sorted((d["round"], round(d["change"], 6)) for d in drift) == [(1, 0.0), (1, 0.0), (2, -0.1), (2, 0.0)]


def test_analyse_pools_by_strategy_and_blocks(tmp_path) -> None:
    dirs = []
    for name, seed in (("linucb", 0), ("linucb", 1), ("random", 0)):
        d = tmp_path / f"{name}-s{seed}"
        d.mkdir()
        cell = _cell(name, seed)
        if name == "random":  # the teacher behind: b teaches a in round 1
            cell["pair_rows"] = [{"round": 1, "teacher": "b", "student": "a", "arm": 1, "ok": True}]
        (d / "cell.json").write_text(json.dumps(cell))
        dirs.append(d)
    out = analyse(dirs, blocks=2)
    lin, rnd = out["linucb"], out["random"]
    assert lin["seeds"] == [0, 1] and lin["all"]["pairs"] == 4
    assert lin["all"]["mean_gain"] == pytest.approx(0.25) and lin["all"]["teacher_ahead"] == 1.0
    assert [b["rounds"] for b in lin["blocks"]] == [[1, 1], [2, 2]]
    assert lin["blocks"][0]["arms"] == {"1": {"n": 2, "mean_gain": pytest.approx(0.2)}}
    assert lin["blocks"][1]["drift"] == pytest.approx(-0.05)
    assert rnd["all"]["teacher_ahead"] == 0.0 and rnd["all"]["mean_gain"] == pytest.approx(0.0)


def test_cli_refuses_an_unfinished_cell(tmp_path, capsys) -> None:
    assert main([str(tmp_path)]) == 2
    assert "not a finished cell" in capsys.readouterr().err
