"""Do the pair terms the matchmaker sees predict how much a student learns?

    python -m benchmarks.pair_context OUT/tuning/cells/linucb-s101 OUT/tuning/cells/random-s101 … [--blocks 3] [--json]

Reads finished federation-benchmark cells (``cell.json`` for the test curves, the CPM's
``cpm-export.json`` for the pairs and profiles) and pools every successful pair of every
cell given. For the pair of round r it rebuilds
the pairwise terms of the context φ (``cpm.features``) from the two round-r profiles —
what the CPM had when it matched them — and relates each to that Feedback's raw reward
and to the student's held-out test pass@1 change over the round:

* **gap** — the teacher's validation pass@1 minus the student's;
* **lack** — the teacher's data mass where the student has little;
* **js** — Jensen–Shannon divergence of their data histograms (the heuristic's signal);
* **items** — how many verified items the student trained on in that pair, from the
  cell's logs or saved ``verification.json`` (``benchmarks.verification.read_rows``;
  "–" for a cell with neither): not a term of φ, but the question whether a pair is
  worth its package's size.

Why: LinUCB starts from θ = 0 and spends its first rounds exploring (docs/results.md §6).
A prior mean on θ only pays if a term already predicts the gain in those first rounds;
this reads that off the logs instead of spending a federation run to find out. Read it on
tuning-seed cells only (a prior chosen on report seeds could not be reported on them).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.federation_report import _pearson, cell_tool_parser, cell_tool_problem, pass1_curve, read_cell_file, round_blocks
from benchmarks.verification import read_rows
from cpm.features import OFF_GAP, OFF_JS, OFF_LACK, pair_context

TERMS = {"gap": OFF_GAP, "lack": OFF_LACK, "js": OFF_JS}
COLUMNS = (*TERMS, "items")


def cell_rows(cell: dict[str, Any], export: dict[str, Any],
              checked: Sequence[Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per successful pair whose two round-r profiles are in the export: round,
    each term, raw reward, the student's test gain over the round and, with the cell's
    verification rows (``checked``), the items the student used (None where it has no row)."""
    profiles = {(p["peer_id"], int(p["round"])): np.asarray(p["vector"], dtype=float)
                for p in export.get("profiles", [])}
    agents = {a["peer"]: a for a in cell.get("agents", []) if a.get("peer")}
    peer_of = {a.get("name"): a["peer"] for a in agents.values()}
    used = {(int(v["round"]), peer_of.get(v["teacher"]), peer_of.get(v["student"])): int(v["used"])
            for v in checked or () if v.get("used") is not None}
    rows = []
    for p in export.get("pairs", []):
        rnd, teacher, student = int(p["round"]), p["teacher"], p["student"]
        if not p.get("ok") or p.get("raw_reward") is None or student not in agents:
            continue
        if (teacher, rnd) not in profiles or (student, rnd) not in profiles:
            continue
        curve = pass1_curve(agents[student])
        if not 0 < rnd < len(curve) or curve[rnd - 1] is None or curve[rnd] is None:
            continue
        phi = pair_context(profiles[(teacher, rnd)], profiles[(student, rnd)], 0)
        rows.append({"round": rnd, **{name: float(phi[i]) for name, i in TERMS.items()},
                     "raw": float(p["raw_reward"]), "gain": curve[rnd] - curve[rnd - 1],
                     "items": used.get((rnd, teacher, student))})
    return rows


def summarise(rows: Sequence[dict[str, Any]], rounds: int, blocks: int) -> list[dict[str, Any]]:
    """Per round block (plus all rounds first): n and each term's Pearson r with the raw
    reward and with the test gain; the mean gain of the block's top and bottom third by gap."""
    spans = [(1, rounds), *round_blocks(rounds, blocks)]
    out = []
    for lo, hi in spans:
        mine = [r for r in rows if lo <= r["round"] <= hi]
        entry: dict[str, Any] = {"rounds": [lo, hi], "n": len(mine)}
        for name in COLUMNS:
            known = [r for r in mine if r.get(name) is not None]
            entry[name] = {"raw": _pearson([r[name] for r in known], [r["raw"] for r in known]),
                           "gain": _pearson([r[name] for r in known], [r["gain"] for r in known])}
        ranked = sorted(mine, key=lambda r: r["gap"])
        third = len(ranked) // 3
        if third:
            entry["gain_by_gap"] = {"bottom_third": float(np.mean([r["gain"] for r in ranked[:third]])),
                                    "top_third": float(np.mean([r["gain"] for r in ranked[-third:]]))}
        out.append(entry)
    return out


def analyse(cell_dirs: Sequence[Path], blocks: int) -> dict[str, Any]:
    rows, rounds, cells = [], 0, []
    for d in cell_dirs:
        cell, export = read_cell_file(d), read_cell_file(d, "cpm-export.json")
        try:
            checked = read_rows(d, cell)
        except FileNotFoundError:  # neither logs nor a saved verification.json: no items column
            checked = None
        rows += cell_rows(cell, export, checked)
        rounds = max(rounds, int(cell.get("rounds_completed") or 0))
        cells.append(f"{cell.get('strategy')}-s{cell.get('seed')}")
    return {"cells": cells, "pairs": len(rows), "blocks": summarise(rows, rounds, blocks) if rounds else []}


def _r(x: float | None) -> str:
    return "  –  " if x is None else f"{x:+.2f}"


def main(argv: Sequence[str] | None = None) -> int:
    args = cell_tool_parser("benchmarks.pair_context", __doc__).parse_args(argv)
    problem = cell_tool_problem(args, needs_export=True)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    result = analyse(args.cells, args.blocks)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{result['pairs']} pairs from {', '.join(result['cells'])}")
    print("rounds    n   " + "  ".join(f"{t}↔raw {t}↔gain" for t in COLUMNS) + "   gain: bottom / top third by gap")
    for b in result["blocks"]:
        terms = "  ".join(f"{_r(b[t]['raw']):>{len(t) + 4}} {_r(b[t]['gain']):>{len(t) + 5}}" for t in COLUMNS)
        third = b.get("gain_by_gap")
        split = f"{third['bottom_third']:+.4f} / {third['top_third']:+.4f}" if third else "–"
        print(f"{b['rounds'][0]:>2}–{b['rounds'][1]:<3} {b['n']:>4}   {terms}   {split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
