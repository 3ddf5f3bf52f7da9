"""``knexa-harness compare`` end to end: real CPM + daemon subprocesses per (strategy, seed).

What a user relies on: every strategy runs on the same population (same seed → same agents)
with fresh homes; the side-by-side table, ``compare.json`` and ``compare.png`` agree with
the per-run results; the exit code is 0; and no process outlives the command.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

from harness.procs import process_alive
from harness.results import COMPARE_SCHEMA
from tests.e2e.conftest import e2e_env

REPO = Path(__file__).resolve().parents[2]
HARNESS = [sys.executable, "-m", "harness.cli"]


def _compare(procs, out: Path, strategies: str, seeds: str, timeout: float) -> str:
    p = procs.start([*HARNESS, "compare", "--agent", "synthetic", "--nodes", "3", "--rounds", "2",
                     "--strategies", strategies, "--seeds", seeds, "--out", str(out), "--no-progress",
                     "--grace", "5"], name="compare", env=e2e_env(COLUMNS="160"), cwd=REPO)
    p.proc.wait(timeout=timeout)
    text = p.stdout() + p.stderr()
    assert p.returncode == 0, text
    return text


def _no_survivors(run_dir: Path) -> None:
    doc = json.loads((run_dir / "pids.json").read_text())
    roles = [c["role"] for c in doc["children"]]
    assert roles.count("cpm") == 1 and roles.count("daemon") == 3, roles
    alive = [c for c in doc["children"] if process_alive(c["pid"])]
    assert alive == [], f"children of {run_dir.name} survived compare: {alive}"


def _table_rows(text: str) -> list[list[str]]:
    """Cells of the printed table's body rows (rich draws columns with │)."""
    rows = []
    for line in text.splitlines():
        if line.count("│") >= 6:
            rows.append([c.strip() for c in line.strip().strip("│").split("│")])
    return rows


def _check(out: Path, text: str, strategies: list[str], seeds: list[int]) -> dict[str, dict]:
    """Everything compare promises; returns results.json per run directory name."""
    doc = json.loads((out / "compare.json").read_text())
    assert doc["schema"] == COMPARE_SCHEMA
    assert doc["config"]["strategies"] == strategies and doc["config"]["seeds"] == seeds
    assert "strategy" not in doc["config"] and "seed" not in doc["config"]  # per run, in doc["runs"]
    assert [(r["strategy"], r["seed"]) for r in doc["runs"]] == [(s, sd) for s in strategies for sd in seeds]
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"

    results: dict[str, dict] = {}
    for run in doc["runs"]:
        run_dir = out / f"{run['strategy']}-seed{run['seed']}"
        assert Path(run["out"]) == run_dir
        assert run["status"] == "ok" and run["exit_code"] == 0 and run["rounds_completed"] == 2
        res = json.loads((run_dir / "results.json").read_text())
        assert res["status"] == "ok" and res["rounds_completed"] == 2
        assert res["config"]["strategy"] == run["strategy"] and res["config"]["seed"] == run["seed"]
        assert run["summary"] == res["summary"]
        # the curve: after r = 0 … R rounds, from the initial value to the final evaluation
        assert run["curve"] == [res["summary"]["initial_pass1"], *[r["mean_pass1"] for r in res["rounds"][1:]],
                                res["summary"]["final_pass1"]]
        assert (run_dir / "rounds.csv").read_text().count("\n") == 3  # header + 2 rounds
        assert (run_dir / "rounds.png").read_bytes()[:4] == b"\x89PNG"
        _no_survivors(run_dir)
        results[run_dir.name] = res

    # same seed → same population under every strategy; fresh homes → fresh identities
    for seed in seeds:
        runs = [results[f"{s}-seed{seed}"] for s in strategies]
        initial = [{a["name"]: (a["family"], a["pass1_initial"]) for a in r["agents"]} for r in runs]
        assert all(i == initial[0] for i in initial), initial
        peers = [{a["peer"] for a in r["agents"]} for r in runs]
        assert all(not (p & q) for i, p in enumerate(peers) for q in peers[i + 1:])

    # the table is the mean (± sample std) of the per-run results, and it is what was printed
    assert [row["strategy"] for row in doc["table"]] == strategies
    for row in doc["table"]:
        mine = [results[f"{row['strategy']}-seed{sd}"]["summary"] for sd in seeds]
        assert row["runs"] == row["ok"] == len(seeds)
        for metric in ("final_pass1", "cumulative_reward", "gain"):
            values = [m[metric] for m in mine]
            assert row[f"{metric}_mean"] == pytest.approx(statistics.fmean(values), abs=1e-12)
            expected_std = statistics.stdev(values) if len(values) > 1 else 0.0
            assert (row[f"{metric}_std"] or 0.0) == pytest.approx(expected_std, abs=1e-12)
        assert row["curve_mean"][-1] == row["final_pass1_mean"]  # compare.png ends at the printed value
        cells = next(c for c in _table_rows(text) if c[0] == row["strategy"])
        assert cells[1] == f"{row['final_pass1_mean']:.3f} ± {row['final_pass1_std'] or 0.0:.3f}", cells
        assert cells[-1] == f"{row['ok']}/{row['runs']}", cells
    assert f"seeds {','.join(map(str, seeds))}" in text
    assert "compare.json and compare.png in" in text
    return results


def test_compare_linucb_and_random_one_seed(tmp_path, procs) -> None:
    out = tmp_path / "cmp"
    text = _compare(procs, out, "linucb,random", "3", timeout=150)
    results = _check(out, text, ["linucb", "random"], [3])
    for res in results.values():
        assert all(r["pairs"] == 1 for r in res["rounds"])  # 3 nodes: one disjoint pair per round


@pytest.mark.slow
def test_compare_three_strategies_two_seeds(tmp_path, procs) -> None:
    out = tmp_path / "cmp"
    text = _compare(procs, out, "linucb,random,local-only", "1,2", timeout=400)
    results = _check(out, text, ["linucb", "random", "local-only"], [1, 2])
    for seed in (1, 2):
        local = results[f"local-only-seed{seed}"]
        assert local["pairs"] == [] and local["summary"]["cumulative_reward"] == 0.0
