"""The daemon's local record of its agent's held-out evaluations, one line per round.

Why a local file: the profile a daemon sends to the CPM carries validation numbers only
(the CPM must not select partners on the test set the federation is scored on), so the
held-out **test** pass@1 per round — what the harness and the federation benchmark
report — never travels. It stays in ``<home>/evaluations.jsonl``, appended (one JSON
object per line: ``round``, ``unix_ms``, the metrics) when the daemon builds a round's
profile; a round profiled twice (a restart) keeps its last line.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

from p2p.files import append_json_line, read_json_lines

EVALUATIONS_FILE = "evaluations.jsonl"
KEPT = ("pass@1", "pass@1_own", "pass@1_other", "val_pass@1")


def append_evaluation(home: Path, round_: int, metrics: Mapping[str, float], now_ms: int | None = None) -> None:
    """Append the round's metrics (the ``KEPT`` keys it has), fsynced: the harness may
    read the file while the daemon runs."""
    append_json_line(Path(home) / EVALUATIONS_FILE, {
        "round": int(round_), "unix_ms": int(time.time() * 1000) if now_ms is None else int(now_ms),
        **{k: float(metrics[k]) for k in KEPT if k in metrics}})


def read_evaluations(home: Path, key: str = "pass@1") -> dict[int, float]:
    """``{round: metric}`` from a daemon home (empty when it never evaluated); a torn or
    foreign line is skipped with a warning, a later line for a round replaces an earlier."""
    rows = read_json_lines(Path(home) / EVALUATIONS_FILE, lambda row: (int(row["round"]), float(row[key])),
                           "knexad.evaluations.bad_line")
    return dict(rows)
