"""A running ``knexa-cpm serve`` under the GHSA-hmjq-g7pp-rw3x attack (issue 14 §4).

24 unauthenticated TCP clients announce a 1 GiB multistream protocol name and stream
filler (up to 32 MiB each: 768 MiB in all, what py-libp2p 0.8.1 alone would buffer).
The CPM's RSS, sampled from /proc, must grow by less than 256 MiB; the node must stay
up, close every hostile connection, and still answer a fresh peer's ``Register`` over
Noise + yamux. Same functions as ``python -m benchmarks.preauth``."""

from __future__ import annotations

import pytest

from benchmarks.preauth import attack, refusals

from .conftest import cpm_init, start_cpm

pytestmark = pytest.mark.timeout(120)

CONNECTIONS = 24
MAX_GROWTH_MIB = 256


def test_hostile_multistream_clients_do_not_exhaust_cpm_memory(tmp_path, procs) -> None:
    home = tmp_path / "cpm"
    cpm_init(home, "--open")
    cpm = start_cpm(procs, home)
    report = attack(cpm.pid, cpm.ready["addrs"][0], CONNECTIONS, announce=1 << 30, limit_bytes=32 << 20,
                    seconds=15.0)
    assert report["growth_mib"] < MAX_GROWTH_MIB, report
    assert cpm.alive, cpm.stderr()[-3000:]
    assert report["legit_answered"], report
    assert report["closed_by_node"] == CONNECTIONS, report
    # the node said why it closed them (rate-limited lines; per_ip_limit only when more
    # than 8 happened to be mid-handshake at once)
    reasons = set(refusals(cpm.stderr()))
    assert "oversized" in reasons and reasons <= {"oversized", "per_ip_limit", "total_limit"}, reasons
