"""p2p.preauth without sockets: slot accounting, the read budget, log suppression, and
the py-libp2p version the mitigation was checked against."""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from libp2p.abc import IRawConnection
from libp2p.connection_types import ConnectionType
from structlog.testing import capture_logs

from p2p.preauth import (
    VERIFIED_LIBP2P,
    BudgetedConn,
    PendingHandshakes,
    PreauthBudgetExceeded,
    PreauthLimits,
    _RefusalLog,
    address_key,
)

REPO = Path(__file__).resolve().parents[2]


def test_libp2p_is_the_pinned_version() -> None:
    """The bound leans on 0.8.1 internals (Swarm.upgrader, read_exactly in multistream,
    SecureSession.read looping to n). Another version needs a fresh look."""
    installed = version("libp2p")
    assert installed == VERIFIED_LIBP2P, (
        f"libp2p {installed} is installed, the pre-auth mitigation (p2p/preauth.py) was checked against "
        f"{VERIFIED_LIBP2P}: re-check that build_host still installs PreauthUpgrader on the swarm's upgrade "
        f"path and that tests/integration/test_preauth.py still fails without it; from 0.8.2 on, upstream's "
        f"fix for GHSA-hmjq-g7pp-rw3x may make the read budget redundant (keep the per-address, total and "
        f"deadline caps unless it covers those too), then bump VERIFIED_LIBP2P"
    )
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = [d for d in deps if d.replace(" ", "").startswith("libp2p")]
    assert pinned == [f"libp2p=={VERIFIED_LIBP2P}"], f"pyproject.toml must pin libp2p=={VERIFIED_LIBP2P} exactly"


def test_pending_slots_per_key_and_in_total() -> None:
    p = PendingHandshakes(per_ip=2, total=3)
    assert [p.try_admit("a"), p.try_admit("a"), p.try_admit("a")] == [None, None, "per_ip_limit"]
    assert p.try_admit("b") is None
    assert p.try_admit("c") == "total_limit"
    p.release("a")
    assert p.try_admit("c") is None and p.total == 3
    for key in ("a", "b", "c", "c", "zzz"):  # releasing more than was taken is harmless
        p.release(key)
    assert p.total == 0 and p.held("a") == 0 and p._by_key == {}


@pytest.mark.parametrize(("ip", "key"), [
    ("203.0.113.7", "203.0.113.7"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),  # same /64, same key
    ("::ffff:192.0.2.1", "192.0.2.1"),
    ("not-an-ip", "not-an-ip"),
])
def test_address_key(ip: str, key: str) -> None:
    assert address_key(ip) == key


class FakeConn(IRawConnection):
    """Endless filler; records the sizes it was asked for."""

    is_initiator = False

    def __init__(self) -> None:
        self.asked: list[int | None] = []

    async def read(self, n: int | None = None) -> bytes:
        self.asked.append(n)
        return b"\0" * (n if n is not None else 65536)

    async def write(self, data: bytes) -> None:
        pass

    async def close(self) -> None:
        pass

    def get_remote_address(self):
        return ("127.0.0.1", 4242)

    def get_transport_addresses(self):
        return []

    def get_connection_type(self) -> ConnectionType:
        return ConnectionType.DIRECT


async def test_budget_caps_every_read_then_refuses_then_lifts() -> None:
    raw = FakeConn()
    conn = BudgetedConn(raw, 10_000)
    assert len(await conn.read(4000)) == 4000
    assert len(await conn.read(1 << 30)) == 6000  # asked the socket for what was left, not 1 GiB
    assert raw.asked == [4000, 6000]
    with pytest.raises(PreauthBudgetExceeded):
        await conn.read(1)
    assert conn.exceeded and conn.bytes_read == 10_000
    conn.lift()
    assert len(await conn.read(1 << 20)) == 1 << 20
    assert conn.get_remote_address() == ("127.0.0.1", 4242) and not conn.is_initiator


async def test_budget_bounds_reads_without_a_size() -> None:
    raw = FakeConn()
    conn = BudgetedConn(raw, 1500)
    assert len(await conn.read()) == 1500 and raw.asked == [1500]
    assert await conn.read(0) == b""


def test_refusal_log_is_rate_limited_per_reason_and_address() -> None:
    t = [0.0]
    refusal_log = _RefusalLog(window_s=10.0, clock=lambda: t[0])
    with capture_logs() as logs:
        for _ in range(5):
            refusal_log("per_ip_limit", "10.0.0.1", remote="10.0.0.1:1")
        refusal_log("per_ip_limit", "10.0.0.2", remote="10.0.0.2:1")
        refusal_log("deadline", "10.0.0.1", remote="10.0.0.1:2")
        t[0] = 11.0
        refusal_log("per_ip_limit", "10.0.0.1", remote="10.0.0.1:3")
    assert [(e["event"], e["reason"], e["remote"], e.get("suppressed", 0)) for e in logs] == [
        ("p2p.preauth.refused", "per_ip_limit", "10.0.0.1:1", 0),
        ("p2p.preauth.refused", "per_ip_limit", "10.0.0.2:1", 0),
        ("p2p.preauth.refused", "deadline", "10.0.0.1:2", 0),
        ("p2p.preauth.refused", "per_ip_limit", "10.0.0.1:3", 4),
    ]


def test_limits_are_validated() -> None:
    assert PreauthLimits() == PreauthLimits(64 * 1024, 8, 64, 10.0)
    for bad in ({"read_budget": 10}, {"per_ip": 0}, {"total": 0}, {"handshake_deadline_s": 0}):
        with pytest.raises(ValueError):
            PreauthLimits(**bad)
