"""The local status file: what the running daemon is doing, for `knexad status`.

Why a file and not an admin socket: `knexad status` must work when the daemon is
wedged or gone (it then shows the last known state and that the pid is not alive), and
it must not need libp2p or keys. The daemon rewrites ``<home>/state.json`` atomically
(temp + rename) whenever something an operator cares about changes.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from knexad.config import STATE_FILE
from p2p.files import atomic_write


@dataclass(slots=True)
class PeerStats:
    bytes_in: int = 0
    bytes_out: int = 0
    exchanges: int = 0
    last_seen_ms: int = 0


@dataclass(slots=True)
class DaemonState:
    peer_id: str = ""
    pid: int = 0
    status: str = "starting"  # starting | running | stopped
    addrs: list[str] = field(default_factory=list)
    cpm_connected: bool = False
    cpm_addr: str = ""  # the CPM address (of several replicas: the one) the last answer came from
    round: int = -1
    role: str = "idle"  # idle | teacher | student
    last_directive: str = ""
    last_feedback: dict[str, Any] = field(default_factory=dict)
    peers: dict[str, PeerStats] = field(default_factory=dict)
    outbox_size: int = 0
    rounds_completed: int = 0
    taught: int = 0
    learned: int = 0
    local_rounds: int = 0  # rounds trained on private data only (no distillation that round)
    steps_trained: int = 0  # optimizer steps of KD and local rounds together (equal compute)
    last_error: str = ""
    # overlay (docs/networking.md): what the CPM was told, the relay reservation, how the
    # CPM's dial-back saw us, and the path each exchange took
    advertised: list[str] | None = None  # None: no overlay service, Register carries ``addrs``
    reachability: str = "unknown"  # unknown | public | private
    relay_reserved: bool = False
    relay_reservations: int = 0
    paths: dict[str, int] = field(default_factory=dict)  # direct | holepunch | relay → exchanges
    last_path: str = ""
    updated_ms: int = 0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["peers"] = {k: asdict(v) for k, v in self.peers.items()}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DaemonState:
        known = set(cls.__dataclass_fields__)
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["peers"] = {
            k: PeerStats(**{kk: vv for kk, vv in v.items() if kk in PeerStats.__dataclass_fields__})
            for k, v in dict(data.get("peers", {})).items()
        }
        return cls(**kwargs)


class StateFile:
    """Holds the live ``DaemonState`` and persists it atomically on ``save()``."""

    def __init__(self, home: Path, state: DaemonState | None = None) -> None:
        self.path = Path(home) / STATE_FILE
        self.state = state or DaemonState()

    def peer(self, peer_id: str) -> PeerStats:
        stats = self.state.peers.get(peer_id)
        if stats is None:
            stats = self.state.peers[peer_id] = PeerStats()
        return stats

    def count_bytes(self, peer_id: str, bytes_in: int = 0, bytes_out: int = 0) -> None:
        stats = self.peer(peer_id)
        stats.bytes_in += bytes_in
        stats.bytes_out += bytes_out
        stats.exchanges += 1
        stats.last_seen_ms = int(time.time() * 1000)

    def count_path(self, path: str) -> None:
        self.state.paths[path] = self.state.paths.get(path, 0) + 1
        self.state.last_path = path

    def update(self, **changes: Any) -> None:
        for key, value in changes.items():
            if not hasattr(self.state, key):
                raise AttributeError(f"DaemonState has no field {key!r}")
            setattr(self.state, key, value)
        self.save()

    def save(self) -> None:
        self.state.updated_ms = int(time.time() * 1000)
        atomic_write(self.path, json.dumps(self.state.to_json(), indent=2, sort_keys=True), mode=0o644)


def read_state(home: Path) -> DaemonState | None:
    """The last state the daemon wrote, or None if it never ran here."""
    path = Path(home) / STATE_FILE
    try:
        return DaemonState.from_json(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
