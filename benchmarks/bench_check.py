"""`make bench-check`: the regression guard over `make bench`'s ratios.

Why ratios: the machine is shared, so absolute times move with the load; a ratio
measured side by side in one run (ours vs bare py-libp2p, 100k vs 10k agents) moves far
less. Each ratio that ``benchmarks/run_all.py`` writes (``results.json``, key
``ratios``) carries its target and which way is better. This module compares them with
the last *recorded* run on the same machine — keyed by hostname, CPU model and the run's
mode (``--quick`` sizes differ, so quick runs are only compared with quick runs) — and
fails when

* a ratio misses its target, or
* a ratio is more than ``TOLERANCE`` (10 %) worse than the last recorded value:
  ``value < 0.9 · last`` when higher is better, ``value > last / 0.9`` when lower is
  better (the same 10 % loss of "goodness", 1/value, in both directions).

Every checked run is appended to the history file (``benchmarks/history/<key>.json``,
git-ignored: a measurement of one machine) and becomes the next baseline, except for
the ratios that regressed: for those the entry keeps the previous baseline (the measured
value is stored beside it), so a regression cannot become its own baseline by being
re-run. A missed target alone does not hold the baseline back (several targets are not
met on the 2-core machine; the 10 % rule must still guard them).
The comparison (``compare``) is a pure function, unit-tested in
tests/unit/test_bench_check.py; nothing here measures time.

Usage: ``python -m benchmarks.bench_check [--results PATH] [--history-dir DIR]
[--no-record]``; exit status 0 pass, 1 regression or missed target, 2 no results.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOLERANCE = 0.10
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"
HISTORY_DIR = HERE / "history"


@dataclass(frozen=True, slots=True)
class Ratio:
    """One ratio from a run. ``better``: "higher" or "lower"; ``target`` None = context
    only (no target, the 10 % rule still applies)."""

    name: str
    value: float
    target: float | None
    better: str

    def __post_init__(self) -> None:
        if self.better not in ("higher", "lower"):
            raise ValueError(f"ratio {self.name!r}: better must be 'higher' or 'lower', not {self.better!r}")

    def meets_target(self) -> bool:
        if self.target is None:
            return True
        return self.value >= self.target if self.better == "higher" else self.value <= self.target

    def goodness(self) -> float:
        """Larger is better in both directions (value, or 1/value when lower is better)."""
        if self.better == "higher":
            return self.value
        return float("inf") if self.value <= 0 else 1.0 / self.value


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    value: float
    target: float | None
    better: str
    last: float | None
    status: str  # "ok", "new", "MISSED TARGET", "REGRESSED", "REGRESSED, MISSED TARGET"

    @property
    def failed(self) -> bool:
        return self.status not in ("ok", "new")


def compare(latest: list[Ratio], last: dict[str, float] | None, tolerance: float = TOLERANCE) -> list[Row]:
    """Rows for every ratio of ``latest`` against ``last`` (name → recorded value of the
    same machine and mode; None or a missing name: nothing to compare with)."""
    rows = []
    for r in latest:
        prev = None if last is None else last.get(r.name)
        problems = []
        if prev is not None:
            base = Ratio(r.name, prev, r.target, r.better).goodness()
            if r.goodness() < (1.0 - tolerance) * base:
                problems.append("REGRESSED")
        if not r.meets_target():
            problems.append("MISSED TARGET")
        status = ", ".join(problems) if problems else ("ok" if prev is not None else "new")
        rows.append(Row(r.name, r.value, r.target, r.better, prev, status))
    return rows


def ratios_from_results(doc: dict[str, Any]) -> list[Ratio]:
    """The ``ratios`` list of a results.json; entries with a non-finite value (a
    benchmark that failed or was skipped) are dropped — the table says so instead."""
    out = []
    for item in doc.get("ratios", []):
        value = item.get("value")
        if value is None or not isinstance(value, int | float) or value != value:
            continue
        out.append(Ratio(str(item["name"]), float(value), item.get("target"), str(item["better"])))
    return out


def machine_key(mode: str) -> str:
    """hostname + CPU model (+ mode), as a file-name-safe string with a short hash."""
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    raw = f"{socket.gethostname()}|{model}|{mode}"
    safe = "".join(c if c.isalnum() else "-" for c in socket.gethostname())[:40]
    return f"{safe}-{mode}-{hashlib.sha256(raw.encode()).hexdigest()[:10]}"


def load_last(path: Path) -> dict[str, float] | None:
    if not path.exists():
        return None
    runs = json.loads(path.read_text()).get("runs", [])
    return dict(runs[-1]["ratios"]) if runs else None


def next_baseline(rows: list[Row]) -> dict[str, float]:
    """What the history keeps as this run's values: the measured value, or the previous
    baseline where the ratio regressed (so re-running a regression cannot pass)."""
    return {r.name: (r.last if "REGRESSED" in r.status and r.last is not None else r.value) for r in rows}


def record(path: Path, doc: dict[str, Any], rows: list[Row]) -> None:
    hist = json.loads(path.read_text()) if path.exists() else {"runs": []}
    hist["runs"].append({"started": doc.get("started"), "load_avg": doc.get("load_avg"),
                         "ratios": next_baseline(rows), "measured": {r.name: r.value for r in rows},
                         "status": {r.name: r.status for r in rows}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(hist, indent=1) + "\n")


def format_table(rows: list[Row]) -> str:
    width = max([len(r.name) for r in rows] + [5])
    lines = [f"{'ratio':{width}}  {'value':>9}  {'target':>10}  {'last':>9}  status"]
    for r in rows:
        tgt = "—" if r.target is None else ("≥ " if r.better == "higher" else "≤ ") + f"{r.target:g}"
        last = "—" if r.last is None else f"{r.last:.4g}"
        lines.append(f"{r.name:{width}}  {r.value:9.4g}  {tgt:>10}  {last:>9}  {r.status}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--history-dir", type=Path, default=HISTORY_DIR)
    ap.add_argument("--no-record", action="store_true", help="do not append this run to the history")
    a = ap.parse_args(argv)
    if not a.results.exists():
        print(f"no results at {a.results}: run `make bench` first", file=sys.stderr)
        return 2
    doc = json.loads(a.results.read_text())
    latest = ratios_from_results(doc)
    if not latest:
        print(f"{a.results} has no ratios", file=sys.stderr)
        return 2
    mode = "quick" if doc.get("quick") else "full"
    hist = a.history_dir / f"{machine_key(mode)}.json"
    rows = compare(latest, load_last(hist))
    print(f"results {a.results} ({mode}, started {doc.get('started')}, load {doc.get('load_avg')})")
    print(f"history {hist}")
    print(format_table(rows))
    skipped = sorted(set(doc.get("ratio_names", [])) - {r.name for r in latest})
    if skipped:
        print(f"not measured this run: {', '.join(skipped)}")
    if not a.no_record:
        record(hist, doc, rows)
    failed = [r for r in rows if r.failed]
    if failed:
        print(f"\nFAIL: {len(failed)} ratio(s) regressed > {TOLERANCE:.0%} or missed the target")
        return 1
    print("\nPASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
