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
    assert loc["gain_vs_local"] == 0.0 and loc["bytes_per_001"] is None and loc["vs_random"] is None
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


def test_daemon_overrides_are_part_of_the_setting(tmp_path) -> None:
    """A KNEXA_* variable reaches every daemon as a config override, so a cell run with one
    is another experiment: resuming without it (or with another value) is refused."""
    argv = F.parser().parse_args(["--quick", "--out", str(tmp_path)])
    plain = F.build_plan(argv, env={"HOME": "/root", "KNEXA_NETLAB_RUN_DIR": "/run/x"})
    assert "daemon_env" not in plain.fingerprint()  # cells recorded before the key still resume
    replay = F.build_plan(F.parser().parse_args(["--quick", "--out", str(tmp_path)]),
                          env={"KNEXA_AGENT_REPLAY_KNOWLEDGE": "true", "PATH": "/bin"})
    assert replay.fingerprint()["daemon_env"] == {"KNEXA_AGENT_REPLAY_KNOWLEDGE": "true"}
    done = F.cell_dir(replay, "linucb", 0)
    done.mkdir(parents=True)
    record = FR.cell_record("linucb", 0, replay.fingerprint(), "ok", 0, "", _doc(0.1, 0.2, 0.3))
    (done / F.CELL_FILE).write_text(json.dumps(record))
    F.check_resumable(replay)
    for other in (plain, F.build_plan(F.parser().parse_args(["--quick", "--out", str(tmp_path)]),
                                      env={"KNEXA_AGENT_REPLAY_KNOWLEDGE": "false"})):
        with pytest.raises(F.UsageError, match="daemon_env"):
            F.check_resumable(other)


def _feedback_cell(seed: int, rows: list[tuple[int, str, float | None, bool]]) -> dict:
    """A cell whose student B learned in the listed rounds: (round, student, raw reward, ok);
    B's pass@1 per round profile is 0.1, 0.3, 0.2 and 0.6 after the last round."""
    doc = _doc(0.1, 0.3, 0.6)
    doc["rounds_completed"] = 3
    doc["agents"][1]["pass1_rounds"] = [0.1, 0.3, 0.2]
    doc["agents"][1]["pass1_final"] = 0.6
    doc["pairs"] = [{"round": r, "teacher": "A", "student": s, "raw_reward": w, "ok": ok, "kb": 1.0}
                    for r, s, w, ok in rows]
    return FR.cell_record("linucb", seed, FP, "ok", 0, "", doc)


def test_reward_gain_points_pair_each_feedback_with_its_round_change() -> None:
    cell = _feedback_cell(0, [(1, "B", 0.5, True), (2, "B", -0.2, True), (3, "B", 0.9, True),
                              (1, "B", 7.0, False), (2, "A", 3.0, True), (2, "B", None, True)])
    # round 1: 0.3 − 0.1; round 2: 0.2 − 0.3; round 3 (the last): final 0.6 − 0.2; failures,
    # missing rewards and a student without a series (A's is [0.1, 0.3]: round 2 → final) are handled
    pts = FR.reward_gain_points(cell)
    assert [(w, round(g, 6)) for w, g in pts] == [(0.5, 0.2), (-0.2, -0.1), (0.9, 0.4), (3.0, 0.3)]


def test_reward_gain_correlation_pools_seeds_and_ranks_with_ties() -> None:
    cells = [_feedback_cell(0, [(1, "B", 0.5, True), (2, "B", -0.2, True)]),
             _feedback_cell(1, [(3, "B", 0.9, True)])]
    corr = FR.reward_gain_correlation(cells, "linucb")
    assert corr["n"] == 3 and corr["spearman"] == pytest.approx(1.0)
    x, y = [0.5, -0.2, 0.9], [0.2, -0.1, 0.4]
    mx, my = sum(x) / 3, sum(y) / 3
    r = sum((a - mx) * (b - my) for a, b in zip(x, y)) / math.sqrt(
        sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))
    assert corr["pearson"] == pytest.approx(r) and corr["mean_gain"] == pytest.approx(sum(y) / 3)
    anti = [_feedback_cell(0, [(1, "B", -1.0, True), (2, "B", 1.0, True), (3, "B", -2.0, True)])]
    assert FR.reward_gain_correlation(anti, "linucb")["spearman"] == pytest.approx(-1.0)
    half = [_feedback_cell(0, [(1, "B", -1.0, True), (2, "B", 1.0, True), (3, "B", 2.0, True)])]
    assert FR.reward_gain_correlation(half, "linucb")["spearman"] == pytest.approx(0.5)
    assert FR._ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    assert FR.reward_gain_correlation(cells[:1], "linucb")["pearson"] is None  # two points: no correlation
    row = next(r for r in FR.table_rows(cells, ["linucb"]) if r["strategy"] == "linucb")
    assert row["reward_gain"]["n"] == 3


def test_read_cell_takes_pairs_from_the_runs_results_when_the_record_lacks_them(tmp_path) -> None:
    cell = _feedback_cell(0, [(1, "B", 0.5, True)])
    del cell["pair_rows"]
    assert cell["pairs"] == 2  # the count of pairs stays what it was
    (tmp_path / F.CELL_FILE).write_text(json.dumps(cell))
    (tmp_path / "results.json").write_text(json.dumps({"pairs": [
        {"round": 1, "teacher": "A", "student": "B", "raw_reward": 0.5, "ok": True, "kb": 1.0, "reward": 0.1}]}))
    got = F.read_cell(tmp_path)
    assert got["pair_rows"] == [{"round": 1, "teacher": "A", "student": "B", "arm": None, "ok": True,
                             "raw_reward": 0.5, "kb": 1.0}]
    assert FR.reward_gain_points(got) == [(0.5, pytest.approx(0.2))]


@pytest.mark.parametrize(("rounds", "blocks", "spans"), [
    (12, 3, [(1, 4), (5, 8), (9, 12)]),
    (12, 5, [(1, 3), (4, 6), (7, 9), (10, 12)]),  # ⌈12/5⌉ = 3: four spans, none empty
    (5, 2, [(1, 3), (4, 5)]),
    (3, 1, [(1, 3)]),
    (2, 4, [(1, 1), (2, 2)]),
])
def test_round_blocks_cover_every_round_once(rounds: int, blocks: int, spans: list) -> None:
    got = FR.round_blocks(rounds, blocks)
    assert got == spans
    assert [r for lo, hi in got for r in range(lo, hi + 1)] == list(range(1, rounds + 1))


def test_cell_tools_refuse_unfinished_cells_and_empty_blocks(tmp_path) -> None:
    cell = tmp_path / "linucb-s100"
    cell.mkdir()
    (cell / "cell.json").write_text("{}")
    ap = FR.cell_tool_parser("benchmarks.pair_quality", "A title.\nmore")
    assert ap.description == "A title."
    assert FR.cell_tool_problem(ap.parse_args([str(cell)]), needs_export=False) is None
    missing = FR.cell_tool_problem(ap.parse_args([str(cell)]), needs_export=True)
    assert missing is not None and "cpm-export.json" in missing and str(cell) in missing
    assert FR.cell_tool_problem(ap.parse_args([str(cell), "--blocks", "0"]), needs_export=False) == "--blocks must be ≥ 1"
    (cell / "cpm-export.json").write_text("{}")
    no_blocks = FR.cell_tool_parser("benchmarks.reward_alignment", None, blocks=False)
    assert FR.cell_tool_problem(no_blocks.parse_args([str(cell)]), needs_export=True) is None
    with pytest.raises(SystemExit):
        no_blocks.parse_args([str(cell), "--blocks", "2"])


def test_publish_takes_one_clean_commit_and_every_cell() -> None:
    ok = {"status": "ok"}
    doc = {"missing": [], "cells": [ok, ok], "code_versions": ["0a82472"]}
    assert F.publish_problem(F.EXIT_OK, doc) is None
    assert "finished" in F.publish_problem(F.EXIT_RUNTIME, doc)
    assert "finished" in F.publish_problem(F.EXIT_OK, {**doc, "missing": [{"strategy": "random", "seed": 5}]})
    assert "finished" in F.publish_problem(F.EXIT_OK, {**doc, "cells": [ok, {"status": "failed"}]})
    for versions in (["0a82472", "12b83e5"], ["0a82472+dirty"], ["unrecorded"], ["unknown"], []):
        assert "one committed code version" in F.publish_problem(F.EXIT_OK, {**doc, "code_versions": versions})


def test_publish_refused_for_mixed_commits_leaves_the_published_file(tmp_path, monkeypatch, capsys) -> None:
    published = tmp_path / "published.json"
    monkeypatch.setattr(F, "PUBLISHED", published)
    argv = ["--agent", "synthetic", "--nodes", "4", "--rounds", "2", "--seeds", "0", "--strategies",
            "linucb,local-only", "--out", str(tmp_path / "out"), "--report-only", "--no-progress"]
    plan = F.build_plan(F.parser().parse_args(argv))
    for strategy, commit in (("linucb", "aaaa"), ("local-only", "bbbb")):
        done = F.cell_dir(plan, strategy, 0)
        done.mkdir(parents=True)
        record = FR.cell_record(strategy, 0, plan.fingerprint(), "ok", 0, "", _doc(0.1, 0.2, 0.3))
        (done / F.CELL_FILE).write_text(json.dumps({**record, "code": commit}))
    assert F.main([*argv, "--publish"]) == F.EXIT_RUNTIME
    assert "one committed code version" in capsys.readouterr().err and not published.exists()
    F.main(argv)
    assert json.loads((tmp_path / "out" / F.SUMMARY).read_text())["code_versions"] == ["aaaa", "bbbb"]


@pytest.mark.parametrize("curve, expected", [
    ([0.1, 0.2, 0.3, 0.4], (3, 0.0)),          # still rising: peak is the last round, no drop
    ([0.1, 0.3, 0.2, 0.15], (1, 0.15)),        # early peak, then collapse
    ([0.5, 0.3, 0.4, 0.4], (2, 0.0)),          # round 0 is not a peak; first of equal peaks
    ([0.1, None, 0.2, 0.1], (2, 0.1)),         # a missing round is skipped
    ([0.1], None), ([0.1, 0.2, None], None),   # no round after 0 / no final point
])
def test_peak_and_drop(curve, expected) -> None:
    got = FR.peak_and_drop(curve)
    assert got == (None if expected is None else (expected[0], pytest.approx(expected[1])))


def test_table_reports_drop_from_peak_per_seed_and_prints_it() -> None:
    cells = _cells()
    collapsed = {**cells[0], "curve": [0.2, 0.45, 0.30]}  # linucb seed 0 peaks in round 1
    rows = {r["strategy"]: r for r in FR.table_rows([collapsed, *cells[1:]], ["linucb", "random"])}
    lin = rows["linucb"]
    assert lin["peak_round"] == {"0": 1, "1": 2, "2": 2}
    assert lin["drop_from_peak"] == pytest.approx(0.15 / 3)
    assert rows["random"]["drop_from_peak"] == pytest.approx(0.0)
    from rich.console import Console
    console = Console(record=True, width=400)
    FR.print_table(console, {"config": {"nodes": 2, "agent": "ml", "rounds": 2, "budget": "fast", "purpose": "report",
                                        "seeds": [0, 1, 2]},
                             "table": list(rows.values()), "paired": None, "missing": []})
    text = console.export_text()
    assert "drop from peak to final pass@1: linucb 0.050 ± " in text and "(peak round s0 1, s1 2, s2 2)" in text


def test_ratio_to_random_uses_the_seeds_both_have() -> None:
    """A table still being built: heuristic has seed 0 only, random all three."""
    heur = FR.cell_record("heuristic", 0, FP, "ok", 0, "", _doc(0.2, 0.22, 0.29, kb=2.0))
    rows = {r["strategy"]: r for r in FR.table_rows([*_cells(), heur], ["linucb", "random", "heuristic", "local-only"])}
    assert rows["heuristic"]["vs_random"] == pytest.approx((0.29 - 0.25) / (0.28 - 0.25))
    assert rows["heuristic"]["vs_random_seeds"] == 1 and rows["linucb"]["vs_random_seeds"] == 3
    assert rows["random"]["vs_random"] == pytest.approx(1.0) and rows["local-only"]["vs_random_seeds"] == 0
