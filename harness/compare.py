"""``knexa-harness compare``: one population, several strategies, several seeds.

Every (strategy, seed) run is a complete ``up`` on **fresh homes** (new keys, new CPM
database, agents rebuilt from the same ``(seed, index)``), so strategies see the same
population and never share learned state. Runs execute one after another — a fair
comparison on 2 shared cores needs the machine to itself.

Per strategy we report mean ± sample std over seeds of: final mean pass@1, cumulative
raw reward, gain (final − first-round mean pass@1) — definitions in ``harness.results``.
``compare.json`` holds every run's summary and curve (mean pass@1 after r rounds,
r = 0 … R) and, per strategy, the aggregated curve; ``compare.png`` draws exactly that
aggregate — its last point *is* the table's final pass@1, over the same completed runs
(``harness.plots`` explains the layout). ``benchmarks/federation.py`` runs its cells
through ``run_cell`` too.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog

from harness import results as R
from harness.federation import EXIT_OK, EXIT_RUNTIME, RunOutcome, UpConfig, run_up

log = structlog.get_logger(__name__)

METRICS = ("final_pass1", "cumulative_reward", "gain")


def run_compare(base: UpConfig, strategies: Sequence[str], seeds: Sequence[int], console: Any) -> tuple[int, dict[str, Any]]:
    """Run every (strategy, seed); return (exit code, compare document)."""
    out = Path(base.out)
    out.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    exit_code = EXIT_OK
    started = time.time()
    total = len(strategies) * len(seeds)
    for i, (strategy, seed) in enumerate(((s, sd) for s in strategies for sd in seeds), start=1):
        run_out = out / f"{strategy}-seed{seed}"
        console.rule(f"[bold]{i}/{total}: strategy {strategy}, seed {seed}")
        entry, outcome = run_cell(base, strategy, seed, run_out, console)
        runs.append(entry)
        if outcome.exit_code != EXIT_OK:
            console.print(f"[red]{strategy} seed {seed}: {outcome.status}: {outcome.message}[/red]")
            exit_code = EXIT_RUNTIME if exit_code == EXIT_OK else exit_code
        if outcome.status == "interrupted":
            exit_code = outcome.exit_code
            break
    doc = compare_document(base, strategies, seeds, runs, duration_s=time.time() - started)
    R.write_json(out / "compare.json", doc)
    plot_compare(out / "compare.png", doc)
    print_table(console, doc)
    console.print(f"compare.json and compare.png in {out}")
    return exit_code, doc


def run_cell(base: UpConfig, strategy: str, seed: int, run_out: Path, console: Any) -> tuple[dict[str, Any], RunOutcome]:
    """One complete ``up`` on fresh homes for (strategy, seed) into ``run_out``: the unit
    both ``compare`` and the federation benchmark are built from."""
    outcome: RunOutcome = run_up(replace(base, out=run_out, strategy=strategy, seed=seed), console)
    log.info("harness.compare.run.done", strategy=strategy, seed=seed, status=outcome.status,
             exit_code=outcome.exit_code)
    return run_entry(strategy, seed, run_out, outcome), outcome


def run_entry(strategy: str, seed: int, run_out: Path, outcome: RunOutcome) -> dict[str, Any]:
    doc = outcome.doc or {}
    return {
        "strategy": strategy,
        "seed": seed,
        "status": outcome.status,
        "exit_code": outcome.exit_code,
        "out": str(run_out),
        "rounds_completed": doc.get("rounds_completed", 0),
        "summary": doc.get("summary", {}),
        "curve": R.curve_after_rounds(doc),
    }


def aggregate(runs: Sequence[dict[str, Any]], strategies: Sequence[str]) -> list[dict[str, Any]]:
    """Per strategy: mean and std over its *completed* runs of each metric."""
    table = []
    for strategy in strategies:
        mine = [r for r in runs if r["strategy"] == strategy]
        ok = [r for r in mine if r["status"] == "ok"]
        row: dict[str, Any] = {"strategy": strategy, "runs": len(mine), "ok": len(ok)}
        for metric in METRICS:
            mu, sd = R.mean_std(r["summary"].get(metric) for r in ok)
            row[f"{metric}_mean"], row[f"{metric}_std"] = mu, sd
        row["pairs_mean"] = R.mean_or_none(r["summary"].get("pairs") for r in ok)
        curve = R.aggregate_curves([r["curve"] for r in ok], spread="std")
        row["curve_mean"], row["curve_lo"], row["curve_hi"] = curve["mean"], curve["lo"], curve["hi"]
        table.append(row)
    return table


def compare_document(base: UpConfig, strategies: Sequence[str], seeds: Sequence[int], runs: list[dict[str, Any]],
                     duration_s: float) -> dict[str, Any]:
    return {
        "schema": R.COMPARE_SCHEMA,
        # per-run strategy and seed live in ``runs``; the base config's would only mislead
        "config": {**{k: v for k, v in base.to_json().items() if k not in ("strategy", "seed")},
                   "strategies": list(strategies), "seeds": list(seeds)},
        "runs": runs,
        "table": aggregate(runs, strategies),
        "duration_s": duration_s,
    }


def plot_compare(path: Path, doc: dict[str, Any]) -> Path:
    """compare.png from the document's own table (the numbers ``print_table`` prints)."""
    from harness.plots import plot_curves

    cfg = doc["config"]
    curves = [{"strategy": row["strategy"], "x": list(range(len(row["curve_mean"]))), "mean": row["curve_mean"],
               "lo": row["curve_lo"], "hi": row["curve_hi"], "n": row["ok"]} for row in doc["table"]]
    title = (f"mean pass@1 by strategy · {cfg['nodes']} {cfg['agent']} nodes · {cfg['rounds']} rounds · "
             f"seeds {','.join(map(str, cfg['seeds']))}")
    return plot_curves(path, curves, title, band="line: mean over completed runs (n), band: ± 1 sample std")


def _pm(mu: float | None, sd: float | None) -> str:
    if mu is None:
        return "–"
    return f"{mu:.3f} ± {sd or 0.0:.3f}"


def print_table(console: Any, doc: dict[str, Any]) -> None:
    from rich.table import Table

    seeds = doc["config"]["seeds"]
    table = Table(title=f"strategies · {doc['config']['nodes']} nodes · {doc['config']['rounds']} rounds · "
                        f"seeds {','.join(map(str, seeds))} (mean ± std)")
    table.add_column("strategy")
    table.add_column("final pass@1", justify="right")
    table.add_column("cumulative reward", justify="right")
    table.add_column("gain", justify="right")
    table.add_column("pairs", justify="right")
    table.add_column("runs ok", justify="right")
    for row in doc["table"]:
        pairs = row["pairs_mean"]
        table.add_row(
            row["strategy"],
            _pm(row["final_pass1_mean"], row["final_pass1_std"]),
            _pm(row["cumulative_reward_mean"], row["cumulative_reward_std"]),
            _pm(row["gain_mean"], row["gain_std"]),
            "–" if pairs is None else f"{pairs:.1f}",
            f"{row['ok']}/{row['runs']}",
        )
    console.print(table)


def print_side_by_side(console: Any, doc: dict[str, Any]) -> None:
    """Per agent, the same population under each strategy (the first seed): initial
    pass@1, then final pass@1 and steps trained per strategy — what the demo is for.
    Read from each run's results.json; a run without one shows dashes."""
    from rich.table import Table

    seed = doc["config"]["seeds"][0]
    runs = {r["strategy"]: r for r in doc["runs"] if r["seed"] == seed}
    agents: dict[str, dict[str, Any]] = {}
    for strategy, run in runs.items():
        path = Path(run["out"]) / "results.json"
        if path.exists():
            for a in R.load_results(path)["agents"]:
                agents.setdefault(a["name"], {"family": a["family"], "initial": a["pass1_initial"]})[strategy] = a
    # synthetic agents train inside their own model and report no optimizer steps
    steps = any(a.get("steps_trained") for info in agents.values() for s, a in info.items() if s in runs)
    table = Table(title=f"the same agents under each strategy (seed {seed}): pass@1 first → final"
                        + (", optimizer steps trained" if steps else ""))
    table.add_column("node")
    table.add_column("family")
    table.add_column("pass@1 first", justify="right")
    for strategy in runs:
        table.add_column(f"{strategy} final", justify="right")
        if steps:
            table.add_column("steps", justify="right")
    for name in sorted(agents):
        info = agents[name]
        cells = [name, info["family"], R.fmt(info["initial"])]
        for strategy in runs:
            a = info.get(strategy)
            cells.append(R.fmt(a["pass1_final"]) if a else "–")
            if steps:
                cells.append(str(a.get("steps_trained", 0)) if a else "–")
        table.add_row(*cells)
    console.print(table)
    finals = ", ".join(f"{s} {R.fmt(r['summary'].get('final_pass1'))}" for s, r in runs.items())
    first = next((r["summary"].get("initial_pass1") for r in runs.values() if r["summary"]), None)
    console.print(f"mean pass@1 {R.fmt(first)} at the start → {finals} after {doc['config']['rounds']} rounds "
                  f"(one seed, {doc['config']['nodes']} agents: an illustration, not a ranking — "
                  f"benchmarks/federation.py measures that)", soft_wrap=True)
