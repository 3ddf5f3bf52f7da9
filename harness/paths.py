"""The per-exchange path table of a run: which way each package travelled.

Why: on ``--topology nat`` a package goes direct, over a hole-punched connection or
through the CPM's circuit relay (docs/networking.md), and the relay is the expensive
way. Only the student knows which path an exchange took; it records each fetch in
``<home>/exchanges.jsonl`` (``knexad.exchanges``). This module joins those records with
the CPM's directives and builds ``results.json``'s ``paths`` section:

* ``exchanges`` — one row per fetched package: ``round``, ``teacher``, ``student``
  (peer IDs, plus ``teacher_name`` / ``student_name``), ``path``, ``wire_bytes`` (both
  directions on the wire, as the student counted them), ``seconds`` (dial + transfer, the
  student's clock), ``dial_seconds`` (of ``seconds``: until the stream was open — the
  direct try, the relay, a hole punch), ``directive``, and ``teacher_path``: the path
  the teacher recorded for the same directive (its ``side="teacher"`` line; None when it
  has none — e.g. a teacher from before teachers recorded). The two agree unless a
  connection changed under the exchange;
* ``summary`` — per path: ``count``, ``share`` (of recorded exchanges), ``bytes``,
  ``seconds``, ``dial_seconds``, ``mbit_s`` (bytes · 8 / seconds / 10⁶, dial included) and
  ``transfer_mbit_s`` (bytes · 8 / (seconds − dial_seconds) / 10⁶: the open stream's
  rate); None where the divisor is 0. Also
  ``unrecorded``: directives the CPM has ok feedback for but no student record of
  (a student that crashed between fetching and recording; 0 in a healthy run).

Pure functions of files and rows: unit-tested from a fixture (tests/unit/test_harness_paths.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from knexad.exchanges import read_exchanges
from p2p.relay import PATHS


def collect_exchanges(homes: Mapping[str, Path], names: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Every student's records, sorted by (round, student, teacher); names label peers."""
    names = names or {}
    served = {rec["directive"]: rec["path"] for home in homes.values() for rec in read_exchanges(home, side="teacher")}
    rows = []
    for home in homes.values():
        for rec in read_exchanges(home):
            rows.append({"round": rec["round"], "teacher": rec["teacher"], "student": rec["student"],
                         "teacher_name": names.get(rec["teacher"], ""), "student_name": names.get(rec["student"], ""),
                         "path": rec["path"], "wire_bytes": rec["wire_bytes"], "seconds": rec["seconds"],
                         "dial_seconds": rec["dial_seconds"], "teacher_path": served.get(rec["directive"]),
                         "directive": rec["directive"]})
    rows.sort(key=lambda r: (r["round"], r["student_name"] or r["student"], r["teacher_name"] or r["teacher"]))
    return rows


def summarize_paths(exchanges: Sequence[Mapping[str, Any]], pairs: Sequence[Any] = ()) -> dict[str, Any]:
    """Count, share, bytes, seconds and throughput per path (every known path listed,
    0 when unused); ``pairs`` (``cpm.report.PairRecord``) gives ``unrecorded``."""
    total = len(exchanges)
    per: dict[str, dict[str, Any]] = {}
    for name in [*PATHS, *sorted({str(e["path"]) for e in exchanges} - set(PATHS))]:
        rows = [e for e in exchanges if e["path"] == name]
        nbytes = sum(int(e["wire_bytes"]) for e in rows)
        secs = sum(float(e["seconds"]) for e in rows)
        dial = sum(float(e.get("dial_seconds", 0.0)) for e in rows)
        per[name] = {"count": len(rows), "share": (len(rows) / total) if total else 0.0, "bytes": nbytes,
                     "seconds": secs, "dial_seconds": dial, "mbit_s": _rate(nbytes, secs),
                     "transfer_mbit_s": _rate(nbytes, secs - dial)}
    recorded = {str(e["directive"]) for e in exchanges}
    unrecorded = sum(1 for p in pairs if p.ok and p.directive_id and p.directive_id not in recorded)
    return {"exchanges": total, "by_path": per, "unrecorded": unrecorded}


def _rate(nbytes: int, seconds: float) -> float | None:
    return nbytes * 8 / seconds / 1e6 if seconds > 0 else None


def path_section(homes: Mapping[str, Path], pairs: Sequence[Any], names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``results.json``'s ``paths``: ``{"exchanges": [...], "summary": {...}}``."""
    rows = collect_exchanges(homes, names)
    return {"exchanges": rows, "summary": summarize_paths(rows, pairs)}


def summary_line(section: Mapping[str, Any] | None) -> str:
    """One line for the terminal: ``paths of 10 exchanges: direct 0 (0%) · holepunch 0 (0%)
    · relay 10 (100%, 0.03 Mbit/s with dial, 2.08 Mbit/s open stream)``."""
    if not section:
        return "paths: –"
    summary = section["summary"]
    parts = []
    for name, v in summary["by_path"].items():
        rate = "" if v["mbit_s"] is None else f", {v['mbit_s']:.2f} Mbit/s with dial"
        if v["transfer_mbit_s"] is not None:
            rate += f", {v['transfer_mbit_s']:.2f} Mbit/s open stream"
        parts.append(f"{name} {v['count']} ({v['share']:.0%}{rate})")
    tail = f"; {summary['unrecorded']} unrecorded" if summary["unrecorded"] else ""
    return f"paths of {summary['exchanges']} exchanges: " + " · ".join(parts) + tail
