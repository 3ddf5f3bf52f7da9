"""``knexa-harness compare``: one population, several strategies, several seeds.

Every (strategy, seed) run is a complete ``up`` on **fresh homes** (new keys, new CPM
database, agents rebuilt from the same ``(seed, index)``), so strategies see the same
population and never share learned state. Runs execute one after another — a fair
comparison on 2 shared cores needs the machine to itself.

Per strategy we report mean ± sample std over seeds of: final mean pass@1, cumulative
raw reward, gain (final − first-round mean pass@1) — definitions in ``harness.results``.
``compare.json`` holds every run's summary and per-round curve; ``compare.png`` plots
mean pass@1 per round per strategy (mean ± std over seeds).
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
        outcome: RunOutcome = run_up(replace(base, out=run_out, strategy=strategy, seed=seed), console)
        runs.append(run_entry(strategy, seed, run_out, outcome))
        if outcome.exit_code != EXIT_OK:
            console.print(f"[red]{strategy} seed {seed}: {outcome.status}: {outcome.message}[/red]")
            exit_code = EXIT_RUNTIME if exit_code == EXIT_OK else exit_code
        if outcome.status == "interrupted":
            exit_code = outcome.exit_code
            break
    doc = compare_document(base, strategies, seeds, runs, duration_s=time.time() - started)
    R.write_json(out / "compare.json", doc)
    R.plot_compare(out / "compare.png", {s: [r["curve"] for r in runs if r["strategy"] == s] for s in strategies})
    print_table(console, doc)
    console.print(f"compare.json and compare.png in {out}")
    return exit_code, doc


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
        "curve": [r.get("mean_pass1") for r in doc.get("rounds", [])],
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
