"""How much of what teachers generate survives execution-verified distillation, per pair.

    python -m benchmarks.verification OUT/cells/linucb-s5 OUT/cells/random-s5 … [--write] [--json]

Execution-verified distillation (docs/agent.md) filters twice: the teacher sends only the
completions that pass their transfer task's public tests in its sandbox, and the student
runs what it received again in its own sandbox and trains only on what passes there.
Issue 16 §2 asks for the accepted fraction per pair. The daemons log both halves —
``agent.teach.done`` (``generated``, ``items`` sent; keyed by the directive) and
``agent.learn.done`` (``items`` received, ``items_parsed``, ``items_used``; one per
student and round) — and the CPM's export names each pair's directive, round, teacher
and student. This joins them into one row per successful pair.

The logs stay on the machine that ran the cell, so ``--write`` saves the rows as the
cell's ``verification.json``, which the table's committed records keep
(benchmarks/results/federation); a cell without logs is read from that file.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.federation_report import cell_tool_parser, cell_tool_problem, read_cell_file

SAVED = "verification.json"
SCHEMA = "knexa-bench/verification/1"


def log_events(lines: Iterable[str], wanted: frozenset[str]) -> list[dict[str, Any]]:
    """The JSON log lines whose event is wanted (a non-JSON line — a traceback, a library's
    print — is skipped, not fatal: the logs are evidence, not input to trust)."""
    out = []
    for line in lines:
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("event") in wanted:
            out.append(doc)
    return out


def pair_rows(cell: Mapping[str, Any], export: Mapping[str, Any],
              node_logs: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One row per successful pair: round, arm, teacher and student names, what the teacher
    generated and sent, what the student received, parsed and used (None where the log
    has no line for it). ``node_logs`` maps an agent's name to its teach/learn events."""
    names = {a["peer"]: a["name"] for a in cell.get("agents", []) if a.get("peer")}
    taught = {(name, e.get("directive")): e for name, events in node_logs.items()
              for e in events if e["event"] == "agent.teach.done"}
    learned = {(name, int(e["round"])): e for name, events in node_logs.items()
               for e in events if e["event"] == "agent.learn.done" and e.get("round") is not None}
    rows = []
    for p in export.get("pairs", []):
        if not p.get("ok"):
            continue
        teacher, student = names.get(p["teacher"]), names.get(p["student"])
        t = taught.get((teacher, p.get("directive_id")), {})
        s = learned.get((student, int(p["round"])), {})
        rows.append({"round": int(p["round"]), "arm": p.get("arm"), "teacher": teacher, "student": student,
                     "generated": t.get("generated"), "sent": t.get("items"), "received": s.get("items"),
                     "parsed": s.get("items_parsed"), "used": s.get("items_used")})
    return rows


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def summarise(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Totals over the rows that have both halves: the teacher's pass fraction (sent ÷
    generated), the student's acceptance (used ÷ received), end to end (used ÷
    generated), the mean items a student trained on, and the pairs where it used none."""
    full = [r for r in rows if r["generated"] is not None and r["received"] is not None and r["used"] is not None]
    gen = sum(r["generated"] for r in full)
    sent = sum(r["sent"] or 0 for r in full)
    received = sum(r["received"] for r in full)
    used = sum(r["used"] for r in full)
    return {"pairs": len(rows), "joined": len(full), "generated": gen, "sent": sent, "received": received,
            "used": used, "teacher_pass": _ratio(sent, gen), "student_accept": _ratio(used, received),
            "end_to_end": _ratio(used, gen), "used_per_pair": _ratio(used, len(full)),
            "pairs_none_used": sum(1 for r in full if r["used"] == 0)}


def by_arm(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``summarise`` per distillation arm, keyed by the arm as a string (JSON keys)."""
    arms = sorted({r["arm"] for r in rows if r["arm"] is not None})
    return {str(a): summarise([r for r in rows if r["arm"] == a]) for a in arms}


def read_rows(cell_dir: Path, cell: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A cell's rows (``cell``: its parsed ``cell.json``): joined from its logs when they
    are here, else its saved file."""
    logs = sorted((cell_dir / "logs").glob("node-[0-9][0-9].log"))
    if not logs:
        saved = cell_dir / SAVED
        if not saved.is_file():
            raise FileNotFoundError(f"{cell_dir}: neither logs/node-NN.log nor {SAVED}")
        return list(read_cell_file(cell_dir, SAVED)["pairs"])
    wanted = frozenset({"agent.teach.done", "agent.learn.done"})
    node_logs = {}
    for path in logs:
        with path.open(encoding="utf-8", errors="replace") as fh:
            node_logs[path.stem] = log_events(fh, wanted)
    return pair_rows(cell, read_cell_file(cell_dir, "cpm-export.json"), node_logs)


def analyse(cell_dir: Path, write: bool = False) -> dict[str, Any]:
    cell = read_cell_file(cell_dir)
    rows = read_rows(cell_dir, cell)
    doc = {"schema": SCHEMA, "strategy": cell.get("strategy"), "seed": cell.get("seed"),
           "code": cell.get("code", "unrecorded"), "all": summarise(rows), "arms": by_arm(rows), "pairs": rows}
    if write:
        (cell_dir / SAVED).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return doc


def pool_by_strategy(results: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The rows of every cell of a strategy summarised together (overall and by arm):
    the table's per-strategy figures."""
    rows: dict[str, list[Mapping[str, Any]]] = {}
    for r in results:
        rows.setdefault(str(r["strategy"]), []).extend(r["pairs"])
    return {name: {"seeds": sorted(r["seed"] for r in results if str(r["strategy"]) == name),
                   "all": summarise(mine), "arms": by_arm(mine)}
            for name, mine in rows.items()}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f} %"


def main(argv: Sequence[str] | None = None) -> int:
    ap = cell_tool_parser("benchmarks.verification", __doc__, blocks=False)
    ap.add_argument("--write", action="store_true", help=f"save each cell's rows as CELL/{SAVED}")
    args = ap.parse_args(argv)
    problem = cell_tool_problem(args, needs_export=True)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    try:
        results = [analyse(c, write=args.write) for c in args.cells]
    except FileNotFoundError as exc:
        print(f"not a cell with verification data: {exc}", file=sys.stderr)
        return 2
    pooled = pool_by_strategy(results)
    if args.json:
        print(json.dumps({"cells": [{k: v for k, v in r.items() if k != "pairs"} for r in results],
                          "strategies": pooled}, indent=1))
        return 0
    labelled = [(f"{r['strategy']} seed {r['seed']}", r) for r in results]
    labelled += [(f"{k}, seeds {', '.join(map(str, v['seeds']))} pooled", v) for k, v in pooled.items()]
    for label, r in labelled:
        a = r["all"]
        print(f"{label}: {a['pairs']} pairs ({a['joined']} with both log lines); "
              f"teacher pass {_pct(a['teacher_pass'])} ({a['sent']}/{a['generated']}), student accepts "
              f"{_pct(a['student_accept'])} ({a['used']}/{a['received']}), end to end {_pct(a['end_to_end'])}; "
              f"{a['used_per_pair'] or 0:.1f} items used per pair, {a['pairs_none_used']} pairs used none")
        for arm, s in r["arms"].items():
            print(f"  arm {arm}: {s['pairs']} pairs, teacher pass {_pct(s['teacher_pass'])}, "
                  f"student accepts {_pct(s['student_accept'])}, {s['used_per_pair'] or 0:.1f} used per pair")
    return 0


if __name__ == "__main__":
    sys.exit(main())
