"""``knexa-cpm watch``: a live view of a running federation, read from the CPM's own
database (or over ``/knexa/admin/1.0.0``), refreshed in place.

Why from the store: it is what the node committed, so the view shows exactly what the
matchmaker knows — rounds, this round's pairs and their rewards, quarantined teachers,
which agents are up (seen recently) or down — with no extra endpoint on the node. The
queries are the admin listings (``cpm.admin.query_rows``), so ``--remote`` shows the
same thing for an operator who is not on the CPM host.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Group
from rich.table import Table

UP_WITHIN_MS = 120_000  # seen within the replay window: up; otherwise down

Fetch = Callable[[str, int], list[dict[str, Any]]]  # (what, round) → admin rows


def short(peer: str) -> str:
    return f"{peer[:12]}…{peer[-4:]}" if len(peer) > 20 else peer


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def snapshot(fetch: Fetch) -> dict[str, Any]:
    """One consistent-enough read of everything the view shows."""
    stats = (fetch("stats", -1) or [{}])[0]
    current = int(stats.get("round", 0) or 0)
    return {
        "stats": stats,
        "agents": fetch("agents", -1),
        "rounds": fetch("rounds", -1)[-8:],
        "pairs": fetch("pairs", current),
        "quarantine": fetch("quarantine", -1),
    }


def render(snap: dict[str, Any], now_ms: int) -> Group:
    """The view for one snapshot: a headline and four tables."""
    stats = snap["stats"]
    agents = [a for a in snap["agents"] if a.get("admitted") and not a.get("revoked")]
    up = [a for a in agents if a.get("last_seen") and now_ms - int(a["last_seen"]) <= UP_WITHIN_MS]
    headline = Table.grid(padding=(0, 2))
    headline.add_row(f"round {stats.get('round', 0)} ({stats.get('state', '-')})",
                     f"agents up {len(up)}/{len(agents)}",
                     f"quarantined {len(snap['quarantine'])}",
                     f"mean reward {_num(stats.get('mean_reward'))}")

    rounds = Table(title="rounds (latest 8)", title_justify="left")
    for col in ("round", "state", "profiles", "pairs", "feedback"):
        rounds.add_column(col, justify="right")
    for r in snap["rounds"]:
        rounds.add_row(*(str(r.get(c, "")) for c in ("round", "state", "profiles", "pairs", "feedback")))

    pairs = Table(title=f"pairs of round {stats.get('round', 0)}", title_justify="left")
    for col in ("teacher", "student", "arm", "state", "ok", "reward"):
        pairs.add_column(col)
    for p in snap["pairs"]:
        pairs.add_row(short(p["teacher"]), short(p["student"]), str(p["arm"]), str(p["state"]),
                      _num(p.get("ok")), _num(p.get("reward")))

    members = Table(title="agents", title_justify="left")
    for col in ("peer", "org", "family", "status"):
        members.add_column(col)
    up_ids = {a["peer_id"] for a in up}
    for a in agents:
        members.add_row(short(a["peer_id"]), str(a.get("org", "")), str(a.get("family") or "-"),
                        "up" if a["peer_id"] in up_ids else "down")

    quarantine = Table(title="quarantined teachers", title_justify="left")
    for col in ("teacher", "org", "reason", "harmful", "since round"):
        quarantine.add_column(col)
    for q in snap["quarantine"]:
        quarantine.add_row(short(q["teacher"]), str(q.get("org", "")), str(q.get("reason", "")),
                           f"{q.get('harmful', 0)}/{q.get('deliveries', 0)}", str(q.get("quarantined_round", "")))
    return Group(headline, rounds, pairs, members, quarantine)


def watch(fetch: Fetch, console: Any, *, interval_s: float, count: int,
          clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep) -> int:
    """Refresh the view every ``interval_s`` until Ctrl-C, or ``count`` times (> 0).
    In place on a terminal; one frame after another otherwise (logs, tests)."""
    from rich.live import Live

    live = Live(console=console, auto_refresh=False, transient=False) if console.is_terminal else None
    show: Callable[[Group], None] = console.print if live is None else lambda g: live.update(g, refresh=True)
    shown = 0
    if live is not None:
        live.start()
    try:
        while True:
            show(render(snapshot(fetch), int(clock() * 1000)))
            shown += 1
            if count and shown >= count:
                return shown
            sleep(interval_s)
    finally:
        if live is not None:
            live.stop()
