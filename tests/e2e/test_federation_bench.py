"""``python -m benchmarks.federation`` end to end: real CPM + daemon subprocesses per cell.

What a user relies on: a long table can be built in pieces — a finished (strategy, seed)
cell is kept and skipped by the next invocation, a request with another setting is
refused rather than mixed in; the summary file has per-cell, per-round and per-agent
numbers and a table that agree with the runs' own results.json; CSVs and plots are
written; no process outlives the command. The default test uses synthetic agents; the
``slow`` one is the same small benchmark with tiny ML models (``make test-slow``).
"""

from __future__ import annotations

import csv
import re
import json
import sys
from pathlib import Path

import pytest

from benchmarks.federation_report import CELL_SCHEMA, SCHEMA
from harness.procs import process_alive
from tests.e2e.conftest import e2e_env

REPO = Path(__file__).resolve().parents[2]
BENCH = [sys.executable, "-m", "benchmarks.federation"]
PLOTS = ("federation-curves.png", "federation-gain.png", "federation-final.png")


def _bench(procs, out: Path, args: list[str], timeout: float) -> tuple[int, str]:
    p = procs.start([*BENCH, "--out", str(out), "--no-progress", *args], name="bench",
                    env=e2e_env(COLUMNS="200"), cwd=REPO)
    p.proc.wait(timeout=timeout)
    return p.returncode, p.stdout() + p.stderr()


def _no_survivors(cell: Path, nodes: int) -> None:
    children = json.loads((cell / "pids.json").read_text())["children"]
    roles = [c["role"] for c in children]
    assert roles.count("cpm") == 1 and roles.count("daemon") == nodes, roles
    assert [c for c in children if process_alive(c["pid"])] == []


def _check_summary(out: Path, strategies: list[str], nodes: int, rounds: int, agent: str) -> dict:
    """Everything the summary promises, checked against each cell's own results.json."""
    doc = json.loads((out / "federation-results.json").read_text())
    assert doc["schema"] == SCHEMA and doc["purpose"] == "report" and doc["missing"] == []
    cfg = doc["config"]
    assert (cfg["nodes"], cfg["rounds"], cfg["agent"], cfg["seeds"]) == (nodes, rounds, agent, [0])
    assert cfg["alpha"] == 0.1 and cfg["strategies"] == strategies and not set(cfg["seeds"]) & set(cfg["tuning_seeds"])
    assert [(c["strategy"], c["seed"]) for c in doc["cells"]] == [(s, 0) for s in strategies]
    for cell in doc["cells"]:
        cell_dir = out / cell["dir"]
        assert cell_dir == out / "cells" / f"{cell['strategy']}-s0"
        res = json.loads((cell_dir / "results.json").read_text())
        assert cell["schema"] == CELL_SCHEMA and cell["status"] == "ok" and res["status"] == "ok"
        assert res["config"]["strategy"] == cell["strategy"] and res["rounds_completed"] == rounds
        assert cell["final_pass1"] == res["summary"]["final_pass1"]
        assert cell["initial_pass1"] == res["summary"]["initial_pass1"]
        assert len(cell["curve"]) == rounds + 1 and cell["curve"][-1] == cell["final_pass1"]
        assert 0.0 <= cell["auc_pass1"] <= 1.0 and cell["wall_s"] > 0
        assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", cell["code"]), cell["code"]  # the commit measured
        assert [r["round"] for r in cell["rounds"]] == list(range(1, rounds + 1))
        assert set(cell["rounds"][0]) >= {"pairs", "mean_pass1", "mean_raw_reward", "bytes"}
        assert len(cell["agents"]) == nodes
        for a in cell["agents"]:
            assert set(a) >= {"pass1_initial", "pass1_final", "pass1_rounds", "reward_sum", "bytes_in", "bytes_out",
                              "steps_trained", "local_rounds"}
            assert len(a["pass1_rounds"]) == rounds
        assert cell["bytes"] == sum(r["bytes"] for r in cell["rounds"]) == sum(a["bytes_in"] for a in cell["agents"])
        if cell["strategy"] == "local-only":
            assert cell["pairs"] == 0 and cell["bytes"] == 0
        else:
            assert cell["pairs"] >= rounds and cell["bytes"] > 0
        assert (cell_dir / "rounds.png").read_bytes()[:4] == b"\x89PNG"
        _no_survivors(cell_dir, nodes)
    table = {row["strategy"]: row for row in doc["table"]}
    assert list(table) == strategies
    assert doc["code_versions"] == sorted({c["code"] for c in doc["cells"]})
    for cell in doc["cells"]:
        row = table[cell["strategy"]]
        assert row["ok"] == 1 and row["final_pass1"] == cell["final_pass1"] and row["final_pass1_ci95"] is None
    lin, loc = (next(c for c in doc["cells"] if c["strategy"] == s) for s in ("linucb", "local-only"))
    assert table["linucb"]["gain_vs_local"] == pytest.approx(lin["final_pass1"] - loc["final_pass1"])
    assert doc["paired"]["n"] == 1 and doc["paired"]["per_seed"]["0"] == pytest.approx(table["linucb"]["gain_vs_local"])
    with open(out / "federation-rounds.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == len(strategies) * rounds
    with open(out / "federation-agents.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == len(strategies) * nodes
    for name in PLOTS:
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    return doc


def test_quick_benchmark_builds_the_table_in_pieces(tmp_path, procs) -> None:
    out = tmp_path / "fed"
    quick = ["--quick", "--paired", "linucb,local-only"]
    code, text = _bench(procs, out, [*quick, "--strategies", "linucb"], timeout=150)
    assert code == 0, text
    linucb_cell = out / "cells" / "linucb-s0"
    before = {name: (linucb_cell / name).read_bytes() for name in ("cell.json", "results.json", "pids.json")}

    code, text = _bench(procs, out, [*quick, "--strategies", "linucb,local-only"], timeout=150)
    assert code == 0, text
    assert "1/2 linucb seed 0: finished earlier" in text and "2/2: local-only, seed 0" in text
    assert "1/2: linucb" not in text  # not run again …
    assert {name: (linucb_cell / name).read_bytes() for name in before} == before  # … and left as it was
    doc = _check_summary(out, ["linucb", "local-only"], nodes=4, rounds=2, agent="synthetic")
    row = next(line for line in text.splitlines() if "│ linucb" in line)
    assert f"{doc['table'][0]['final_pass1']:.3f} ± –" in row  # one seed: no interval, and the table says so

    cells = sorted(p.name for p in (out / "cells").iterdir())
    code, text = _bench(procs, out, [*quick, "--strategies", "linucb,local-only", "--rounds", "3"], timeout=60)
    assert code == 2 and "another setting" in text, text
    assert sorted(p.name for p in (out / "cells").iterdir()) == cells


@pytest.mark.slow
@pytest.mark.timeout(3600)  # two ML federations on 2 cores: minutes each (docs/results.md §6)
def test_ml_benchmark_small(tmp_path, procs) -> None:
    """2 strategies, 2 rounds, 1 seed, 4 tiny ML daemons (two families): the real thing in
    small, with equal compute and a quiet terminal."""
    out = tmp_path / "fed"
    args = ["--agent", "ml", "--nodes", "4", "--rounds", "2", "--seeds", "0", "--strategies", "linucb,local-only",
            "--models", "tiny-qwen2,tiny-gpt2", "--budget", "fast", "--paired", "linucb,local-only"]
    code, text = _bench(procs, out, args, timeout=3000)
    assert code == 0, text
    doc = _check_summary(out, ["linucb", "local-only"], nodes=4, rounds=2, agent="ml")
    for cell in doc["cells"]:
        assert all(a["steps_trained"] > 0 for a in cell["agents"]), cell["agents"]
    for noise in ("Loading weights", "Warning", "it/s]"):
        assert noise not in text, f"library output on the terminal: {noise!r}\n{text}"
    code, text = _bench(procs, out, args, timeout=300)
    assert code == 0 and text.count("finished earlier") == 2, text
    steps = {c["strategy"]: [a["steps_trained"] for a in c["agents"]] for c in doc["cells"]}
    assert steps["linucb"] == steps["local-only"], steps  # equal compute, the last round included
