"""Bounds on connections that are not upgraded yet (issue 14 §4, GHSA-hmjq-g7pp-rw3x).

Why: py-libp2p 0.8.1 reads a multistream-select message with ``read_exactly(<announced
length>)``, before Noise and over it, so an unauthenticated client that announces a
1 GiB protocol name makes the node buffer whatever it sends. Why here: ``build_host``
gives its swarm a ``PreauthUpgrader`` (a ``TransportUpgrader`` subclass we construct,
not a library global), which reads the raw connection through a byte budget until the
muxer is negotiated, caps concurrent un-upgraded inbound connections per address and in
all, and drops an upgrade that misses its deadline. The seam, the limits, the refusal
log, the measurements and what stays uncovered (stream negotiation on an upgraded
connection): docs/threat-model.md §Pre-authentication bounds and §Known limits.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import time
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import structlog
import trio
from libp2p.abc import IMuxedConn, IRawConnection, ISecureConn
from libp2p.connection_types import ConnectionType
from libp2p.io.exceptions import IOException
from libp2p.peer.id import ID
from libp2p.transport.exceptions import MuxerUpgradeFailure, SecurityUpgradeFailure
from libp2p.transport.upgrader import TransportUpgrader

log = structlog.get_logger(__name__)

# The py-libp2p release whose upgrade path (swarm → upgrader → raw connection) this
# module was checked against; tests fail on any other (re-check, or drop for 0.8.2's fix).
VERIFIED_LIBP2P = "0.8.1"

READ_BUDGET = 64 * 1024  # bytes a connection may send before it is upgraded
PER_IP = 8  # concurrent inbound upgrades per source address (IPv6: per /64)
TOTAL = 64  # concurrent inbound upgrades in all
HANDSHAKE_DEADLINE_S = 10.0  # whole inbound upgrade: security + Noise + muxer
LOG_WINDOW_S = 10.0  # one refusal line per (reason, address) per window

_UPGRADE_ATTR = "_knexa_preauth_upgrade"  # set on the Noise session between the two phases


@dataclass(frozen=True, slots=True)
class PreauthLimits:
    read_budget: int = READ_BUDGET
    per_ip: int = PER_IP
    total: int = TOTAL
    handshake_deadline_s: float = HANDSHAKE_DEADLINE_S

    def __post_init__(self) -> None:
        if self.read_budget < 1024 or self.per_ip < 1 or self.total < 1 or not self.handshake_deadline_s > 0:
            raise ValueError("need read_budget ≥ 1024, per_ip ≥ 1, total ≥ 1, handshake_deadline_s > 0")


class PreauthBudgetExceeded(IOException):
    """The remote sent more than ``read_budget`` bytes before the upgrade finished.

    An ``IOException`` so py-libp2p's multistream code turns it into its own
    negotiation failure, exactly like a dropped connection."""


def address_key(ip: str) -> str:
    """The unit a per-address cap counts: the IPv4 address, or the IPv6 /64 (an IPv6
    host usually owns a whole /64, so per-address would be no cap at all)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class PendingHandshakes:
    """Counts inbound upgrades in progress per address key and in all (no I/O).

    ``try_admit`` checks and takes a slot with no checkpoint in between, so concurrent
    trio tasks cannot overshoot. Only keys with a pending upgrade are stored (≤ total)."""

    def __init__(self, per_ip: int, total: int) -> None:
        self.per_ip = per_ip
        self.max_total = total
        self.total = 0
        self._by_key: dict[str, int] = {}

    def try_admit(self, key: str) -> str | None:
        """Take a slot for ``key``; return None, or the refusal reason."""
        held = self._by_key.get(key, 0)
        if held >= self.per_ip:
            return "per_ip_limit"
        if self.total >= self.max_total:
            return "total_limit"
        self._by_key[key] = held + 1
        self.total += 1
        return None

    def release(self, key: str) -> None:
        held = self._by_key.get(key, 0)
        if held <= 0:
            return
        if held == 1:
            del self._by_key[key]
        else:
            self._by_key[key] = held - 1
        self.total -= 1

    def held(self, key: str) -> int:
        return self._by_key.get(key, 0)


class BudgetedConn(IRawConnection):
    """The raw connection, read through a byte budget until ``lift()``.

    Each ``read(n)`` asks the socket for at most what is left of the budget, so no
    caller — whatever length it was told — can make us hold more than ``budget``
    bytes from this peer before the upgrade finishes."""

    def __init__(self, conn: IRawConnection, budget: int) -> None:
        self._conn = conn
        self.is_initiator = conn.is_initiator
        self._budget: int | None = budget
        self.bytes_read = 0
        self.exceeded = False

    def lift(self) -> None:
        self._budget = None

    async def read(self, n: int | None = None) -> bytes:
        if self._budget is None:
            return await self._conn.read(n)
        if n == 0:
            return b""
        left = self._budget - self.bytes_read
        if left <= 0:
            self.exceeded = True
            raise PreauthBudgetExceeded(f"more than {self._budget} bytes before the upgrade finished")
        data = await self._conn.read(left if n is None or n < 0 else min(n, left))
        self.bytes_read += len(data)
        return data

    async def write(self, data: bytes) -> None:
        await self._conn.write(data)

    async def close(self) -> None:
        await self._conn.close()

    def get_remote_address(self) -> tuple[str, int] | None:
        return self._conn.get_remote_address()

    def get_transport_addresses(self) -> list[Any]:
        return self._conn.get_transport_addresses()

    def get_connection_type(self) -> ConnectionType:
        return self._conn.get_connection_type()

    def __getattr__(self, name: str) -> Any:
        """Anything else py-libp2p asks a raw connection for (``stream``, …)."""
        return getattr(self._conn, name)


class _RefusalLog:
    """``p2p.preauth.refused`` lines, at most one per (reason, address key) per window;
    the next line carries how many were ``suppressed``. The table is bounded."""

    MAX_KEYS = 1024

    def __init__(self, window_s: float = LOG_WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def __call__(self, reason: str, key: str, **fields: Any) -> None:
        now = self.clock()
        last = self._last.get((reason, key))
        if last is not None and now - last[0] < self.window_s:
            self._last[(reason, key)] = (last[0], last[1] + 1)
            return
        self._last.pop((reason, key), None)
        self._last[(reason, key)] = (now, 0)
        if len(self._last) > self.MAX_KEYS:
            del self._last[next(iter(self._last))]
        extra = {"suppressed": last[1]} if last is not None and last[1] else {}
        log.warning("p2p.preauth.refused", reason=reason, **fields, **extra)


@dataclass(slots=True, eq=False)
class _Upgrade:
    """One connection between its first byte and its negotiated muxer."""

    conn: BudgetedConn
    remote: str
    key: str
    direction: str
    deadline: float  # trio clock; inf for outbound (the dial has its own timeouts)
    release: Callable[[str], None] | None  # gives back the pending slot (inbound only)

    def end(self) -> None:
        """Lift the budget and give the slot back (idempotent)."""
        self.conn.lift()
        if self.release is not None:
            release, self.release = self.release, None
            release(self.key)


def _remote_of(conn: IRawConnection) -> tuple[str, str]:
    """(``ip:port`` for logs, the address key for caps) of a raw connection."""
    addr = conn.get_remote_address()
    if addr is None:
        return "unknown", "unknown"
    ip, port = addr
    return (f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"), address_key(ip)


class PreauthUpgrader(TransportUpgrader):
    """``TransportUpgrader`` that bounds reads, concurrency and time before the upgrade."""

    def __init__(self, secure_transports_by_protocol: Any, muxer_transports_by_protocol: Any,
                 negotiate_timeout: int, limits: PreauthLimits | None = None, *,
                 log_window_s: float = LOG_WINDOW_S) -> None:
        super().__init__(secure_transports_by_protocol, muxer_transports_by_protocol, negotiate_timeout)
        self.limits = limits or PreauthLimits()
        self.pending = PendingHandshakes(self.limits.per_ip, self.limits.total)
        self.refused: Counter[str] = Counter()
        self._log = _RefusalLog(log_window_s)

    def _refuse(self, reason: str, up: _Upgrade, failure: type[Exception], **fields: Any) -> Exception:
        self.refused[reason] += 1
        self._log(reason, up.key, remote=up.remote, direction=up.direction, **fields)
        return failure(f"pre-upgrade bound ({reason}) for {up.remote}")

    async def _bounded(self, up: _Upgrade, step: Callable[[], Awaitable[Any]],
                       failure: type[Exception]) -> Any:
        """Run one upgrade phase under the deadline; name the bound that ended it."""
        try:
            with trio.move_on_at(up.deadline):
                return await step()
        except Exception as exc:
            if up.conn.exceeded:
                raise self._refuse("oversized", up, failure, bytes=up.conn.bytes_read) from exc
            raise
        raise self._refuse("deadline", up, failure, bytes=up.conn.bytes_read,
                           deadline_s=self.limits.handshake_deadline_s)

    async def upgrade_security(self, raw_conn: IRawConnection, is_initiator: bool,
                               peer_id: ID | None = None) -> ISecureConn:
        remote, key = _remote_of(raw_conn)
        bounded = BudgetedConn(raw_conn, self.limits.read_budget)
        if is_initiator:
            up = _Upgrade(bounded, remote, key, "outbound", math.inf, None)
        else:
            reason = self.pending.try_admit(key)
            up = _Upgrade(bounded, remote, key, "inbound",
                          trio.current_time() + self.limits.handshake_deadline_s, self.pending.release)
            if reason is not None:
                up.release = None  # no slot was taken
                raise self._refuse(reason, up, SecurityUpgradeFailure, pending=self.pending.held(key),
                                   total=self.pending.total)
        secure_step = super().upgrade_security
        try:
            secure = await self._bounded(up, lambda: secure_step(bounded, is_initiator, peer_id),
                                         SecurityUpgradeFailure)
        except BaseException:
            up.end()
            raise
        setattr(secure, _UPGRADE_ATTR, up)
        weakref.finalize(secure, up.end)  # slot back even if the muxer phase never runs
        return secure

    async def upgrade_connection(self, conn: ISecureConn, peer_id: ID) -> IMuxedConn:
        up: _Upgrade | None = getattr(conn, _UPGRADE_ATTR, None)
        muxer_step = super().upgrade_connection
        if up is None:  # not secured by us: nothing to bound
            return await muxer_step(conn, peer_id)
        try:
            return await self._bounded(up, lambda: muxer_step(conn, peer_id), MuxerUpgradeFailure)
        finally:
            up.end()


def install(host: Any, secure_transports_by_protocol: Any, muxer_transports_by_protocol: Any,
            negotiate_timeout: int, limits: PreauthLimits | None = None) -> PreauthUpgrader:
    """Give ``host``'s swarm a ``PreauthUpgrader`` built from the same options.

    Refuses (RuntimeError) if the swarm no longer keeps its upgrader where 0.8.1 does:
    the bound would silently not apply."""
    swarm = host.get_network()
    if not isinstance(getattr(swarm, "upgrader", None), TransportUpgrader):
        raise RuntimeError("py-libp2p swarm has no TransportUpgrader `upgrader`: re-check p2p/preauth.py")
    upgrader = PreauthUpgrader(secure_transports_by_protocol, muxer_transports_by_protocol,
                               negotiate_timeout, limits)
    swarm.upgrader = upgrader
    if installed_libp2p() != VERIFIED_LIBP2P:
        log.warning("p2p.preauth.unverified_libp2p", installed=installed_libp2p(), verified=VERIFIED_LIBP2P)
    return upgrader


@functools.cache
def installed_libp2p() -> str:
    try:
        return version("libp2p")
    except PackageNotFoundError:
        return "unknown"
