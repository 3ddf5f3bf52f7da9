"""Does the reward a student sends track what the federation is scored on?

    python -m benchmarks.reward_alignment OUT/cells/linucb-s100 OUT/cells/random-s100 [--json]

Reads finished federation-benchmark cells (``cell.json`` + the CPM's ``cpm-export.json``)
and, for every successful Feedback of round r, relates three numbers of that student
over that round:

* **raw reward** — Eq. 3 before normalisation, as the CPM stored it;
* **Δ validation pass@1** — the ``perf.pass@1`` slot of its round r + 1 profile minus
  that of its round r profile (the profile carries validation numbers only);
* **test gain** — its held-out test pass@1 change over the round (the benchmark's
  ``reward ↔ gain`` definition, ``federation_report.reward_gain_points``).

It prints Pearson correlations raw↔gain, Δval↔gain and raw↔Δval per cell, and the mean
gain and raw reward per distillation arm: a reward that ranks arms differently from the
gain teaches the bandit the wrong arm. Issue 16 §2 ("a reward that tracks learning");
docs/results.md §Federation quotes the output. The last round has no next profile, so its
Feedback is left out of the Δval columns.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.federation_report import _pearson, cell_tool_parser, cell_tool_problem, pass1_curve, read_cell_file
from protocol.profile import PASS1


def pair_points(cell: Mapping[str, Any], export: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per successful Feedback that has a next-round profile: round, arm, raw
    reward, Δ validation pass@1 and test gain (module docstring)."""
    val = {(p["peer_id"], int(p["round"])): float(p["vector"][PASS1]) for p in export.get("profiles", [])}
    agents = {a["peer"]: a for a in cell.get("agents", []) if a.get("peer")}
    rows = []
    for p in export.get("pairs", []):
        if not p.get("ok") or p.get("raw_reward") is None:
            continue
        rnd, student = int(p["round"]), p["student"]
        agent = agents.get(student)
        if agent is None or (student, rnd) not in val or (student, rnd + 1) not in val:
            continue
        series = pass1_curve(agent)
        if rnd >= len(series) or series[rnd - 1] is None or series[rnd] is None:
            continue
        rows.append({"round": rnd, "arm": int(p["arm"]), "raw": float(p["raw_reward"]),
                     "dval": val[(student, rnd + 1)] - val[(student, rnd)],
                     "gain": float(series[rnd]) - float(series[rnd - 1])})
    return rows


def summarise(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Correlations and per-arm means of one cell's rows."""
    def col(key: str, keep: Sequence[Mapping[str, Any]] = rows) -> list[float]:
        return [float(r[key]) for r in keep]

    arms = {}
    for arm in sorted({int(r["arm"]) for r in rows}):
        mine = [r for r in rows if r["arm"] == arm]
        arms[str(arm)] = {"n": len(mine), "mean_gain": sum(col("gain", mine)) / len(mine),
                          "mean_raw": sum(col("raw", mine)) / len(mine)}
    return {"n": len(rows),
            "raw_gain": _pearson(col("raw"), col("gain")),
            "dval_gain": _pearson(col("dval"), col("gain")),
            "raw_dval": _pearson(col("raw"), col("dval")),
            "mean_gain": sum(col("gain")) / len(rows) if rows else None,
            "arms": arms}


def analyse(cell_dir: Path) -> dict[str, Any]:
    cell, export = read_cell_file(cell_dir), read_cell_file(cell_dir, "cpm-export.json")
    return {"cell": str(cell_dir), "strategy": cell.get("strategy"), "seed": cell.get("seed"),
            "code": cell.get("code", "unrecorded"), **summarise(pair_points(cell, export))}


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:+.2f}"


def main(argv: Sequence[str] | None = None) -> int:
    args = cell_tool_parser("benchmarks.reward_alignment", __doc__, blocks=False).parse_args(argv)
    problem = cell_tool_problem(args, needs_export=True)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    results = [analyse(c) for c in args.cells]
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    for r in results:
        arms = "  ".join(f"arm {k}: n {v['n']} gain {v['mean_gain']:+.4f} raw {v['mean_raw']:+.4f}"
                         for k, v in r["arms"].items())
        print(f"{r['strategy']} seed {r['seed']} (n {r['n']}): raw↔gain {_fmt(r['raw_gain'])}  "
              f"Δval↔gain {_fmt(r['dval_gain'])}  raw↔Δval {_fmt(r['raw_dval'])}  "
              f"mean gain {r['mean_gain'] if r['mean_gain'] is None else round(r['mean_gain'], 4)}\n  {arms}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
