"""The federation table's cell records kept in git (benchmarks/results/federation): the
table is built over several sessions, so what is committed must stay one experiment —
every cell finished, the report's setting, one clean commit, its verification rows
saved — and the report must build from those files alone, as its README promises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import federation as F
from benchmarks import federation_report as FR

TABLE = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "federation"
CELLS = sorted(p for p in (TABLE / "cells").glob("*/") if (p / F.CELL_FILE).is_file())


def _records() -> list[dict]:
    if not CELLS:
        pytest.skip(f"no committed cell records under {TABLE / 'cells'}")
    return [{**F.read_cell(p), "dir": f"cells/{p.name}"} for p in CELLS]


def test_every_committed_cell_is_a_finished_report_cell_of_the_default_setting() -> None:
    plan = F.build_plan(F.parser().parse_args(["--out", str(TABLE)]), env={})
    for path, cell in zip(CELLS, _records()):
        assert path.name == f"{cell['strategy']}-s{cell['seed']}"
        assert cell["status"] == "ok" and cell["rounds_completed"] == plan.rounds
        assert cell["fingerprint"] == plan.fingerprint(), path
        assert cell["seed"] in plan.seeds and cell["strategy"] in plan.strategies
        assert len(cell["agents"]) == plan.nodes
        export = json.loads((path / "cpm-export.json").read_text(encoding="utf-8"))
        assert {p["round"] for p in export["pairs"]} <= set(range(1, plan.rounds + 1))
        saved = json.loads((path / "verification.json").read_text(encoding="utf-8"))  # the logs are not kept
        assert saved["code"] == cell["code"] and (saved["strategy"], saved["seed"]) == (cell["strategy"], cell["seed"])
        assert len(saved["pairs"]) == sum(1 for p in export["pairs"] if p.get("ok"))


def test_committed_cells_come_from_one_clean_commit() -> None:
    versions = {c["code"] for c in _records()}
    assert len(versions) == 1, versions
    (version,) = versions
    assert len(version) == 40 and not version.endswith("+dirty")


def test_the_table_builds_from_the_committed_records_alone() -> None:
    records = _records()
    plan = F.build_plan(F.parser().parse_args(["--out", str(TABLE)]), env={})
    doc = FR.summary_document(plan.config(), records, [], plan.paired, "test", "now")
    rows = {r["strategy"]: r for r in doc["table"]}
    for strategy in {c["strategy"] for c in records}:
        finals = [c["final_pass1"] for c in records if c["strategy"] == strategy]
        assert rows[strategy]["ok"] == len(finals)
        assert rows[strategy]["final_pass1"] == pytest.approx(sum(finals) / len(finals))
        assert all(0.0 <= f <= 1.0 for f in finals)
    assert F.publish_problem(F.EXIT_OK, {**doc, "missing": []}) is None
