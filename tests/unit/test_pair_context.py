"""benchmarks.pair_context on hand-built cells: which pairs count, the terms rebuilt from
the round's profiles, and the correlations by round block."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from benchmarks import pair_context as PC
from protocol.profile import HIST, PASS1, PROFILE_DIM


def _vec(val_pass1: float, hist_slot: int) -> list[float]:
    v = [0.0] * PROFILE_DIM
    v[PASS1] = val_pass1
    v[HIST.start + hist_slot] = 1.0
    return v


def _cell(tmp_path: Path) -> Path:
    """Teacher T's validation pass@1 is 0.6 in every round; student S's 0.1, 0.3, 0.5, 0.5
    (gaps 0.5, 0.3, 0.1); S's test gain over rounds 1–3: +0.3, 0.0, −0.1 — it rises with the
    gap, not in a straight line (the raw rewards do). Round 4's pair failed, and a pair of an unknown student is skipped."""
    profiles = [{"peer_id": "T", "round": r, "vector": _vec(0.6, 0)} for r in (1, 2, 3, 4)]
    profiles += [{"peer_id": "S", "round": r, "vector": _vec(v, 1)} for r, v in ((1, 0.1), (2, 0.3), (3, 0.5), (4, 0.5))]
    pairs = [{"round": r, "teacher": "T", "student": "S", "arm": 1, "ok": True, "raw_reward": w}
             for r, w in ((1, 0.2), (2, 0.1), (3, 0.0))]
    pairs += [{"round": 4, "teacher": "T", "student": "S", "arm": 1, "ok": False, "raw_reward": 0.9},
              {"round": 2, "teacher": "T", "student": "X", "arm": 1, "ok": True, "raw_reward": 0.5}]
    agents = [{"peer": "S", "pass1_rounds": [0.1, 0.4, 0.4, 0.3], "pass1_final": 0.45},
              {"peer": "T", "pass1_rounds": [0.6] * 4, "pass1_final": 0.6}]
    d = tmp_path / "linucb-s100"
    d.mkdir()
    (d / "cell.json").write_text(json.dumps({"strategy": "linucb", "seed": 100, "agents": agents,
                                             "rounds_completed": 4}))
    (d / "cpm-export.json").write_text(json.dumps({"profiles": profiles, "pairs": pairs}))
    return d


def test_rows_rebuild_the_terms_from_the_rounds_profiles(tmp_path) -> None:
    d = _cell(tmp_path)
    rows = PC.cell_rows(json.loads((d / "cell.json").read_text()), json.loads((d / "cpm-export.json").read_text()))
    assert [r["round"] for r in rows] == [1, 2, 3]  # the failed pair and the unknown student are out
    assert [r["gap"] for r in rows] == pytest.approx([0.5, 0.3, 0.1])
    assert [r["gain"] for r in rows] == pytest.approx([0.3, 0.0, -0.1])
    assert all(r["lack"] > 0 and r["js"] > 0 for r in rows)  # disjoint histograms: T has what S lacks


def test_correlations_by_block_and_the_gap_thirds(tmp_path) -> None:
    out = PC.analyse([_cell(tmp_path)], blocks=2)
    assert out["pairs"] == 3 and out["cells"] == ["linucb-s100"]
    whole, first, second = out["blocks"]
    assert whole["rounds"] == [1, 4] and first["rounds"] == [1, 2] and second["rounds"] == [3, 4]
    assert whole["gap"]["gain"] == pytest.approx(statistics.correlation([0.5, 0.3, 0.1], [0.3, 0.0, -0.1]))
    assert whole["gap"]["gain"] < 0.99
    assert whole["gap"]["raw"] == pytest.approx(1.0)
    assert whole["gain_by_gap"] == {"bottom_third": pytest.approx(-0.1), "top_third": pytest.approx(0.3)}
    assert first["n"] == 2 and second["n"] == 1 and second["gap"]["gain"] is None  # one point: no r


def test_cli(tmp_path, capsys) -> None:
    assert PC.main([str(tmp_path / "nope")]) == 2
    assert "not a finished cell" in capsys.readouterr().err
    assert PC.main([str(_cell(tmp_path))]) == 0
    assert "3 pairs from linucb-s100" in capsys.readouterr().out


def test_items_come_from_the_cells_verification_rows(tmp_path) -> None:
    """Items used per pair are joined by round and the two node names; a cell without
    verification.json has no items column values, and a pair without a row gets None."""
    d = _cell(tmp_path)
    assert {r["items"] for r in PC.cell_rows(json.loads((d / "cell.json").read_text()),
                                             json.loads((d / "cpm-export.json").read_text()))} == {None}
    cell = json.loads((d / "cell.json").read_text())
    cell["agents"][0]["name"], cell["agents"][1]["name"] = "node-01", "node-00"
    (d / "cell.json").write_text(json.dumps(cell))
    rows = [{"round": r, "teacher": "node-00", "student": "node-01", "used": u} for r, u in ((1, 60), (2, 20))]
    rows.append({"round": 3, "teacher": "node-01", "student": "node-00", "used": 99})  # other direction
    (d / "verification.json").write_text(json.dumps({"pairs": rows}))
    out = PC.analyse([d], blocks=1)
    assert [r["items"] for r in PC.cell_rows(cell, json.loads((d / "cpm-export.json").read_text()),
                                             rows)] == [60, 20, None]
    whole = out["blocks"][0]
    assert whole["items"]["gain"] is None  # two pairs with items: too few for an r
    rows.append({"round": 3, "teacher": "node-00", "student": "node-01", "used": 10})
    (d / "verification.json").write_text(json.dumps({"pairs": rows}))
    whole = PC.analyse([d], blocks=1)["blocks"][0]
    assert whole["items"]["gain"] == pytest.approx(statistics.correlation([60, 20, 10], [0.3, 0.0, -0.1]))
    assert whole["gap"]["gain"] == pytest.approx(statistics.correlation([0.5, 0.3, 0.1], [0.3, 0.0, -0.1]))
