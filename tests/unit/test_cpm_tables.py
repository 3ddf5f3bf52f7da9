"""CPM tables are for people: UTC times and short peer IDs; --json keeps the raw values."""

from __future__ import annotations

from cpm.cli import _fmt

PEER = "12D3KooWL9jXJLgYVUJA6VE8nJ1zVk6h4RFooCUaz5FmwXY46ZpM"


def test_times_are_utc_and_peer_ids_short_unless_wide() -> None:
    assert _fmt("registered_at", 1_796_601_600_000) == "2026-12-07 00:00:00"
    assert _fmt("last_seen", 1_796_601_600_000) == "2026-12-07 00:00:00"
    assert _fmt("round", 1_796_601_600_000) == "1796601600000"  # only time columns
    assert _fmt("teacher", PEER) == "12D3KooWL9jX…6ZpM"
    assert _fmt("teacher", PEER, wide=True) == PEER
    assert _fmt("admitted", True) == "True" and _fmt("x", None) == "-" and _fmt("gain", 0.123456) == "0.1235"
