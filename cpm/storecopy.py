"""``knexa-cpm migrate --from LOCATION --to LOCATION``: copy a CPM store into an empty one
(typically a single node's SQLite file into the PostgreSQL database its replicas will
share, docs/operations.md "High availability"), then prove the copy.

Why through the ``Store`` interface and not a dump: the two backends keep different
types (BIGINT vs INTEGER, ``double precision[]`` vs JSON vectors, trigger-kept vs
SQLite-kept tallies); writing every row with the same methods the node uses lets each
backend keep its own tallies and invariants, and reading every row back through the
same interface compares what the node will actually see.

All of it is one transaction on the destination: the rows are written, read back and
compared — agents, profiles (vectors bit for bit), rounds, directives (with the
CPM-signed envelopes, so directives already out still verify), feedback, the counts,
and the strategy state (bandit and reputation) — and only then committed. A mismatch
rolls everything back (``CopyMismatch``, nothing written). The source is opened
read-only; stop the node first (a running node may write after the copy read).
A destination that already holds agents, rounds or feedback is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from cpm.store import Store, StoreError, open_store

log = structlog.get_logger(__name__)


class CopyMismatch(StoreError):
    """The destination read back differs from the source (nothing was committed)."""


@dataclass(frozen=True, slots=True)
class CopyReport:
    source: str
    destination: str
    counts: dict[str, int]
    bandit_state: bool


def copy_store(source: str, destination: str, *, now_ms: int) -> CopyReport:
    """Copy ``source`` into the empty store at ``destination`` and verify it."""
    src = open_store(source, readonly=True)
    try:
        dst = open_store(destination)
        try:
            return _copy(src, dst, now_ms)
        finally:
            dst.close()
    finally:
        src.close()


def _copy(src: Store, dst: Store, now_ms: int) -> CopyReport:
    busy = {k: v for k, v in dst.counts().items() if v}
    if busy:
        raise StoreError(f"{dst.location} is not empty ({', '.join(f'{k}={v}' for k, v in sorted(busy.items()))}); "
                         "migrate copies into a new store only")
    agents = src.list_agents()
    with dst.transaction():
        for a in agents:
            if a.registered_at is not None:
                dst.register(a.peer_id, org=a.org, family=a.family, listen_addrs=a.listen_addrs,
                             agent_version=a.agent_version, now_ms=a.registered_at)
            if a.admitted_at is not None:
                dst.admit(a.peer_id, a.org, a.admitted_at)
            if a.revoked or (a.admitted_at is not None and not a.admitted):
                dst.revoke(a.peer_id, now_ms)
        for p in src.list_profiles():
            dst.put_profile(p["peer_id"], p["round"], p["vector"], p["transfer_hash"], p["received_at"])
        for r in src.list_rounds():
            dst.open_round(r.round, r.opened_at)
            if r.matched_at is not None:
                dst.set_round_matched(r.round, r.matched_at)
            if r.closed_at is not None:
                dst.set_round_closed(r.round, r.closed_at)
        for d in src.list_directives():
            dst.add_directive(d)
        for f in src.list_feedback():
            dst.add_feedback(f)
        for a in agents:  # last: put_profile moved last_seen to the profile's time
            if a.last_seen is not None:
                dst.touch(a.peer_id, a.last_seen)
        bandit = src.load_bandit_state()
        if bandit is not None:
            dst.save_bandit_state(bandit[0], bandit[1], now_ms)
        _verify(src, dst)  # still inside the transaction: a mismatch rolls it all back
    counts = dst.counts()
    log.info("cpm.store.migrated", source=src.location, destination=dst.location, **counts)
    return CopyReport(src.location, dst.location, counts, bandit is not None)


def _verify(src: Store, dst: Store) -> None:
    checks = (
        ("counts", lambda s: s.counts()),
        ("agents", lambda s: s.list_agents()),
        ("profiles", lambda s: s.list_profiles()),
        ("rounds", lambda s: s.list_rounds()),
        ("directives", lambda s: s.list_directives()),
        ("feedback", lambda s: s.list_feedback()),
        ("bandit state", lambda s: s.load_bandit_state()),
    )
    for what, read in checks:
        a, b = read(src), read(dst)
        if a != b:
            raise CopyMismatch(f"{what} differ after the copy into {dst.location}; nothing was written")
