"""Which pairs did a strategy choose, and how much did their students learn — by round?

    python -m benchmarks.pair_quality OUT/cells/linucb-s0 OUT/cells/random-s0 … [--blocks 3] [--json]

Reads finished federation-benchmark cells (``cell.json`` only) and pools them by
strategy. For every successful pair of round r (teacher t, student s):

* **student gain** — s's held-out test pass@1 after round r minus before it;
* **teacher ahead** — t's test pass@1 before round r exceeded s's (the strategies never
  see test numbers — profiles carry validation numbers — so this is an after-the-fact
  reading of how well a strategy chose, not something it could have used);
* the arm.

and for every agent that did *not* learn in round r (a teacher, unpaired, or local-only),
its test change over the round: **not-learning drift**.

The rounds are split into ``--blocks`` equal blocks (default 3: 1–4, 5–8, 9–12 of 12),
so a learning matchmaker shows up as pairs that get better over the run while random's
stay flat. Issue 16 §2; docs/results.md §6 quotes the output.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.federation_report import cell_tool_parser, cell_tool_problem, pass1_curve, read_cell_file, round_blocks


def cell_points(cell: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(pairs, drift): one row per successful pair (round, arm, gain, teacher_ahead) and one
    per agent-round without learning (round, change)."""
    agents = {a["peer"]: a for a in cell.get("agents", []) if a.get("peer")}
    curves = {peer: pass1_curve(a) for peer, a in agents.items()}
    rounds = int(cell.get("rounds_completed") or 0)
    pairs, learned = [], set()
    for p in cell.get("pair_rows", []):
        r = int(p["round"])
        cs, ct = curves.get(p["student"]), curves.get(p["teacher"])
        if not p.get("ok") or cs is None or ct is None or r >= len(cs):
            continue
        learned.add((p["student"], r))
        pairs.append({"round": r, "arm": int(p["arm"]), "gain": cs[r] - cs[r - 1], "teacher_ahead": ct[r - 1] > cs[r - 1]})
    drift = [{"round": r, "change": c[r] - c[r - 1]}
             for peer, c in curves.items() for r in range(1, min(rounds, len(c) - 1) + 1) if (peer, r) not in learned]
    return pairs, drift


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarise(pairs: Sequence[Mapping[str, Any]], drift: Sequence[Mapping[str, Any]], rounds: int,
              blocks: int) -> list[dict[str, Any]]:
    """Per round block: pairs, mean student gain, share with the teacher ahead, per-arm
    counts and gains, and the not-learning drift."""
    out = []
    for lo, hi in round_blocks(rounds, blocks):
        mine = [p for p in pairs if lo <= p["round"] <= hi]
        arms = {str(k): {"n": len(a), "mean_gain": _mean([p["gain"] for p in a])}
                for k in sorted({p["arm"] for p in mine}) for a in [[p for p in mine if p["arm"] == k]]}
        out.append({"rounds": [lo, hi], "pairs": len(mine), "mean_gain": _mean([p["gain"] for p in mine]),
                    "teacher_ahead": _mean([float(p["teacher_ahead"]) for p in mine]), "arms": arms,
                    "drift": _mean([d["change"] for d in drift if lo <= d["round"] <= hi])})
    return out


def analyse(cell_dirs: Sequence[Path], blocks: int) -> dict[str, Any]:
    """Pool the cells by strategy → {strategy: {seeds, all: block summary of every round, blocks}}."""
    pooled: dict[str, dict[str, Any]] = {}
    for d in cell_dirs:
        cell = read_cell_file(d)
        pairs, drift = cell_points(cell)
        entry = pooled.setdefault(cell["strategy"], {"seeds": [], "pairs": [], "drift": [], "rounds": 0})
        entry["seeds"].append(cell.get("seed"))
        entry["pairs"] += pairs
        entry["drift"] += drift
        entry["rounds"] = max(entry["rounds"], int(cell.get("rounds_completed") or 0))
    return {name: {"seeds": e["seeds"], "all": summarise(e["pairs"], e["drift"], e["rounds"], 1)[0],
                   "blocks": summarise(e["pairs"], e["drift"], e["rounds"], blocks)}
            for name, e in pooled.items()}


def _f(x: float | None, fmt: str = "+.4f") -> str:
    return "–" if x is None else format(x, fmt)


def _line(label: str, s: Mapping[str, Any]) -> str:
    arms = " ".join(f"arm{k} {v['n']}:{_f(v['mean_gain'])}" for k, v in s["arms"].items())
    return (f"  {label:<14} pairs {s['pairs']:>4}  student gain {_f(s['mean_gain'])}  teacher ahead "
            f"{_f(s['teacher_ahead'], '.2f')}  not-learning drift {_f(s['drift'])}  {arms}")


def main(argv: Sequence[str] | None = None) -> int:
    args = cell_tool_parser("benchmarks.pair_quality", __doc__).parse_args(argv)
    problem = cell_tool_problem(args, needs_export=False)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    result = analyse(args.cells, args.blocks)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    for name, r in result.items():
        print(f"{name} (seeds {', '.join(map(str, r['seeds']))})")
        print(_line("all rounds", r["all"]))
        for s in r["blocks"]:
            print(_line(f"rounds {s['rounds'][0]}–{s['rounds'][1]}", s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
