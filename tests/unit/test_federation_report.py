"""benchmarks.federation(_report): the numbers of the federation table and the guards
around resuming a long run (issue 16 §1), without running a federation."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import federation as F
from benchmarks import federation_report as FR

FP = {"agent": "synthetic", "nodes": 2, "rounds": 2}


def _doc(initial: float, mid: float, final: float, kb: float = 2.0, steps: int = 10) -> dict:
    """A minimal results.json of a 2-agent, 2-round run."""
    return {
        "rounds_completed": 2,
        "rounds": [{"round": 1, "pairs": 1, "feedback": 1, "failures": 0, "mean_pass1": initial,
                    "mean_raw_reward": 0.1, "bytes": round(kb * 1024), "agents_reporting": 2},
                   {"round": 2, "pairs": 1, "feedback": 1, "failures": 0, "mean_pass1": mid,
                    "mean_raw_reward": 0.1, "bytes": round(kb * 1024), "agents_reporting": 2}],
        "agents": [{"peer": "A", "name": "node-00", "family": "gpt2", "pass1_initial": initial,
                    "pass1_final": final, "pass1_rounds": [initial, mid], "steps_trained": steps},
                   {"peer": "B", "name": "node-01", "family": "qwen2", "pass1_initial": initial,
                    "pass1_final": final, "pass1_rounds": [initial, mid], "steps_trained": steps}],
        "pairs": [{"round": r, "teacher": "A", "student": "B", "kb": kb} for r in (1, 2)],
        "summary": {"initial_pass1": initial, "final_pass1": final, "gain": final - initial, "pairs": 2,
                    "bytes": round(2 * kb * 1024), "cumulative_reward": 0.2},
        "duration_s": 30.0,
    }


def _cells() -> list[dict]:
    finals = {"linucb": (0.30, 0.34, 0.40), "random": (0.28, 0.30, 0.33), "local-only": (0.25, 0.26, 0.27)}
    out = []
    for strategy, values in finals.items():
        for seed, final in enumerate(values):
            kb = 0.0 if strategy == "local-only" else 2.0
            out.append(FR.cell_record(strategy, seed, FP, "ok", 0, "", _doc(0.2, 0.22, final, kb=kb)))
    return out


def test_cell_record_has_run_round_and_agent_numbers() -> None:
    cell = FR.cell_record("linucb", 3, FP, "ok", 0, "", _doc(0.2, 0.3, 0.4))
    assert cell["curve"] == [0.2, 0.3, 0.4] and cell["auc_pass1"] == pytest.approx((0.25 + 0.35) / 2)
    assert (cell["initial_pass1"], cell["final_pass1"], cell["bytes"], cell["steps_trained"]) == (0.2, 0.4, 4096, 20)
    a, b = cell["agents"]
    assert (a["bytes_out"], a["bytes_in"], b["bytes_in"]) == (4096, 0, 4096)
    assert [r["round"] for r in cell["rounds"]] == [1, 2] and cell["rounds"][0]["bytes"] == 2048
    failed = FR.cell_record("linucb", 3, FP, "failed", 4, "never ready", None)
    assert failed["final_pass1"] is None and failed["curve"] == [] and failed["agents"] == []


def test_table_gain_over_local_ratio_to_random_and_bytes_per_point() -> None:
    rows = {r["strategy"]: r for r in FR.table_rows(_cells(), ["linucb", "random", "local-only"])}
    lin, rnd, loc = rows["linucb"], rows["random"], rows["local-only"]
    assert lin["ok"] == 3 and lin["seeds"] == [0, 1, 2]
    assert lin["final_pass1"] == pytest.approx((0.30 + 0.34 + 0.40) / 3)
    diffs = [0.30 - 0.25, 0.34 - 0.26, 0.40 - 0.27]  # paired by seed
    assert lin["gain_vs_local"] == pytest.approx(sum(diffs) / 3)
    sd = math.sqrt(sum((d - sum(diffs) / 3) ** 2 for d in diffs) / 2)
    assert lin["gain_vs_local_ci95"] == pytest.approx(4.303 * sd / math.sqrt(3))
    assert lin["vs_random"] == pytest.approx(lin["gain_vs_local"] / rnd["gain_vs_local"])
    assert lin["bytes_per_001"] == pytest.approx(4096 / (lin["gain_vs_local"] / 0.01))
    assert loc["gain_vs_local"] == 0.0 and loc["bytes_per_001"] is None
    assert lin["curve"]["mean"][-1] == pytest.approx(lin["final_pass1"])  # plot and table agree
    assert lin["gain_curve"]["mean"][-1] == pytest.approx(lin["gain_vs_local"])
    cells = FR.format_cells(lin)
    assert cells[2] == f"{lin['final_pass1']:.3f} ± {lin['final_pass1_ci95']:.3f}"
    assert cells[3].startswith(f"+{lin['gain_vs_local']:.3f} ± ")


def test_paired_difference_counts_positive_seeds_and_ignores_unfinished() -> None:
    cells = _cells()
    cells[0] = {**cells[0], "status": "failed"}  # linucb seed 0 did not finish
    p = FR.paired(cells, "linucb", "random")
    assert p["n"] == 2 and p["positive"] == 2 and set(p["per_seed"]) == {"1", "2"}
    assert p["mean"] == pytest.approx(((0.34 - 0.30) + (0.40 - 0.33)) / 2)


def test_quick_defaults_and_explicit_options_win(tmp_path) -> None:
    plan = F.build_plan(F.parser().parse_args(["--quick", "--out", str(tmp_path), "--rounds", "3"]))
    assert (plan.agent, plan.nodes, plan.rounds, plan.seeds) == ("synthetic", 4, 3, (0,))
    assert plan.strategies == ("linucb", "local-only")
    full = F.build_plan(F.parser().parse_args(["--out", str(tmp_path)]))
    assert (full.agent, full.nodes, full.rounds, full.seeds) == ("ml", 8, 12, F.REPORT_SEEDS)
    assert full.fingerprint()["node_models"] == ["tiny-qwen2", "tiny-gpt2", "tiny-neox", "tiny-bloom"] * 2
    assert full.fingerprint()["alpha"] == 0.1


@pytest.mark.parametrize("argv, words", [
    (["--seeds", "0,100"], "both report and tuning"),
    (["--strategies", "linucb,oracle"], "unknown"),
    (["--strategies", "linucb,linucb"], "repeated"),
    (["--models", "gpt-17"], "--models"),
    (["--quick", "--publish"], "--publish"),
    (["--tuning", "--publish"], "--publish"),
    (["--paired", "linucb"], "--paired"),
])
def test_refused_requests(tmp_path, argv, words) -> None:
    with pytest.raises(F.UsageError, match=words.replace("-", r"\-")):
        F.build_plan(F.parser().parse_args(["--out", str(tmp_path), *argv]))


def test_tuning_seeds_run_apart(tmp_path) -> None:
    plan = F.build_plan(F.parser().parse_args(["--quick", "--out", str(tmp_path), "--tuning"]))
    assert plan.run_seeds == F.TUNING_SEEDS and plan.root == tmp_path / "tuning"
    assert plan.config()["purpose"] == "tuning" and plan.config()["report_seeds"] == [0]


def test_resume_refuses_cells_of_another_setting(tmp_path) -> None:
    plan = F.build_plan(F.parser().parse_args(["--quick", "--out", str(tmp_path)]))
    done = F.cell_dir(plan, "linucb", 0)
    done.mkdir(parents=True)
    record = FR.cell_record("linucb", 0, plan.fingerprint(), "ok", 0, "", _doc(0.1, 0.2, 0.3))
    (done / F.CELL_FILE).write_text(json.dumps(record))
    F.check_resumable(plan)  # same setting: fine
    other = F.build_plan(F.parser().parse_args(["--quick", "--out", str(tmp_path), "--rounds", "3"]))
    with pytest.raises(F.UsageError, match="another setting"):
        F.check_resumable(other)
    assert F.main(["--quick", "--out", str(tmp_path), "--rounds", "3"]) == F.EXIT_USAGE
