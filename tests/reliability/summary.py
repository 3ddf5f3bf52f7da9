"""Outcome collector for the reliability suite and the table printed at the end.

Tests call ``record(...)`` with what they proved (a fault survived, N hostile inputs
rejected, records lost — which must be 0); ``tests/reliability/conftest.py`` prints the
table from ``pytest_terminal_summary`` and writes it as JSON when
``KNEXA_RELIABILITY_JSON`` names a file (docs/reliability.md quotes a run).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Row:
    category: str  # fault | load | hostile | fuzz | knowledge
    check: str
    passed: bool
    survived: int = 0  # faults injected and survived
    rejected: int = 0  # hostile inputs refused with a typed error
    lost: int = 0  # acknowledged records missing afterwards
    detail: str = ""


@dataclass
class Summary:
    rows: list[Row] = field(default_factory=list)

    def record(self, category: str, check: str, *, passed: bool = True, survived: int = 0, rejected: int = 0,
               lost: int = 0, detail: str = "") -> None:
        self.rows.append(Row(category, check, passed, survived, rejected, lost, detail))

    def totals(self) -> dict[str, int]:
        return {
            "checks": len(self.rows),
            "failed": sum(not r.passed for r in self.rows),
            "faults_survived": sum(r.survived for r in self.rows),
            "inputs_rejected": sum(r.rejected for r in self.rows),
            "records_lost": sum(r.lost for r in self.rows),
        }

    def table(self) -> str:
        head = f"{'category':<10} {'check':<52} {'ok':<4} {'faults':>6} {'rejected':>9} {'lost':>5}  detail"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(f"{r.category:<10} {r.check[:52]:<52} {'yes' if r.passed else 'NO':<4} "
                         f"{r.survived:>6} {r.rejected:>9} {r.lost:>5}  {r.detail}")
        t = self.totals()
        lines.append("-" * len(head))
        lines.append(f"faults survived: {t['faults_survived']}   inputs rejected: {t['inputs_rejected']}   "
                     f"records lost: {t['records_lost']}   checks: {t['checks']} ({t['failed']} failed)")
        return "\n".join(lines)

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"rows": [asdict(r) for r in self.rows], "totals": self.totals()},
                                         indent=2))


SUMMARY = Summary()


def record(category: str, check: str, **kw: object) -> None:
    SUMMARY.record(category, check, **kw)  # type: ignore[arg-type]


def dump_if_requested() -> None:
    path = os.environ.get("KNEXA_RELIABILITY_JSON")
    if path and SUMMARY.rows:
        SUMMARY.dump(path)
