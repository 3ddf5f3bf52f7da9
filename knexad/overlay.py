"""The daemon's place in the overlay: which addresses it tells the CPM, its relay
reservation and its reachability (docs/networking.md).

Why a module of its own: ``p2p.relay`` knows libp2p but not our config or status file;
the daemon only starts this service and hands ``node`` to the student, which dials
with it (direct → DCUtR → relayed). Everything an operator reads — ``knexad status``,
``knexad doctor``, the metrics — comes from the ``DaemonState`` fields written here.
"""

from __future__ import annotations

from typing import Any

import multiaddr
import structlog
import trio
from libp2p.peer.peerinfo import PeerInfo

from knexad.config import DaemonConfig
from knexad.state import StateFile
from p2p.host import parse_peer_addr
from p2p.relay import RelayNode, check_reachability, is_circuit

log = structlog.get_logger(__name__)


def cpm_relay_info(cfg: DaemonConfig) -> PeerInfo:
    """The CPM as a relay: its one identity with *every* configured address
    (``cpm = [...]``, the replicas), so the keeper fails over from a dead replica to the
    next (``p2p.relay.RelayNode.reserve``) instead of retrying the first forever."""
    infos = [parse_peer_addr(a) for a in cfg.cpm_addrs]
    return PeerInfo(infos[0].peer_id, [a for info in infos for a in info.addrs])


class Overlay:
    """Service: the relay reservation keeper plus a reachability check at start and
    after every (re-)reservation — a new reservation means a new connection to the CPM,
    e.g. after a CPM restart or a network change."""

    def __init__(self, host: Any, cfg: DaemonConfig, state: StateFile, direct_addrs: list[str]) -> None:
        self.host, self.cfg, self.state = host, cfg, state
        self.direct = [a for a in direct_addrs if not is_circuit(a)]
        self.cpm = cpm_relay_info(cfg)
        net = cfg.network
        self.node = RelayNode(
            host, self.cpm if net.relay else None, holepunch=net.holepunch, dial_s=cfg.timeouts.dial_s,
            retry_base_s=cfg.retry.base_s, retry_max_s=cfg.retry.max_s, on_change=self._changed,
        )
        self._check = trio.Event()
        self.checks = 0

    def advertised(self) -> list[str]:
        """What Register carries (``network.advertise``); the circuit address only once
        a reservation succeeded (a relay that refuses us would make it a dead end)."""
        circuit = self.node.circuit_addrs() if self.node.reservations > 0 else []
        mode = self.cfg.network.advertise
        if mode == "direct":
            return list(self.direct)
        if mode == "relay-only":
            return circuit
        return self.direct + circuit

    def _changed(self, node: RelayNode) -> None:
        self.state.update(advertised=self.advertised(), relay_reserved=node.reserved,
                          relay_reservations=node.reservations)
        if node.reserved:
            self._check.set()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.state.update(advertised=self.advertised())
        async with trio.open_nursery() as nursery:
            if self.cfg.network.reachability:
                nursery.start_soon(self._reachability)
                if not self.cfg.network.relay:
                    self._check.set()  # no reservation will trigger it: check once now
            await nursery.start(self.node.run)
            log.info("daemon.overlay", relay=self.cfg.network.relay, reserved=self.node.reserved,
                     advertised=self.advertised())
            task_status.started()

    async def _reachability(self) -> None:
        while True:
            await self._check.wait()
            self._check = trio.Event()
            # relay-only pretends to have no dialable address: ask about none (→ private)
            addrs = [] if self.cfg.network.advertise == "relay-only" else [
                multiaddr.Multiaddr(a.split("/p2p/", 1)[0]) for a in self.direct]
            result = await check_reachability(self.host, self.cpm, addrs, timeout_s=self.cfg.timeouts.request_s)
            self.checks += 1
            self.state.update(reachability=result)
