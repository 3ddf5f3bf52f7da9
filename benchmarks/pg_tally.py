"""PostgreSQL tallies: trigger-kept counters vs computing the counts in SQL.

    python -m benchmarks.pg_tally [--agents 10000] [--writes 400] [--json]

Why this exists: the engine asks ``count_fresh`` (profiles of the round from admitted
agents) and ``count_active`` (agents seen since t) on every request. The SQLite backend
reads them from trigger-kept tallies; the PostgreSQL backend could instead count with
SQL (no triggers, simpler schema). This measures both on a throwaway server
(``benchmarks.pgserver``) with ``--agents`` admitted, registered agents, each with a
profile in round 1:

* per call: ``count_fresh``/``count_active`` from the tallies vs the plain ``COUNT(*)``
  queries they replace (medians of repeated calls);
* per write: ``put_profile`` inside a group-commit batch with the tally triggers enabled
  vs disabled (``ALTER TABLE … DISABLE TRIGGER USER``), alternating, medians — a write
  that moves its agent to a new second, so both triggers fire.

The counts must agree (checked). Result in docs/performance.md ("PostgreSQL backend").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

FRESH = ("SELECT COUNT(*) FROM profiles p JOIN agents a ON a.peer_id = p.peer_id "
         "WHERE p.round = %s AND a.admitted AND NOT a.revoked")
ACTIVE = ("SELECT COUNT(*) FROM agents WHERE admitted AND NOT revoked AND registered_at IS NOT NULL "
          "AND last_seen >= %s")


def _ms_per_call(fn: Callable[[], Any], n: int, repeats: int = 5) -> float:
    fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n * 1000)
    return round(statistics.median(runs), 3)


def run(agents: int = 10_000, writes: int = 400) -> dict[str, Any]:
    import logging

    import structlog

    from benchmarks.ingest import add_background_agents
    from benchmarks.pgserver import PgServer
    from cpm.store import open_store

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    now = 1_700_000_000_000
    with PgServer() as server:
        store: Any = open_store(server.create_database("tally"))
        try:
            add_background_agents(store, agents, now)
            q = store.db.execute  # the backend's own connection: raw SQL for the comparison
            q("ANALYZE")
            since = now - 600_000
            assert int(q(FRESH, (1,)).fetchone()[0]) == store.count_fresh(1) == agents
            assert int(q(ACTIVE, (since,)).fetchone()[0]) == store.count_active(since) == agents
            out: dict[str, Any] = {
                "agents": agents,
                "count_fresh_tally_ms": _ms_per_call(lambda: store.count_fresh(1), 200),
                "count_fresh_sql_ms": _ms_per_call(lambda: q(FRESH, (1,)).fetchone(), 10),
                "count_active_tally_ms": _ms_per_call(lambda: store.count_active(since), 200),
                "count_active_sql_ms": _ms_per_call(lambda: q(ACTIVE, (since,)).fetchone(), 10),
            }

            def batch_writes(round_: int) -> float:
                t0 = time.perf_counter()
                for i in range(writes):
                    with store.grouped(), store.transaction():
                        store.put_profile(f"background-{i:06d}", round_, [0.5] * 32, "h", now + 2000 * round_ + i)
                    if i % 16 == 15:
                        store.commit_batch()
                store.commit_batch()
                return (time.perf_counter() - t0) / writes * 1000

            per: dict[str, list[float]] = {"with": [], "without": []}
            for rep in range(4):
                for tag in ("with", "without"):
                    verb = "ENABLE" if tag == "with" else "DISABLE"
                    q(f"ALTER TABLE profiles {verb} TRIGGER USER")
                    q(f"ALTER TABLE agents {verb} TRIGGER USER")
                    per[tag].append(batch_writes(2 + 2 * rep + (tag == "without")))
            q("ALTER TABLE profiles ENABLE TRIGGER USER")
            q("ALTER TABLE agents ENABLE TRIGGER USER")
            out["put_profile_with_triggers_ms"] = round(statistics.median(per["with"][1:]), 3)
            out["put_profile_without_triggers_ms"] = round(statistics.median(per["without"][1:]), 3)
        finally:
            store.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=10_000)
    ap.add_argument("--writes", type=int, default=400)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    res = run(args.agents, args.writes)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    print(f"PostgreSQL tallies, {res['agents']} admitted agents with a profile each (medians, ms)")
    print(f"count_fresh:  tally {res['count_fresh_tally_ms']}  vs SQL count {res['count_fresh_sql_ms']}")
    print(f"count_active: tally {res['count_active_tally_ms']}  vs SQL count {res['count_active_sql_ms']}")
    print(f"put_profile in a batch: with triggers {res['put_profile_with_triggers_ms']}  "
          f"without {res['put_profile_without_triggers_ms']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
