"""A daemon's local record of each exchange it took part in, one line per package.

Why a local file: the path an exchange took (direct, hole-punched or relayed —
``p2p.relay``) and its wire bytes and seconds are known only to the two daemons; the
Feedback the CPM stores carries kb and losses but no path, and the daemon's state file
keeps counts only. The harness builds its per-exchange path table from
``<home>/exchanges.jsonl`` (``harness.paths``, docs/harness.md §Paths), the same way it
reads held-out pass@1 from ``evaluations.jsonl``: a plain file, whatever the log format,
surviving a restart. One JSON object per line: ``directive``, ``round``, ``teacher``,
``student``, ``path``, ``wire_bytes``, ``seconds`` (dial + transfer), ``dial_seconds``
(until the stream was open: the direct try, the relay, a hole punch), ``unix_ms``, and
``side``: ``student`` (it fetched the package: the harness's path table is built from
these) or ``teacher`` (it served it, read off the connection the student's stream
arrived on — the two sides' paths agree, which ``harness.paths`` reports; ``seconds``
from the request's arrival, ``dial_seconds`` 0). A line without ``side`` is a student's
(written before the teacher recorded anything).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from p2p.files import append_json_line, read_json_lines

EXCHANGES_FILE = "exchanges.jsonl"
SIDES = ("student", "teacher")


def append_exchange(home: Path, *, directive: str, round_: int, teacher: str, student: str, path: str,
                    wire_bytes: int, seconds: float, dial_seconds: float = 0.0, now_ms: int | None = None,
                    side: str = "student") -> None:
    """Append one package's record (fetched: ``side="student"``, served: ``"teacher"``),
    fsynced: the harness may read it while the daemon runs
    (``p2p.files.append_json_line``, as ``knexad.evaluations``)."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    append_json_line(Path(home) / EXCHANGES_FILE, {"side": side,
        "directive": directive, "round": int(round_), "teacher": teacher, "student": student, "path": path,
        "wire_bytes": int(wire_bytes), "seconds": float(seconds), "dial_seconds": float(dial_seconds),
        "unix_ms": int(time.time() * 1000) if now_ms is None else int(now_ms)})


def _record(row: dict[str, Any]) -> dict[str, Any]:
    return {"directive": str(row["directive"]), "round": int(row["round"]), "teacher": str(row["teacher"]),
            "student": str(row["student"]), "path": str(row["path"]), "wire_bytes": int(row["wire_bytes"]),
            "seconds": float(row["seconds"]), "dial_seconds": float(row.get("dial_seconds", 0.0)),
            "side": _side(row.get("side", "student"))}


def _side(value: Any) -> str:
    if value not in SIDES:
        raise ValueError(f"unknown side {value!r}")  # read_json_lines: a foreign line, skipped
    return str(value)


def read_exchanges(home: Path, side: str = "student") -> list[dict[str, Any]]:
    """The ``side`` records of a daemon home (empty when it has none), in file order; a
    torn or foreign line is skipped with a warning; a directive recorded twice
    (re-fetched after a crash) keeps its last line."""
    rows = read_json_lines(Path(home) / EXCHANGES_FILE, _record, "knexad.exchanges.bad_line")
    return list({rec["directive"]: rec for rec in rows if rec["side"] == side}.values())
