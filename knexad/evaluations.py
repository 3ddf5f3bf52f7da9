"""The daemon's local record of its agent's held-out evaluations, one line per round.

Why a local file: the profile a daemon sends to the CPM carries validation numbers only
(the CPM must not select partners on the test set the federation is scored on), so the
held-out **test** pass@1 per round — what the harness and the federation benchmark
report — never travels. It stays in ``<home>/evaluations.jsonl``, appended (one JSON
object per line: ``round``, ``unix_ms``, the metrics) when the daemon builds a round's
profile; a round profiled twice (a restart) keeps its last line.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

import structlog

EVALUATIONS_FILE = "evaluations.jsonl"
KEPT = ("pass@1", "pass@1_own", "pass@1_other", "val_pass@1")

log = structlog.get_logger(__name__)


def append_evaluation(home: Path, round_: int, metrics: Mapping[str, float], now_ms: int | None = None) -> None:
    """Append the round's metrics (the ``KEPT`` keys it has) and fsync: the harness may
    read the file while the daemon runs."""
    row = {"round": int(round_), "unix_ms": int(time.time() * 1000) if now_ms is None else int(now_ms),
           **{k: float(metrics[k]) for k in KEPT if k in metrics}}
    path = Path(home) / EVALUATIONS_FILE
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_evaluations(home: Path, key: str = "pass@1") -> dict[int, float]:
    """``{round: metric}`` from a daemon home (empty when it never evaluated); a torn or
    foreign line is skipped with a warning, a later line for a round replaces an earlier."""
    path = Path(home) / EVALUATIONS_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return {}
    out: dict[int, float] = {}
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            out[int(row["round"])] = float(row[key])
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("knexad.evaluations.bad_line", path=str(path), line=number, error=type(exc).__name__)
    return out
