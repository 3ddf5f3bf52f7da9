"""Synthetic benchmark: determinism, ordering of methods, CLI."""

from __future__ import annotations

import json

from click.testing import CliRunner

from harness.sim import main, run_sim, sim_command


def _small(methods: tuple[str, ...]) -> dict:
    return run_sim(12, 30, [0, 1], "high", methods=methods)


def test_deterministic_for_a_seed() -> None:
    a = run_sim(8, 6, [3], "high", methods=("linucb", "random"))
    b = run_sim(8, 6, [3], "high", methods=("linucb", "random"))
    assert a["methods"] == b["methods"]


def test_linucb_beats_random_and_oracle_is_ceiling_high_heterogeneity() -> None:
    r = _small(("linucb", "random", "heuristic", "oracle"))
    m = r["methods"]
    assert m["linucb"]["gain_over_random_pct"]["mean"] > 30.0
    assert m["oracle"]["cum_gain"]["mean"] > m["linucb"]["cum_gain"]["mean"] > m["random"]["cum_gain"]["mean"]
    assert m["oracle"]["cum_regret_final"]["mean"] <= 1e-9
    assert m["linucb"]["cum_regret_final"]["mean"] < m["random"]["cum_regret_final"]["mean"]
    curve = m["linucb"]["cum_regret_curve"]
    assert len(curve) == 30 and curve[-1] >= curve[0]


def test_every_method_gets_its_own_copy_of_the_same_population() -> None:
    r = run_sim(8, 3, [0], "low", methods=("local-only", "local-only"))
    assert r["methods"]["local-only"]["cum_gain"]["mean"] == 0.0


def test_cli_json_and_usage_errors() -> None:
    runner = CliRunner()
    res = runner.invoke(sim_command, ["--clients", "6", "--rounds", "3", "--seeds", "1", "--json",
                                      "--methods", "linucb,random"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output.strip().splitlines()[-1])
    assert set(doc["methods"]) == {"linucb", "random"} and doc["config"]["clients"] == 6
    bad = runner.invoke(sim_command, ["--heterogeneity", "medium"])
    assert bad.exit_code == 2
    assert runner.invoke(sim_command, ["--methods", "nope", "--rounds", "1", "--clients", "4"]).exit_code == 2
    assert main(["--clients", "4", "--rounds", "2", "--seeds", "1", "--methods", "random"]) == 0
    assert main(["--clients", "1"]) == 2
