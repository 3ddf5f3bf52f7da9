"""Synthetic matchmaking benchmark (the honest version of the paper's Fig. 2).

One process, the real ``cpm`` code (strategies, bandit, matching) and the
``knexad.synthetic`` world. Per seed one population is drawn; every method runs on its
*own deep copy* of that same population, with the same learning rule, the same number of
rounds and pairs. Agents improve (and forget) over rounds, so the best partner changes.
Rewards reach the bandit only the way they would in the system: teacher ``teach`` →
student ``learn`` → ``LearnResult`` + package KB → ``Feedback`` → ``update``.

Metrics per method (mean ± std over seeds):
* cumulative true gain — Σ over rounds and pairs of the student's *true* validation-loss
  decrease (no measurement noise);
* gain over random (%), fraction of oracle — per seed, from cumulative true gain;
* mean JS divergence (bits) of the chosen pairs' data histograms;
* gain curve — per round, the true gain summed over the round's pairs (mean over seeds);
* regret — per round, (value of the oracle's greedy matching on *this method's current
  world*) − (expected value of the pairs it chose), values = expected gain − δ·KB;
  reported cumulatively per round.

Usage: ``python -m harness.sim --clients 32 --rounds 100 --seeds 5 --heterogeneity high``.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import time
from typing import Any, Sequence

import click
import numpy as np

from cpm.bandit import DELTA_PER_KB as BANDIT_DELTA_PER_KB
import structlog

from cpm import features as F
from cpm.strategies import DEFAULT_ARMS, Feedback, OracleStrategy, make_strategy
from knexad.agent_api import N_CATEGORIES, TeachRequest
from knexad.synthetic import (
    TRANSFER_SET_SIZE,
    SyntheticAgent,
    expected_gain_matrix,
    loss,
    make_population,
    package_kb,
)

log = structlog.get_logger(__name__)

HETEROGENEITY = {"high": 0.1, "low": 10.0}
DEFAULT_METHODS = ("linucb", "random", "heuristic", "oracle")
DELTA_PER_KB = BANDIT_DELTA_PER_KB  # the CPM's δ, so sim rewards match the node's


def _alpha(heterogeneity: str | float) -> float:
    if isinstance(heterogeneity, str):
        if heterogeneity in HETEROGENEITY:
            return HETEROGENEITY[heterogeneity]
        return float(heterogeneity)
    return float(heterogeneity)


def _transfer_ids(round_: int, n_transfer: int) -> tuple[int, ...]:
    """Prompts for one round's packages, rotating through the transfer set.

    Why balanced: the oracle's ``expected_gain`` assumes a category-balanced package. Item
    j takes category j mod 12 (prompt i is category i mod 12) and the round's next prompt
    of that category, so every category appears n_transfer // 12 times when n_transfer is
    a multiple of 12. (A plain window (r·n + j) mod 128 wraps around the 128 prompts —
    128 is not a multiple of 12 — and then repeats some categories and drops others.)
    """
    per_cat = n_transfer // N_CATEGORIES
    ids = []
    for j in range(n_transfer):
        c, rep = j % N_CATEGORIES, j // N_CATEGORIES
        count = len(range(c, TRANSFER_SET_SIZE, N_CATEGORIES))  # prompts of category c
        ids.append(c + N_CATEGORIES * ((round_ * max(1, per_cat) + rep) % count))
    return tuple(ids)


def _arm_kb(agent: SyntheticAgent, n_transfer: int) -> np.ndarray:
    """Package size per arm (KB), measured on a real package: the oracle's cost term."""
    return np.array([
        package_kb(agent.teach(TeachRequest("kb-probe", 0, _transfer_ids(0, n_transfer), arm)))
        for arm in DEFAULT_ARMS
    ])


def _reward_matrices(agents: list[SyntheticAgent], arm_kb: np.ndarray) -> np.ndarray:
    """(K, N, N) expected reward γ·gain − δ·KB for every ordered pair and arm."""
    states = [a.state for a in agents]
    return np.stack([expected_gain_matrix(states, arm, agents[0].params) - DELTA_PER_KB * arm_kb[k]
                     for k, arm in enumerate(DEFAULT_ARMS)])


def run_method(method: str, agents: list[SyntheticAgent], rounds: int, k_pairs: int, seed: int,
               n_transfer: int = 12, strategy_kw: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one method on ``agents`` (mutated in place: pass a deep copy)."""
    n = len(agents)
    ids = [a.agent_id for a in agents]
    index = {aid: i for i, aid in enumerate(ids)}
    arm_kb = _arm_kb(agents[0], n_transfer)
    box: dict[str, np.ndarray] = {}
    if method == "oracle":
        strat = OracleStrategy(matrix_fn=lambda k: box["R"][k], n_arms=len(DEFAULT_ARMS))
    else:
        strat = make_strategy(method, **(strategy_kw or {}))
    rng = np.random.default_rng([seed, 1])
    gains, regrets, js_all = [], [], []
    oracle_helper = OracleStrategy(matrix_fn=lambda k: box["R"][k], n_arms=len(DEFAULT_ARMS))
    for r in range(rounds):
        P = np.array([a.profile() for a in agents])
        box["R"] = _reward_matrices(agents, arm_kb)
        best = oracle_helper.match(n, k_pairs)
        best_value = float(best.score.sum())
        pairs = strat.select(P, ids, r, k_pairs, rng)
        chosen_value = 0.0
        round_gain = 0.0
        for i, pair in enumerate(pairs):
            t, s = index[pair.teacher], index[pair.student]
            chosen_value += float(box["R"][pair.arm, t, s])
            js_all.append(float(F.js_divergence(P[t, F.HIST], P[s, F.HIST])))
            arm = DEFAULT_ARMS[pair.arm]
            pkg = agents[t].teach(TeachRequest(f"r{r}-{i}", r, _transfer_ids(r, n_transfer), arm, agents[s].family))
            kb = package_kb(pkg)
            true_pre = loss(agents[s].state)
            res = agents[s].learn(pkg, arm)
            round_gain += true_pre - loss(agents[s].state)
            strat.update(pair, Feedback(res.loss_pre, res.loss_post, kb))
        for a in agents:
            a.end_round()
        gains.append(round_gain)
        regrets.append(best_value - chosen_value)
    return {
        "cum_gain": float(np.sum(gains)),
        "gain_per_round": gains,
        "regret_per_round": regrets,
        "cum_regret": np.cumsum(regrets).tolist(),
        "mean_js": float(np.mean(js_all)) if js_all else 0.0,
        "final_pass1": float(np.mean([a.evaluate()["pass@1"] for a in agents])),
    }


def _ms(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0}


def run_sim(n_clients: int, rounds: int, seeds: int | Sequence[int], heterogeneity: str | float,
            methods: Sequence[str] = DEFAULT_METHODS, k_pairs: int | None = None,
            n_transfer: int = 12, linucb_kw: dict[str, Any] | None = None) -> dict[str, Any]:
    """All methods × seeds on copies of the same population per seed → summary dict."""
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    alpha = _alpha(heterogeneity)
    kp = n_clients // 2 if k_pairs is None else int(k_pairs)
    per: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    t0 = time.perf_counter()
    for seed in seed_list:
        base = make_population(n_clients, alpha=alpha, seed=seed)
        for m in methods:
            kw = linucb_kw if m == "linucb" else None
            per[m].append(run_method(m, copy.deepcopy(base), rounds, kp, seed, n_transfer, kw))
    out: dict[str, Any] = {
        "config": {"clients": n_clients, "rounds": rounds, "seeds": seed_list, "heterogeneity": heterogeneity,
                   "dirichlet_alpha": alpha, "k_pairs": kp, "n_transfer": n_transfer,
                   "methods": list(methods), "linucb_kw": linucb_kw or {}},
        "methods": {},
    }
    for m in methods:
        runs = per[m]
        g = [r["cum_gain"] for r in runs]
        res: dict[str, Any] = {
            "cum_gain": _ms(g),
            "mean_js": _ms([r["mean_js"] for r in runs]),
            "final_pass1": _ms([r["final_pass1"] for r in runs]),
            "cum_regret_final": _ms([r["cum_regret"][-1] for r in runs]),
            "cum_regret_curve": np.mean([r["cum_regret"] for r in runs], axis=0).tolist(),
            "gain_curve": np.mean([r["gain_per_round"] for r in runs], axis=0).tolist(),
            "per_seed_cum_gain": g,
        }
        if "random" in per:
            res["gain_over_random_pct"] = _ms([100.0 * (a["cum_gain"] / b["cum_gain"] - 1.0)
                                               for a, b in zip(runs, per["random"])])
        if "oracle" in per:
            res["frac_of_oracle"] = _ms([a["cum_gain"] / b["cum_gain"] for a, b in zip(runs, per["oracle"])])
        out["methods"][m] = res
    out["seconds"] = time.perf_counter() - t0
    log.info("sim.done", clients=n_clients, rounds=rounds, seeds=len(seed_list), seconds=round(out["seconds"], 2))
    return out


def grid(clients: Sequence[int] = (8, 16, 32, 64), heterogeneity: Sequence[str] = ("high", "low"),
         rounds: int = 100, seeds: int = 5, **kw: Any) -> list[dict[str, Any]]:
    """The Fig. 2 grid: N × heterogeneity."""
    return [run_sim(n, rounds, seeds, h, **kw) for h in heterogeneity for n in clients]


def format_table(result: dict[str, Any]) -> str:
    c = result["config"]
    seeds = c["seeds"]
    first = f" ({seeds[0]}…{seeds[-1]})" if seeds and (seeds[0] != 0 or len(seeds) > 1) else ""
    kw = "".join(f" {k}={v}" for k, v in sorted(c.get("linucb_kw", {}).items()))
    lines = [f"clients={c['clients']} rounds={c['rounds']} seeds={len(seeds)}{first} "
             f"heterogeneity={c['heterogeneity']} (Dirichlet α={c['dirichlet_alpha']}) k_pairs={c['k_pairs']}"
             + (f" linucb:{kw}" if kw else ""),
             f"{'method':<11}{'cum gain':>18}{'vs random %':>18}{'of oracle':>16}{'mean JS':>9}{'cum regret':>12}"]
    for m, r in result["methods"].items():
        g, v, o = r["cum_gain"], r.get("gain_over_random_pct"), r.get("frac_of_oracle")
        vs = f"{v['mean']:+.1f} ± {v['std']:.1f}" if v else "-"
        of = f"{o['mean']:.3f} ± {o['std']:.3f}" if o else "-"
        lines.append(f"{m:<11}{g['mean']:>10.3f} ± {g['std']:<5.3f}{vs:>18}{of:>16}"
                     f"{r['mean_js']['mean']:>9.3f}{r['cum_regret_final']['mean']:>12.3f}")
    return "\n".join(lines)


LINUCB_PARAMS = {"lam": float, "beta0": float, "beta_schedule": str, "tau": float, "decay": float,
                 "discount": float}


def parse_linucb_params(items: Sequence[str]) -> dict[str, Any]:
    """``("lam=0.1", "beta0=2")`` → ``{"lam": 0.1, "beta0": 2.0}``; ValueError on anything else."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in LINUCB_PARAMS:
            raise ValueError(f"--linucb wants KEY=VALUE with KEY in {sorted(LINUCB_PARAMS)}, got {item!r}")
        try:
            out[key] = LINUCB_PARAMS[key](value.strip())
        except ValueError:
            raise ValueError(f"--linucb {key}: bad value {value!r}") from None
    return out


# -h like every KNEXA command; set here too because click caches a command's help option
# on first use, so standalone use (python -m harness.sim) must not differ from nested.
@click.command("sim", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--clients", type=int, default=32, show_default=True)
@click.option("--rounds", type=int, default=100, show_default=True)
@click.option("--seeds", type=int, default=5, show_default=True)
@click.option("--first-seed", type=int, default=0, show_default=True,
              help="seeds are FIRST-SEED … FIRST-SEED+SEEDS−1 (tune on other seeds than you report)")
@click.option("--heterogeneity", default="high", show_default=True, help="high (α=0.1), low (α=10) or a number")
@click.option("--methods", default=",".join(DEFAULT_METHODS), show_default=True)
@click.option("--k-pairs", type=int, default=None, help="pairs per round (default clients/2)")
@click.option("--linucb", "linucb_params", multiple=True, metavar="KEY=VALUE",
              help="LinUCB parameter for this run, repeatable: lam, beta0, beta_schedule, tau, decay, discount")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def sim_command(clients: int, rounds: int, seeds: int, first_seed: int, heterogeneity: str, methods: str,
                k_pairs: int | None, linucb_params: tuple[str, ...], as_json: bool) -> None:
    """Synthetic matchmaking benchmark: every method on its own copy of the same world."""
    if clients < 2 or rounds < 1 or seeds < 1:
        raise click.UsageError("need clients ≥ 2, rounds ≥ 1, seeds ≥ 1")
    ms = tuple(m.strip() for m in methods.split(",") if m.strip())
    try:
        _alpha(heterogeneity)
    except ValueError:
        raise click.UsageError("heterogeneity must be high, low or a number") from None
    try:
        kw = parse_linucb_params(linucb_params)
        res = run_sim(clients, rounds, range(first_seed, first_seed + seeds), heterogeneity, ms, k_pairs,
                      linucb_kw=kw or None)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    click.echo(json.dumps(res) if as_json else format_table(res))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m harness.sim``: logs go to stderr (INFO) so ``--json`` stdout stays pure."""
    if not structlog.is_configured():
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr),
                            wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    try:
        sim_command.main(args=list(argv) if argv is not None else None, prog_name="knexa-harness sim",
                         standalone_mode=False)
    except click.UsageError as e:
        e.show()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
