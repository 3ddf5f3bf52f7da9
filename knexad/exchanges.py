"""The student's local record of each exchange it made, one line per package fetched.

Why a local file: the path an exchange took (direct, hole-punched or relayed —
``p2p.relay``) and its wire bytes and seconds are known only to the student; the
Feedback the CPM stores carries kb and losses but no path, and the daemon's state file
keeps counts only. The harness builds its per-exchange path table from
``<home>/exchanges.jsonl`` (``harness.paths``, docs/harness.md §Paths), the same way it
reads held-out pass@1 from ``evaluations.jsonl``: a plain file, whatever the log format,
surviving a restart. One JSON object per line: ``directive``, ``round``, ``teacher``,
``student``, ``path``, ``wire_bytes``, ``seconds`` (dial + transfer), ``dial_seconds``
(until the stream was open: the direct try, the relay, a hole punch), ``unix_ms``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from p2p.files import append_json_line, read_json_lines

EXCHANGES_FILE = "exchanges.jsonl"


def append_exchange(home: Path, *, directive: str, round_: int, teacher: str, student: str, path: str,
                    wire_bytes: int, seconds: float, dial_seconds: float = 0.0, now_ms: int | None = None) -> None:
    """Append one fetched package's record, fsynced: the harness may read it while the
    daemon runs (``p2p.files.append_json_line``, as ``knexad.evaluations``)."""
    append_json_line(Path(home) / EXCHANGES_FILE, {
        "directive": directive, "round": int(round_), "teacher": teacher, "student": student, "path": path,
        "wire_bytes": int(wire_bytes), "seconds": float(seconds), "dial_seconds": float(dial_seconds),
        "unix_ms": int(time.time() * 1000) if now_ms is None else int(now_ms)})


def _record(row: dict[str, Any]) -> dict[str, Any]:
    return {"directive": str(row["directive"]), "round": int(row["round"]), "teacher": str(row["teacher"]),
            "student": str(row["student"]), "path": str(row["path"]), "wire_bytes": int(row["wire_bytes"]),
            "seconds": float(row["seconds"]), "dial_seconds": float(row.get("dial_seconds", 0.0))}


def read_exchanges(home: Path) -> list[dict[str, Any]]:
    """The records of a daemon home (empty when it never fetched), in file order; a torn
    or foreign line is skipped with a warning; a directive recorded twice (re-fetched
    after a crash) keeps its last line."""
    rows = read_json_lines(Path(home) / EXCHANGES_FILE, _record, "knexad.exchanges.bad_line")
    return list({rec["directive"]: rec for rec in rows}.values())
