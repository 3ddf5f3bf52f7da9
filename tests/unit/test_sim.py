"""Synthetic benchmark: determinism, ordering of methods, CLI."""

from __future__ import annotations

import json

import pytest
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


def test_packages_are_category_balanced_every_round() -> None:
    """The oracle's expected gain assumes balanced packages; a window over the 128 prompts
    wraps (128 is not a multiple of 12) and would drop categories in some rounds."""
    from collections import Counter

    from harness.sim import _transfer_ids
    from knexad.synthetic import TRANSFER_SET_SIZE

    for n in (12, 24):
        seen = set()
        for r in range(64):
            ids = _transfer_ids(r, n)
            assert all(0 <= i < TRANSFER_SET_SIZE for i in ids) and len(set(ids)) == n
            assert Counter(i % 12 for i in ids) == {c: n // 12 for c in range(12)}, (r, ids)
            seen.update(ids)
        assert len(seen) == TRANSFER_SET_SIZE  # the rotation visits every prompt


def test_first_seed_and_linucb_params_reach_the_run() -> None:
    runner = CliRunner()
    args = ["--clients", "6", "--rounds", "4", "--seeds", "2", "--methods", "linucb", "--json"]
    res = runner.invoke(sim_command, [*args, "--first-seed", "7", "--linucb", "lam=0.5", "--linucb", "beta0=2"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output.strip().splitlines()[-1])
    assert doc["config"]["seeds"] == [7, 8]
    assert doc["config"]["linucb_kw"] == {"lam": 0.5, "beta0": 2.0}
    same = run_sim(6, 4, [7, 8], "high", methods=("linucb",), linucb_kw={"lam": 0.5, "beta0": 2.0})
    assert doc["methods"]["linucb"]["per_seed_cum_gain"] == same["methods"]["linucb"]["per_seed_cum_gain"]
    other = run_sim(6, 4, [7, 8], "high", methods=("linucb",), linucb_kw={"lam": 5.0, "beta0": 0.1})
    assert other["methods"]["linucb"]["per_seed_cum_gain"] != same["methods"]["linucb"]["per_seed_cum_gain"]
    for bad in ("lam", "gamma=1", "lam=x", "beta_schedule=no"):  # not KEY=VALUE, unknown key, bad values
        assert runner.invoke(sim_command, [*args, "--linucb", bad]).exit_code == 2, bad


def test_gain_curve_adds_up_to_the_cumulative_gain() -> None:
    r = run_sim(8, 6, [0, 1], "high", methods=("linucb", "oracle"))
    for m in r["methods"].values():
        assert len(m["gain_curve"]) == 6
        assert sum(m["gain_curve"]) == pytest.approx(m["cum_gain"]["mean"], rel=1e-9)
