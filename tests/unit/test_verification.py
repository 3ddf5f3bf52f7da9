"""benchmarks.verification: per-pair accepted fractions of execution-verified distillation,
joined from the daemons' logs and the CPM's pairs (issue 16 §2), and kept once the logs are gone."""

from __future__ import annotations

import json
import shutil

import pytest

from benchmarks import verification as V


def _cell(root):
    d = root / "linucb-s5"
    (d / "logs").mkdir(parents=True)
    agents = [{"name": f"node-0{i}", "peer": f"P{i}"} for i in range(3)]
    (d / "cell.json").write_text(json.dumps({"strategy": "linucb", "seed": 5, "code": "c0ffee", "agents": agents}))
    pairs = [  # round 1: P0 teaches P1 (arm 0); round 2: P0 teaches P2 (arm 1) and P2 → P1 failed; P1 → P0 (arm 1)
        {"round": 1, "directive_id": "r1-a", "teacher": "P0", "student": "P1", "arm": 0, "ok": True},
        {"round": 2, "directive_id": "r2-b", "teacher": "P0", "student": "P2", "arm": 1, "ok": True},
        {"round": 2, "directive_id": "r2-c", "teacher": "P2", "student": "P1", "arm": 1, "ok": False},
        {"round": 2, "directive_id": "r2-d", "teacher": "P1", "student": "P0", "arm": 1, "ok": True},
    ]
    (d / "cpm-export.json").write_text(json.dumps({"pairs": pairs}))

    def lines(*events):
        return "\n".join(json.dumps(e) for e in events) + "\n"

    teach = "agent.teach.done"
    learn = "agent.learn.done"
    (d / "logs" / "node-00.log").write_text(
        lines({"event": teach, "directive": "r1-a", "round": 1, "items": 10, "generated": 40},
              {"event": teach, "directive": "r2-b", "round": 2, "items": 30, "generated": 60})
        + "Traceback (most recent call last): not json\n"
        + lines({"event": learn, "round": 2, "items": 5, "items_parsed": 5, "items_used": 0}))
    (d / "logs" / "node-01.log").write_text(lines(
        {"event": learn, "round": 1, "items": 10, "items_parsed": 9, "items_used": 8},
        {"event": teach, "directive": "r2-d", "round": 2, "items": 5, "generated": 20}))
    (d / "logs" / "node-02.log").write_text(lines(  # its round-2 learn line is missing: the row keeps None
        {"event": "agent.evaluate.done", "round": 2}))
    (d / "logs" / "node-00-init.log").write_text("not a daemon log\n")
    return d


def test_rows_join_teacher_and_student_lines_per_pair(tmp_path) -> None:
    cell = _cell(tmp_path)
    rows = V.read_rows(cell, json.loads((cell / "cell.json").read_text()))
    assert rows == [
        {"round": 1, "arm": 0, "teacher": "node-00", "student": "node-01", "generated": 40, "sent": 10,
         "received": 10, "parsed": 9, "used": 8},
        {"round": 2, "arm": 1, "teacher": "node-00", "student": "node-02", "generated": 60, "sent": 30,
         "received": None, "parsed": None, "used": None},
        {"round": 2, "arm": 1, "teacher": "node-01", "student": "node-00", "generated": 20, "sent": 5,
         "received": 5, "parsed": 5, "used": 0},
    ]


def test_summary_counts_only_pairs_with_both_halves(tmp_path) -> None:
    doc = V.analyse(_cell(tmp_path))
    a = doc["all"]
    assert (a["pairs"], a["joined"], a["generated"], a["sent"], a["received"], a["used"]) == (3, 2, 60, 15, 15, 8)
    assert a["teacher_pass"] == pytest.approx(15 / 60) and a["student_accept"] == pytest.approx(8 / 15)
    assert a["end_to_end"] == pytest.approx(8 / 60) and a["used_per_pair"] == pytest.approx(4.0)
    assert a["pairs_none_used"] == 1
    assert set(doc["arms"]) == {"0", "1"} and doc["arms"]["0"]["used"] == 8 and doc["arms"]["1"]["joined"] == 1
    assert V.summarise([])["teacher_pass"] is None


def test_saved_rows_outlive_the_logs(tmp_path, capsys) -> None:
    cell = _cell(tmp_path)
    assert V.main([str(cell), "--write"]) == 0
    assert "teacher pass 25 % (15/60)" in capsys.readouterr().out
    before = V.analyse(cell)
    shutil.rmtree(cell / "logs")
    assert V.analyse(cell) == before
    assert json.loads((cell / V.SAVED).read_text())["schema"] == V.SCHEMA
    (cell / V.SAVED).unlink()
    assert V.main([str(cell)]) == 2
    assert "neither logs" in capsys.readouterr().err
    assert V.main([str(tmp_path / "nope")]) == 2


def test_pooling_sums_a_strategys_cells_by_arm(tmp_path, capsys) -> None:
    one = V.analyse(_cell(tmp_path / "a"))
    two = {**V.analyse(_cell(tmp_path / "b")), "seed": 6}
    other = {**one, "strategy": "random", "seed": 7}
    pooled = V.pool_by_strategy([one, two, other])
    assert set(pooled) == {"linucb", "random"} and pooled["linucb"]["seeds"] == [5, 6]
    assert pooled["linucb"]["all"]["used"] == 16 and pooled["linucb"]["all"]["joined"] == 4
    assert pooled["linucb"]["arms"]["0"]["generated"] == 80 and pooled["random"]["all"] == one["all"]
    assert V.main([str(tmp_path / "a" / "linucb-s5"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["strategies"]["linucb"]["all"]["used"] == 8
