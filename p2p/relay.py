"""Circuit relay v2, reachability and the direct-first dial order (issue 17, docs/networking.md).

Why: a daemon behind NAT cannot be dialled, so the CPM node — the one member every
daemon already reaches — also relays. Everything below is py-libp2p 0.8.1's own
``libp2p.relay.circuit_v2`` (hop/stop protocol, transport, DCUtR) and
``libp2p.host.autonat`` wired to our Noise + yamux hosts; what we add is the part the
library leaves to applications (measured on loopback, docs/networking.md):

* ``serve_relay``: the hop service with operator-set limits (the library's defaults are
  1 GiB and 1 h per circuit).
* ``RelayNode``: the daemon's side. It accepts relayed connections (stop), keeps a
  reservation on the relay — reserve at start, refresh before expiry, re-reserve with
  backoff when the relay restarted (py-libp2p's own refresher gives up once the relay
  forgets it) — and dials in the order direct → DCUtR → relayed (``open_stream_via``).
* ``DialBackAutoNAT``: py-libp2p's AutoNAT v1 server answers "dialable" for *any*
  address of a peer that is already connected to it (its dial-back is
  ``host.connect``, which returns the existing connection: a closed port was reported
  reachable in the probe). Ours dials back on a fresh TCP connection and completes a
  Noise handshake that authenticates the peer, without registering the connection.

The relay never sees plaintext: a relayed connection is upgraded end to end by the two
peers (Noise, then yamux) over the relay's byte pipe, and the knowledge package is
additionally E2E-boxed (tests/integration/test_relay.py observes the relay's reads).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import multiaddr
import structlog
import trio
from google.protobuf.message import DecodeError
from libp2p.abc import IHost, INetStream
from libp2p.connection_types import ConnectionType
from libp2p.host.autonat.autonat import AutoNATService
from libp2p.host.autonat.pb.autonat_pb2 import Message as AutoNATMessage
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service

from p2p.rpc import open_stream, protocol_list
from p2p.streams import NET_ERRORS
from protocol.errors import PeerUnavailable

log = structlog.get_logger(__name__)

PATH_DIRECT, PATH_HOLEPUNCH, PATH_RELAY = "direct", "holepunch", "relay"
PATHS = (PATH_DIRECT, PATH_HOLEPUNCH, PATH_RELAY)
# DCUtR is one CONNECT/SYNC exchange over the relayed connection and a simultaneous dial:
# on a real path it is done within a few round trips, so a punch that has not worked by
# then will not. The relayed stream is already usable while it runs; measured on the
# NAT testbed (docs/networking.md), every punch failed and waiting the full dial deadline
# (10 s) for it was most of each exchange's time.
HOLEPUNCH_S = 3.0
REACHABILITY = ("unknown", "public", "private")
# what a failed relay step raises in 0.8.1 (RelayConnectionError is a ConnectionError)
DIAL_ERRORS: tuple[type[BaseException], ...] = (*NET_ERRORS, ConnectionError, OSError, trio.TooSlowError)


def is_circuit(addr: multiaddr.Multiaddr | str) -> bool:
    return "/p2p-circuit" in str(addr)


@dataclass(frozen=True, slots=True)
class RelayServiceLimits:
    """What one relay (the CPM node) grants. A circuit that exceeds ``circuit_bytes``
    (both directions together) or ``circuit_duration_s`` is cut by the relay; the
    daemons then redial (a fresh circuit per exchange: the student closes a relayed
    connection after its exchange)."""

    max_reservations: int = 10_000
    reservation_ttl_s: int = 3600
    circuit_bytes: int = 128 * 1024 * 1024
    circuit_duration_s: int = 600
    max_circuits_per_peer: int = 8

    def to_libp2p(self) -> RelayLimits:
        return RelayLimits(duration=self.circuit_duration_s, data=self.circuit_bytes,
                           max_circuit_conns=self.max_circuits_per_peer,
                           max_reservations=self.max_reservations, reservation_ttl=self.reservation_ttl_s)


async def serve_relay(host: IHost, limits: RelayServiceLimits, *,
                      allow: Callable[[str], Awaitable[bool]] | None = None,
                      protocol_factory: Callable[..., CircuitV2Protocol] = CircuitV2Protocol,
                      task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Run the circuit relay v2 hop service (and a dial-back AutoNAT server) on ``host``
    until cancelled. ``allow(peer_id)``: who may reserve or open circuits (the CPM: its
    admitted members; both RESERVE and CONNECT arrive on the hop protocol, so a
    stranger can neither park a reservation nor relay through us). ``protocol_factory``
    lets a test observe what the relay reads."""
    proto = protocol_factory(host, limits=limits.to_libp2p(), allow_hop=True)
    DialBackAutoNAT(host)  # registers its stream handler
    async with background_trio_service(proto):
        await proto.event_started.wait()  # its run() registers the hop handler: replace it after
        if allow is not None:
            async def gated(stream: INetStream) -> None:
                peer = stream.muxed_conn.peer_id.to_base58()
                if not await allow(peer):
                    log.warning("p2p.relay.refused", peer=peer, reason="not_allowed")
                    await stream.reset()
                    return
                await proto._handle_hop_stream(stream)

            host.set_stream_handler(HOP_PROTOCOL, gated)  # replaces the one proto.run() set
        log.info("p2p.relay.serving", max_reservations=limits.max_reservations,
                 circuit_bytes=limits.circuit_bytes, circuit_duration_s=limits.circuit_duration_s)
        task_status.started(proto)
        await trio.sleep_forever()


class DialBackAutoNAT(AutoNATService):
    """AutoNAT v1 server whose dial-back proves the address: a fresh TCP connection and
    a Noise handshake that authenticates ``peer_id`` (closed again, never registered in
    the swarm). 0.8.1's ``_try_dial`` reuses the existing connection (see module doc)."""

    DIAL_S = 5.0

    def __init__(self, host: Any) -> None:
        super().__init__(host, serve=True)

    async def _try_dial(self, peer_id: ID, addrs: list[bytes]) -> bytes | None:
        swarm = self.host.get_network()
        for raw in addrs:
            try:
                addr = multiaddr.Multiaddr(raw)
                transport = swarm.transport_manager.transport_for_dialing(addr)
                if transport is None or is_circuit(addr):
                    continue
                with trio.fail_after(self.DIAL_S):
                    conn = await transport.dial(addr)
                    try:
                        secured = await swarm.upgrader.upgrade_security(conn, True, peer_id)
                    except BaseException:
                        await conn.close()
                        raise
                    await secured.close()
                log.info("p2p.autonat.dialback", peer=peer_id.to_base58(), addr=str(addr), ok=True)
                return bytes(raw)
            except (*DIAL_ERRORS, ValueError, multiaddr.exceptions.Error) as exc:
                log.info("p2p.autonat.dialback", peer=peer_id.to_base58(), ok=False, error=type(exc).__name__)
        return None


async def check_reachability(host: Any, server: PeerInfo, addrs: Sequence[multiaddr.Multiaddr],
                             timeout_s: float = 15.0) -> str:
    """Ask ``server`` (the CPM) to dial us back on ``addrs``: ``public`` when it could,
    ``private`` when it could not (or refused: nothing dialable advertised), ``unknown``
    when the question itself failed (server unreachable or not serving AutoNAT).
    One server, so one verdict decides (``confirmations=1``; the spec's 4 needs 4
    servers, and a federation has one CPM)."""
    client = AutoNATService(host, serve=False, confirmations=1)
    try:
        with trio.fail_after(timeout_s):
            await host.connect(server)
        status, _ = await client.query_server(server.peer_id, addrs=[a.to_bytes() for a in addrs],
                                              timeout=timeout_s)
    except (*DIAL_ERRORS, ValueError, DecodeError) as exc:  # DecodeError: a garbled answer
        log.info("p2p.reachability", server=server.peer_id.to_base58(), reachability="unknown",
                 error=type(exc).__name__)
        return "unknown"
    result = "public" if status == int(AutoNATMessage.OK) else "private"
    log.info("p2p.reachability", server=server.peer_id.to_base58(), reachability=result, status=status)
    return result


# --- dialing ---------------------------------------------------------------------------


def connection_type(host: IHost, stream: INetStream) -> ConnectionType | None:
    """The swarm's type of the connection ``stream`` runs on (RELAYED or DIRECT)."""
    muxed = stream.muxed_conn
    for conn in host.get_network().get_connections(muxed.peer_id):
        if getattr(conn, "muxed_conn", None) is muxed:
            return conn.get_connection_type()
    return None


def stream_path(host: IHost, stream: INetStream, node: RelayNode | None = None) -> str:
    """``relay`` when the stream runs over a relayed connection, ``holepunch`` when over a
    direct connection that ``node``'s DCUtR made (either side's session), else ``direct``.
    Works on both ends of an exchange: the teacher calls it on the stream it accepted."""
    if connection_type(host, stream) == ConnectionType.RELAYED:
        return PATH_RELAY
    if node is not None and node.dcutr is not None and node.dcutr.made(stream.muxed_conn):
        return PATH_HOLEPUNCH
    return PATH_DIRECT


async def open_stream_via(host: IHost, node: RelayNode | None, info: PeerInfo, protocol: str | Sequence[str], *,
                          direct_s: float, dial_s: float, holepunch_s: float = HOLEPUNCH_S) -> tuple[INetStream, str]:
    """Open ``protocol`` to ``info``: direct addresses first under ``direct_s``, then each
    ``/p2p-circuit`` address (relayed connection under ``dial_s``, then DCUtR when ``node``
    has it, under ``holepunch_s``). Returns the stream and the path it took.
    ``PeerUnavailable`` when every path failed."""
    direct = [a for a in info.addrs if not is_circuit(a)]
    circuits = [a for a in info.addrs if is_circuit(a)]
    peer = info.peer_id.to_base58()
    if node is None or not circuits:
        stream = await open_stream(host, PeerInfo(info.peer_id, direct), protocol, dial_s)
        return stream, stream_path(host, stream, node)
    if direct:
        try:
            stream = await open_stream(host, PeerInfo(info.peer_id, direct), protocol, min(direct_s, dial_s))
            return stream, stream_path(host, stream, node)
        except PeerUnavailable as exc:
            log.info("p2p.dial.direct_failed", peer=peer, error=str(exc)[:200])
    reasons = []
    for circuit in circuits:
        try:
            with trio.fail_after(dial_s):
                await node.transport.dial(circuit)
        except DIAL_ERRORS as exc:
            reasons.append(f"{circuit}: {type(exc).__name__}: {exc}"[:300])
            continue
        punched = await node.hole_punch(info.peer_id, min(holepunch_s, dial_s))
        try:
            with trio.fail_after(dial_s):
                stream = await host.new_stream(info.peer_id, protocol_list(protocol))
        except DIAL_ERRORS as exc:
            reasons.append(f"stream over {circuit}: {type(exc).__name__}")
            continue
        path = stream_path(host, stream, node)
        return stream, (PATH_HOLEPUNCH if punched and path == PATH_DIRECT else path)
    raise PeerUnavailable(f"no path to {peer}: direct failed, relayed: {'; '.join(reasons) or 'none'}")


# --- hole punching ----------------------------------------------------------------------


class PunchingDCUtR(DCUtRProtocol):
    """py-libp2p 0.8.1's DCUtR with two changes (docs/networking.md §Hole punching):

    * no "unilateral upgrade" first: the library dials every non-circuit address in the
      peerstore for up to ``dial_timeout`` (10 s) before it even sends CONNECT. Our
      student has just tried those addresses (``open_stream_via`` step 1); behind a NAT
      they are private LAN addresses that time out, so the punch never started within
      its budget (measured: every punch in the first NAT run died there);
    * it remembers which connections a punch made (``made``), so both sides of an
      exchange can record the path ``holepunch`` — the swarm's connection type says only
      DIRECT. Weak references: a closed connection drops out by itself.
    """

    def __init__(self, host: IHost) -> None:
        super().__init__(host)
        self._made: weakref.WeakSet[Any] = weakref.WeakSet()
        self.successes = 0

    def made(self, muxed_conn: Any) -> bool:
        return muxed_conn in self._made

    def _direct_muxed(self, peer_id: ID) -> list[Any]:
        return [c.muxed_conn for c in self.host.get_network().get_connections(peer_id)
                if c.get_connection_type() != ConnectionType.RELAYED and getattr(c, "muxed_conn", None) is not None]

    async def _try_unilateral_upgrade(self, peer_id: ID) -> bool:
        return await self._verify_direct_connection(peer_id)

    async def _perform_hole_punch(self, peer_id: ID, addrs: list[multiaddr.Multiaddr],
                                  as_responder: bool = False) -> bool:
        before = {id(m) for m in self._direct_muxed(peer_id)}
        ok = await super()._perform_hole_punch(peer_id, addrs, as_responder)
        if ok:
            new = [m for m in self._direct_muxed(peer_id) if id(m) not in before]
            for muxed in new:
                self._made.add(muxed)
            self.successes += 1
            log.info("p2p.dcutr.punched", peer=peer_id.to_base58(), connections=len(new), responder=as_responder)
        return ok


# --- the daemon's relay client -----------------------------------------------------------


class RelayNode:
    """A daemon's relay client: accepts relayed connections, dials through relays, runs
    DCUtR (``holepunch``), and keeps a reservation on ``relay`` (None: no reservation).

    ``relay`` may list several addresses of one relay identity (the CPM's replicas share
    a key, ``cpm = [...]``): a reservation attempt tries them in turn, starting with the
    one that worked last, so a dead replica fails over to the next; when every address
    fails, the keeper backs off before the next round. A reservation lives on one
    replica only, so ``circuit_addrs`` then names the address it was made through.

    The keeper checks every ``check_s`` whether the connection the reservation was made
    on is still the relay's connection; a new one (relay restarted, or the CPM client
    reconnected) or none means the relay may have forgotten us: reserve again, with
    exponential backoff (``retry_base_s`` … ``retry_max_s``) while it fails. A live
    reservation is refreshed at ``refresh_fraction`` of its TTL, measured on ``clock``
    (injectable for tests)."""

    def __init__(self, host: IHost, relay: PeerInfo | None, *, holepunch: bool = True, dial_s: float = 10.0,
                 check_s: float = 5.0, refresh_fraction: float = 0.5, retry_base_s: float = 1.0,
                 retry_max_s: float = 60.0, clock: Callable[[], float] = time.time,
                 on_change: Callable[[RelayNode], None] | None = None,
                 sleep: Callable[[float], Awaitable[None]] = trio.sleep) -> None:
        self.host, self.relay, self.dial_s = host, relay, dial_s
        self.check_s, self.refresh_fraction = check_s, refresh_fraction
        self.retry_base_s, self.retry_max_s, self.clock = retry_base_s, retry_max_s, clock
        self.on_change, self._sleep = on_change, sleep  # sleep: injectable, tests count the back-offs
        self.protocol = CircuitV2Protocol(host, allow_hop=False)
        # STOP only: with CLIENT, 0.8.1's transport makes a reservation on every dial
        self.transport = CircuitV2Transport(host, self.protocol, RelayConfig(roles=RelayRole.STOP))
        self.dcutr = PunchingDCUtR(host) if holepunch else None
        self.reserved = False
        self.reservations = 0  # successful reservations (first one and every refresh / re-reserve)
        self.failures = 0
        self.expires = 0.0
        self._reserved_at = 0.0
        self.ttl_s = 0.0
        self._conn: Any = None
        self._index = 0  # the relay address to try first (the last one that worked)
        self.relay_addr: str | None = None  # the address our live reservation was made through
        self.ready = trio.Event()

    def circuit_addrs(self) -> list[str]:
        """Our ``…/p2p/<relay>/p2p-circuit/p2p/<us>`` addresses (empty without a relay):
        through the relay address holding our reservation, or every configured one
        before any reservation."""
        if self.relay is None:
            return []
        me, rid = self.host.get_id().to_base58(), self.relay.peer_id.to_base58()
        bases = [self.relay_addr] if self.relay_addr else [str(a).split("/p2p/", 1)[0] for a in self.relay.addrs]
        return [f"{base}/p2p/{rid}/p2p-circuit/p2p/{me}" for base in bases]

    async def hole_punch(self, peer: ID, timeout_s: float) -> bool:
        """DCUtR over the relayed connection to ``peer``; True when a direct connection
        now exists. False without DCUtR or when it failed (the relay path stays)."""
        if self.dcutr is None:
            return False
        with trio.move_on_after(timeout_s):
            try:
                return bool(await self.dcutr.initiate_hole_punch(peer))
            except DIAL_ERRORS as exc:
                log.info("p2p.dcutr.failed", peer=peer.to_base58(), error=type(exc).__name__)
        return False

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``started`` after the first reservation attempt so that
        the first Register can already carry the circuit address."""
        async with background_trio_service(self.protocol):
            if self.dcutr is None:
                await self._run(task_status)
            else:
                async with background_trio_service(self.dcutr):
                    await self._run(task_status)

    async def _run(self, task_status: Any) -> None:
        if self.relay is None:
            task_status.started()
            await trio.sleep_forever()
        await self.reserve()
        task_status.started()
        await self.keep()

    def _relay_conn(self) -> Any:
        assert self.relay is not None
        conns = self.host.get_network().get_connections(self.relay.peer_id)
        return conns[0] if conns else None

    def _due(self) -> bool:
        """A refresh is due, or the reservation may be gone (relay connection changed)."""
        if not self.reserved:
            return True
        conns = self.host.get_network().get_connections(self.relay.peer_id)  # type: ignore[union-attr]
        if self._conn is None or self._conn not in conns:
            return True
        return self.clock() >= self._reserved_at + self.ttl_s * self.refresh_fraction

    async def keep(self) -> None:
        """The keeper loop (``run`` calls it after the first attempt)."""
        attempt = 0
        while True:
            if self._due():
                if await self.reserve():
                    attempt = 0
                else:
                    delay = min(self.retry_max_s, self.retry_base_s * (2 ** attempt))
                    attempt += 1
                    await self._sleep(delay)
                    continue
            await self._sleep(self.check_s)

    async def _reserve_via(self, addr: multiaddr.Multiaddr) -> bool:
        """One reservation attempt through ``addr`` (connects first unless a connection
        to the relay's identity exists: then that one carries it).

        The dial is ``dial_addr`` on that one address, not ``host.connect``: 0.8.1's
        swarm dials at most one address per transport class of a peer (its "smart
        address selection" keeps the first TCP address in the peerstore), so with
        ``connect`` a dead first replica would be the only address ever tried."""
        assert self.relay is not None
        rid = self.relay.peer_id
        network = self.host.get_network()
        with trio.fail_after(self.dial_s):
            unblock = getattr(network, "unblock_peer", None)
            if unblock is not None:
                unblock(rid)
            if not network.get_connections(rid):
                await network.dial_addr(addr, rid)
            stream = await self.host.new_stream(rid, [HOP_PROTOCOL])
            try:
                return bool(await self.transport._make_reservation(stream, rid))
            finally:
                await stream.close()

    def _conn_addr(self, conn: Any, tried: str) -> str:
        """The configured relay address ``conn`` runs to (an existing connection may be
        to another replica than the one tried); ``tried`` when it cannot tell."""
        assert self.relay is not None
        configured = {str(a).split("/p2p/", 1)[0] for a in self.relay.addrs}
        try:
            remote = [str(a).split("/p2p/", 1)[0] for a in conn.get_transport_addresses()]
        except (AttributeError, *DIAL_ERRORS):
            remote = []
        return next((a for a in remote if a in configured), tried)

    async def reserve(self) -> bool:
        """One reservation round: each relay address once, from the last good one."""
        assert self.relay is not None
        rid = self.relay.peer_id
        was = self.reserved
        addrs = list(self.relay.addrs)
        ok = False
        errors = []
        for step in range(len(addrs)):
            index = (self._index + step) % len(addrs)
            tried = str(addrs[index]).split("/p2p/", 1)[0]
            try:
                ok = await self._reserve_via(addrs[index])
            except DIAL_ERRORS as exc:
                errors.append(f"{tried}: {type(exc).__name__}: {exc}"[:200])
                continue
            if ok:
                self._index = index
                break
            errors.append(f"{tried}: refused")
        if ok:
            self.reserved, self.reservations = True, self.reservations + 1
            self._reserved_at = self.clock()
            # the relay states expiry in Unix seconds: the TTL is relative to wall time
            self.expires = float(self.transport._reservations.get(rid, time.time() + 60))
            self.ttl_s = max(1.0, self.expires - time.time())
            self._conn = self._relay_conn()
            self.relay_addr = self._conn_addr(self._conn, str(addrs[self._index]).split("/p2p/", 1)[0])
            log.info("p2p.relay.reserved", relay=rid.to_base58(), reservations=self.reservations,
                     ttl_s=int(self.ttl_s), addr=self.relay_addr, failed_over=len(errors))
        else:
            self.reserved = False
            self.relay_addr = None
            self.failures += 1
            log.warning("p2p.relay.reserve_failed", relay=rid.to_base58(), failures=self.failures,
                        error="; ".join(errors)[:600] or "refused")
        self.ready.set()
        if self.on_change is not None and (was != self.reserved or ok):
            self.on_change(self)
        return ok
