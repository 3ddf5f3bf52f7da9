"""The federation benchmark's numbers: one record per finished cell, the table over
seeds, the paired comparison, CSVs, plots and the printed table.

Pure functions of the harness's ``results.json`` documents (``harness.results``), so
the whole report can be rebuilt from ``OUT/cells/*/cell.json`` at any time
(``python -m benchmarks.federation --report-only``) and unit-tested without a
federation. Definitions (docs/results.md §Federation quotes them):

* **final pass@1** of a cell — mean over its agents of the final evaluation after the
  last round (``summary.final_pass1``); **initial** — mean of each agent's first
  profile (before any exchange).
* **curve** — mean pass@1 after r rounds, r = 0 … R (``harness.results.curve_after_rounds``);
  **AUC** — its trapezoidal area divided by R: the run's average pass@1 level.
* **bytes** — wire bytes the students received over the run (Feedback ``kb`` × 1024).
* **gain over local-only** — per seed, final pass@1 − local-only's final pass@1 at the
  same seed (the same population, the same training steps: equal compute), then mean
  and 95 % t-interval over seeds.
* **÷ random's gain** — a strategy's mean gain over local-only divided by random's, both
  over the seeds where both have a gain (all of them in a finished table; issue 16's
  goal: LinUCB's ≥ 1.5× Random-P2P's); undefined when random gained ≤ 0 there.
* **bytes per +0.01** — mean bytes ÷ (mean gain over local-only / 0.01); undefined
  when the gain is ≤ 0.
* **paired difference** a − b — per seed final(a) − final(b); mean, 95 % interval and
  how many seeds are positive.
* **reward ↔ gain** — for every Feedback a student sent in round r, its raw reward
  (Eq. 3 before normalisation) against that student's own test pass@1 change over the
  round (pass@1 in its round r + 1 profile, or its final evaluation after the last
  round, minus pass@1 in its round r profile): Pearson and Spearman correlation and n,
  pooled over a strategy's seeds. A student trains only on the package in a round it
  learns, so the change is that package's effect (issue 16 §2, "a reward that tracks
  learning").
* **drop from peak** — per seed, the curve's highest point after round 0 minus the
  final pass@1, with the round of that peak; mean and 95 % interval over seeds. The
  paper reports Central-KD collapsing after an early peak; a drop near 0 with the peak
  in the last round means no collapse (issue 16 §3, "Central-KD's trajectory").
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from harness import results as R
from p2p.files import atomic_write

CELL_SCHEMA = "knexa-bench/federation-cell/1"
SCHEMA = "knexa-bench/federation/1"
REFERENCE = "local-only"
RANDOM = "random"
ROUND_CSV = ("strategy", "seed", "round", "pairs", "feedback", "failures", "mean_pass1", "mean_raw_reward", "bytes",
             "agents_reporting")
AGENT_CSV = ("strategy", "seed", "name", "family", "pass1_initial", "pass1_final", "reward_sum", "bytes_in",
             "bytes_out", "taught", "learned", "steps_trained", "local_rounds")


def cell_record(strategy: str, seed: int, fingerprint: Mapping[str, Any], status: str, exit_code: int,
                message: str, doc: Mapping[str, Any] | None) -> dict[str, Any]:
    """Everything the report needs from one (strategy, seed) run, as written to its
    ``cell.json``: per-run numbers, per round and per agent."""
    doc = doc or {}
    summary = doc.get("summary", {})
    pairs = doc.get("pairs", [])
    curve = R.curve_after_rounds(doc)

    def kb_bytes(role: str, name: str) -> int:
        return round(sum(float(p["kb"]) for p in pairs if p.get(role) == name and p.get("kb") is not None) * 1024)

    agents = [{
        "name": a.get("name", ""), "family": a.get("family", ""), "peer": a.get("peer", ""),
        "pass1_initial": a.get("pass1_initial"), "pass1_final": a.get("pass1_final"),
        "pass1_rounds": a.get("pass1_rounds", []), "reward_sum": a.get("reward_sum", 0.0),
        "bytes_in": kb_bytes("student", a.get("peer", "")), "bytes_out": kb_bytes("teacher", a.get("peer", "")),
        "taught": a.get("taught", 0), "learned": a.get("learned", 0),
        "steps_trained": a.get("steps_trained", 0), "local_rounds": a.get("local_rounds", 0),
    } for a in doc.get("agents", [])]
    rounds = [{k: r.get(k) for k in ROUND_CSV if k not in ("strategy", "seed")} for r in doc.get("rounds", [])]
    return {
        "schema": CELL_SCHEMA,
        "strategy": strategy,
        "seed": seed,
        "fingerprint": dict(fingerprint),
        "status": status,
        "exit_code": int(exit_code),
        "message": message,
        "rounds_completed": doc.get("rounds_completed", 0),
        "initial_pass1": summary.get("initial_pass1"),
        "final_pass1": summary.get("final_pass1"),
        "gain": summary.get("gain"),
        "auc_pass1": R.area_under(curve),
        "curve": curve,
        "bytes": summary.get("bytes", sum(int(r.get("bytes") or 0) for r in rounds)),
        "pairs": summary.get("pairs", 0),
        "failures": sum(int(r.get("failures") or 0) for r in rounds),
        "cumulative_reward": summary.get("cumulative_reward"),
        "steps_trained": sum(int(a["steps_trained"] or 0) for a in agents),
        "wall_s": doc.get("duration_s"),
        "rounds": rounds,
        "agents": agents,
        "pair_rows": [{k: p.get(k) for k in PAIR_KEYS} for p in pairs],
    }


PAIR_KEYS = ("round", "teacher", "student", "arm", "ok", "raw_reward", "kb")


def pass1_curve(agent: Mapping[str, Any]) -> list[float | None]:
    """An agent's test pass@1 before round 1, 2, …, then after the last round: entry r − 1
    is before round r, entry r after it (None where a round's figure is missing)."""
    return [None if x is None else float(x) for x in [*(agent.get("pass1_rounds") or []), agent.get("pass1_final")]]


def round_blocks(rounds: int, blocks: int) -> list[tuple[int, int]]:
    """Rounds 1 … R split into ``blocks`` consecutive spans of ⌈R / blocks⌉ rounds (the last
    may be shorter; none is empty, so 12 rounds in 5 blocks is four spans) — the blocks
    the pair analyses (``pair_quality``, ``pair_context``) report by."""
    size = -(-rounds // blocks)
    return [(b * size + 1, min(rounds, (b + 1) * size)) for b in range(blocks) if b * size < rounds]


def cell_tool_parser(prog: str, doc: str | None, blocks: bool = True) -> argparse.ArgumentParser:
    """The command line every per-cell analysis shares: cell directories, ``--json`` and,
    where the tool reports by round block, ``--blocks``."""
    ap = argparse.ArgumentParser(prog=f"python -m {prog}", description=(doc or "").split("\n")[0])
    ap.add_argument("cells", nargs="+", type=Path, help="finished cell directories (OUT/cells/STRATEGY-sSEED)")
    if blocks:
        ap.add_argument("--blocks", type=int, default=3, help="round blocks (default 3)")
    ap.add_argument("--json", action="store_true", help="one JSON document instead of the table")
    return ap


def cell_tool_problem(args: argparse.Namespace, needs_export: bool) -> str | None:
    """Why the analysis cannot run (a directory is not a finished cell, or ``--blocks`` < 1),
    or None. A finished cell has ``cell.json``; the tools that read the CPM's pairs and
    profiles also need its ``cpm-export.json``."""
    files = ("cell.json", "cpm-export.json") if needs_export else ("cell.json",)
    missing = [str(c) for c in args.cells if not all((c / f).is_file() for f in files)]
    if missing:
        return f"not a finished cell ({' + '.join(files)}): {', '.join(missing)}"
    if getattr(args, "blocks", 1) < 1:
        return "--blocks must be ≥ 1"
    return None


def read_cell_file(cell_dir: Path, name: str = "cell.json") -> dict[str, Any]:
    """One of a finished cell's JSON records: ``cell.json`` (the default), the CPM's
    ``cpm-export.json`` or the saved ``verification.json``. The analysis tools read these directly rather than through
    ``benchmarks.federation.read_cell``, which imports the benchmark's runtime; the
    report's own schema check stays there."""
    return json.loads((cell_dir / name).read_text(encoding="utf-8"))


def reward_gain_points(cell: Mapping[str, Any]) -> list[tuple[float, float]]:
    """(raw reward, the student's test pass@1 change over that round) for every
    successful Feedback of one cell (module docstring)."""
    by_peer = {a["peer"]: a for a in cell.get("agents", []) if a.get("peer")}
    points: list[tuple[float, float]] = []
    for p in cell.get("pair_rows", []):
        agent = by_peer.get(p.get("student"))
        if agent is None or not p.get("ok") or p.get("raw_reward") is None:
            continue
        curve, rnd = pass1_curve(agent), int(p["round"])
        if not 0 < rnd < len(curve) or curve[rnd - 1] is None or curve[rnd] is None:
            continue
        points.append((float(p["raw_reward"]), curve[rnd] - curve[rnd - 1]))
    return points


def peak_and_drop(curve: Sequence[float | None]) -> tuple[int, float] | None:
    """(round of the curve's highest point after round 0, that peak − the final point),
    or None for a curve without a round (module docstring, "drop from peak"). The first
    of equal peaks wins, so a plateau reached early and held reads as an early peak
    with no drop."""
    points = [(r, v) for r, v in enumerate(curve) if r > 0 and v is not None]
    if not points or curve[-1] is None:
        return None
    peak_round, peak = max(points, key=lambda rv: (rv[1], -rv[0]))
    return peak_round, peak - float(curve[-1])


def _ranks(values: Sequence[float]) -> list[float]:
    """Average ranks (ties share the mean of their positions), 1-based."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    n = len(x)
    if n < 3:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / (sxx * syy) ** 0.5 if sxx > 0 and syy > 0 else None


def reward_gain_correlation(cells: Sequence[Mapping[str, Any]], strategy: str) -> dict[str, Any]:
    """Pearson and Spearman correlation of reward and pass@1 change over a strategy's
    finished cells (None below three points or without spread)."""
    points = [pt for c in _by_seed(cells, strategy).values() for pt in reward_gain_points(c)]
    x = [a for a, _ in points]
    y = [b for _, b in points]
    return {"n": len(points), "pearson": _pearson(x, y), "spearman": _pearson(_ranks(x), _ranks(y)),
            "mean_gain": sum(y) / len(y) if y else None}


def _by_seed(cells: Sequence[Mapping[str, Any]], strategy: str) -> dict[int, Mapping[str, Any]]:
    return {c["seed"]: c for c in cells if c["strategy"] == strategy and c["status"] == "ok"}


def paired(cells: Sequence[Mapping[str, Any]], a: str, b: str, key: str = "final_pass1") -> dict[str, Any]:
    """Per seed ``key``(a) − ``key``(b) over the seeds where both finished."""
    ca, cb = _by_seed(cells, a), _by_seed(cells, b)
    diffs = {s: ca[s][key] - cb[s][key] for s in sorted(set(ca) & set(cb))
             if ca[s].get(key) is not None and cb[s].get(key) is not None}
    mu, half, n = R.ci95(diffs.values())
    return {"a": a, "b": b, "metric": key, "per_seed": {str(s): d for s, d in diffs.items()}, "n": n,
            "mean": mu, "ci95": half, "positive": sum(1 for d in diffs.values() if d > 0)}


def paired_curves(cells: Sequence[Mapping[str, Any]], a: str, b: str) -> list[list[float | None]]:
    """Per seed where both finished, curve(a) − curve(b) point by point (None where
    either is missing): the per-round gain of ``a`` over ``b`` on the same population."""
    ca, cb = _by_seed(cells, a), _by_seed(cells, b)
    return [[None if x is None or y is None else x - y for x, y in zip(ca[s]["curve"], cb[s]["curve"])]
            for s in sorted(set(ca) & set(cb))]


def table_rows(cells: Sequence[Mapping[str, Any]], strategies: Sequence[str]) -> list[dict[str, Any]]:
    """One row per strategy over its finished (status ok) seeds (module docstring)."""
    rows: list[dict[str, Any]] = []
    gain_per_seed: dict[str, dict[str, float]] = {}  # strategy → its per-seed gain over local-only
    for strategy in strategies:
        mine = _by_seed(cells, strategy)
        ok = [mine[s] for s in sorted(mine)]
        final, final_ci, n = R.ci95(c["final_pass1"] for c in ok)
        auc, auc_ci, _ = R.ci95(c["auc_pass1"] for c in ok)
        peaks = {c["seed"]: pd for c in ok if (pd := peak_and_drop(c["curve"])) is not None}
        drop, drop_ci, _ = R.ci95(d for _, d in peaks.values())
        gain = paired(cells, strategy, REFERENCE) if strategy != REFERENCE else None
        row: dict[str, Any] = {
            "strategy": strategy,
            "runs": sum(1 for c in cells if c["strategy"] == strategy),
            "ok": n,
            "seeds": sorted(mine),
            "final_pass1": final, "final_pass1_ci95": final_ci,
            "final_pass1_values": [c["final_pass1"] for c in ok],
            "initial_pass1": R.mean_or_none(c["initial_pass1"] for c in ok),
            "auc_pass1": auc, "auc_pass1_ci95": auc_ci,
            "peak_round": {str(seed): r for seed, (r, _) in sorted(peaks.items())},
            "drop_from_peak": drop, "drop_from_peak_ci95": drop_ci,
            "gain_vs_local": 0.0 if strategy == REFERENCE and n else (gain["mean"] if gain else None),
            "gain_vs_local_ci95": gain["ci95"] if gain else None,
            "bytes": R.mean_or_none(c["bytes"] for c in ok),
            "steps_trained": R.mean_or_none(c["steps_trained"] for c in ok),
            "wall_s": R.mean_or_none(c["wall_s"] for c in ok),
            "curve": R.aggregate_curves([c["curve"] for c in ok], spread="ci95"),
            "gain_curve": R.aggregate_curves(paired_curves(cells, strategy, REFERENCE), spread="ci95"),
            "reward_gain": reward_gain_correlation(cells, strategy),
        }
        g, b = row["gain_vs_local"], row["bytes"]
        row["bytes_per_001"] = b / (g / 0.01) if g is not None and g > 0 and b is not None else None
        gain_per_seed[strategy] = gain["per_seed"] if gain else {}
        rows.append(row)
    rand = gain_per_seed.get(RANDOM, {})
    for row in rows:
        mine = gain_per_seed[row["strategy"]]
        # over the seeds both have, so a table still being built compares like with like;
        # local-only is the reference: its gain is 0 by definition, not a ratio
        common = sorted(set(mine) & set(rand)) if row["strategy"] != REFERENCE else []
        g, r = (sum(d[s] for s in common) / len(common) if common else None for d in (mine, rand))
        row["vs_random"] = g / r if g is not None and r is not None and r > 0 else None
        row["vs_random_seeds"] = len(common)
    return rows


def summary_document(config: Mapping[str, Any], cells: Sequence[Mapping[str, Any]],
                     missing: Sequence[Mapping[str, Any]], pair: tuple[str, str] | None,
                     command: str, generated_at: str) -> dict[str, Any]:
    """``federation-results.json``: config, every cell (per round, per agent), the table,
    the paired comparison; cells are referenced by their directory relative to OUT."""
    strategies = list(config["strategies"])
    return {
        "schema": SCHEMA,
        "purpose": config.get("purpose", "report"),
        "command": command,
        "generated_at": generated_at,
        "config": dict(config),
        "definitions": "benchmarks/federation_report.py docstring; docs/results.md §Federation",
        "cells": list(cells),
        "missing": list(missing),
        "table": table_rows(cells, strategies),
        "paired": paired(cells, *pair) if pair else None,
        "cells_wall_s": sum(float(c.get("wall_s") or 0.0) for c in cells),
        "code_versions": sorted({str(c.get("code", "unrecorded")) for c in cells}),
    }


def _csv(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return buf.getvalue()


def write_csvs(out: Path, cells: Sequence[Mapping[str, Any]]) -> dict[str, Path]:
    """federation-rounds.csv (per cell and round) and federation-agents.csv (per cell and agent)."""
    rounds = [{"strategy": c["strategy"], "seed": c["seed"], **r} for c in cells for r in c["rounds"]]
    agents = [{"strategy": c["strategy"], "seed": c["seed"], **a} for c in cells for a in c["agents"]]
    paths = {"rounds_csv": Path(out) / "federation-rounds.csv", "agents_csv": Path(out) / "federation-agents.csv"}
    atomic_write(paths["rounds_csv"], _csv(ROUND_CSV, rounds), mode=0o644, durable=False)
    atomic_write(paths["agents_csv"], _csv(AGENT_CSV, agents), mode=0o644, durable=False)
    return paths


def _setting(doc: Mapping[str, Any]) -> str:
    cfg = doc["config"]
    budget = f" · budget {cfg['budget']}" if cfg["agent"] == "ml" else ""
    return (f"{cfg['nodes']} {cfg['agent']} nodes · {cfg['rounds']} rounds{budget} · "
            f"{cfg['purpose']} seeds {','.join(map(str, cfg['seeds']))}")


def write_plots(out: Path, doc: Mapping[str, Any]) -> dict[str, Path]:
    """federation-curves.png (per-round mean pass@1, 95 % CI bands, one panel per
    strategy), federation-gain.png (per round, the paired gain over local-only on the
    same seed — what the seeds' different populations hide in the first) and
    federation-final.png (final pass@1 per strategy with its 95 % CI): all drawn from
    ``doc["table"]``, the numbers the printed table shows."""
    from harness.plots import plot_curves, plot_finals

    colour = {r["strategy"]: i for i, r in enumerate(doc["table"])}  # one colour per strategy in every figure
    rows = [r for r in doc["table"] if r["ok"]]
    curves = [{"strategy": r["strategy"], "colour": colour[r["strategy"]], **r["curve"]} for r in rows]
    finals = [{"strategy": r["strategy"], "colour": colour[r["strategy"]], "mean": r["final_pass1"],
               "values": r["final_pass1_values"],
               "lo": None if r["final_pass1_ci95"] is None else r["final_pass1"] - r["final_pass1_ci95"],
               "hi": None if r["final_pass1_ci95"] is None else r["final_pass1"] + r["final_pass1_ci95"]}
              for r in rows]
    gains = [{"strategy": r["strategy"], "colour": colour[r["strategy"]], **r["gain_curve"]} for r in rows
             if r["strategy"] != REFERENCE and r["gain_curve"]["n"]]
    paths = {}
    if gains:
        paths["gain_plot"] = plot_curves(
            Path(out) / "federation-gain.png", gains,
            title=f"gain over {REFERENCE} on the same seed, after r rounds · {_setting(doc)}",
            band="line: mean of the per-seed differences (n seeds); band: 95 % t-interval",
            ylabel=f"pass@1 − {REFERENCE}", baseline=0.0)
    return {
        **paths,
        "curves_plot": plot_curves(Path(out) / "federation-curves.png", curves,
                                   title=f"KNEXA federation: mean pass@1 after r rounds · {_setting(doc)}",
                                   band="line: mean over seeds (n); band: 95 % t-interval (none for one seed)"),
        "final_plot": plot_finals(Path(out) / "federation-final.png", finals,
                                  title=f"final mean pass@1 per strategy (dots: seeds; bar: 95 % CI)\n{_setting(doc)}"),
    }


def _pm(mu: float | None, half: float | None, signed: bool = False) -> str:
    if mu is None:
        return "–"
    head = f"{mu:+.3f}" if signed else f"{mu:.3f}"
    return f"{head} ± {'–' if half is None else f'{half:.3f}'}"


def human_bytes(value: float | None) -> str:
    if value is None:
        return "–"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:+.2f}"


def format_cells(row: Mapping[str, Any]) -> list[str]:
    """The printed cells of one table row (the unit test compares them to the JSON)."""
    ratio = row.get("vs_random")
    return [
        row["strategy"], f"{row['ok']}/{row['runs']}",
        _pm(row["final_pass1"], row["final_pass1_ci95"]),
        "reference" if row["strategy"] == REFERENCE else _pm(row["gain_vs_local"], row["gain_vs_local_ci95"], True),
        "–" if ratio is None else f"{ratio:.2f}×",
        _pm(row["auc_pass1"], row["auc_pass1_ci95"]),
        human_bytes(row["bytes"]), human_bytes(row["bytes_per_001"]),
        _duration(row["wall_s"]),
    ]


def print_table(console: Any, doc: Mapping[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"federation benchmark · {_setting(doc)} (± = 95 % t-interval over seeds)")
    for name in ("strategy", "runs ok", "final pass@1", f"gain over {REFERENCE}", f"÷ {RANDOM}'s gain",
                 "AUC pass@1", "bytes", "bytes per +0.01", "wall per run"):
        table.add_column(name, justify="left" if name == "strategy" else "right")
    for row in doc["table"]:
        table.add_row(*format_cells(row))
    console.print(table)
    p = doc.get("paired")
    if p and p["n"]:
        seeds = ", ".join(f"s{s} {d:+.3f}" for s, d in p["per_seed"].items())
        console.print(f"paired {p['a']} − {p['b']} (final pass@1, per seed): {seeds}; mean {_pm(p['mean'], p['ci95'], True)}, "
                      f"positive on {p['positive']}/{p['n']} seeds", soft_wrap=True)
    corr = [(r["strategy"], r["reward_gain"]) for r in doc["table"] if r.get("reward_gain", {}).get("n")]
    if corr:
        parts = "; ".join(f"{name} r={_num(c['pearson'])} ρ={_num(c['spearman'])} (n={c['n']})" for name, c in corr)
        console.print(f"reward ↔ the student's pass@1 change over the round: {parts}", soft_wrap=True)
    peaks = [r for r in doc["table"] if r.get("peak_round")]
    if peaks:
        parts = "; ".join(f"{r['strategy']} {_pm(r['drop_from_peak'], r['drop_from_peak_ci95'])} "
                          f"(peak round {', '.join(f's{s} {n}' for s, n in r['peak_round'].items())})"
                          for r in peaks)
        console.print(f"drop from peak to final pass@1: {parts}", soft_wrap=True)
    if doc.get("missing"):
        todo = ", ".join(f"{m['strategy']}-s{m['seed']}" for m in doc["missing"])
        console.print(f"[yellow]not finished yet: {todo} (re-run the same command to resume)[/yellow]", soft_wrap=True)
