"""In-process network fixtures for the hostile-input and fuzz tests.

Real py-libp2p hosts (Noise + yamux) in one trio loop: a ``CpmService`` on a temp
SQLite file, a teacher running ``ExchangeServer`` with a counting agent, and client
hosts. Helpers send *raw* bytes on any protocol ID (so a test can be the attacker the
real clients refuse to be) and snapshot durable state, so "no state change" is checked
on the database rows and the daemon's files, not on a counter.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import multiaddr
import trio

from cpm.admin import call
from cpm.config import CpmConfig
from cpm.service import CpmService
from cpm.store import open_store
from knexad.agents import AgentWorker
from knexad.exchange import ExchangeServer, UsedDirectives
from knexad.state import StateFile
from p2p.host import build_host, parse_peer_addr
from p2p.streams import FramedStream
from protocol.boxes import parse_record
from protocol.envelope import Identity, open_envelope
from protocol.errors import KnexaError, MalformedFrame, PeerUnavailable
from protocol.ids import ADMIN_PROTOCOL, CPM_PROTOCOL, EXCHANGE_PROTOCOLS, MAX_FRAME_ADMIN, MAX_FRAME_CPM
from protocol.messages import Error, Register
from tests.integration.test_exchange import TRANSFER_HASH, CountingAgent, make_config

LOCAL = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
MAX_FRAME = {CPM_PROTOCOL: MAX_FRAME_CPM, ADMIN_PROTOCOL: MAX_FRAME_ADMIN, **{p: 4 * 1024 * 1024 for p in EXCHANGE_PROTOCOLS}}


@asynccontextmanager
async def running_cpm(tmp_path: Path, **cfg_kw: Any) -> AsyncIterator[tuple[CpmService, Any]]:
    """A CPM service on 127.0.0.1:0 with a fresh DB; yields (service, PeerInfo)."""
    # limiter off unless a test asks: fuzz and hostile campaigns send many frames from one
    # identity and must reach the parser (the limiter: tests/integration/test_ratelimit_cpm.py)
    cfg = CpmConfig(**{"strategy": "random", "request_timeout_s": 1.0, "rate_limit_per_s": 0.0, **cfg_kw})
    store = open_store(tmp_path / "cpm.db")
    service = CpmService(cfg, Identity.generate(), store)
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(service.run)
        yield service, parse_peer_addr(addrs[0])
        nursery.cancel_scope.cancel()
    store.close()


@asynccontextmanager
async def client(identity: Identity) -> AsyncIterator[Any]:
    host = build_host(identity.seed, dial_timeout_s=5)
    async with host.run(LOCAL):
        yield host


async def ask(host: Any, info: Any, ident: Identity, message: Any, *, protocol: str = CPM_PROTOCOL) -> Any:
    """One well-formed request; a remote Error is raised as its typed error."""
    return (await call(host, info, ident, message, protocol_id=protocol, max_frame=MAX_FRAME[protocol],
                       timeout_s=10.0))[1]


@dataclass
class RawReply:
    """What came back for raw bytes: a frame, a clean close, or a reset."""

    frame: bytes | None = None
    closed: bool = False
    reset: bool = False

    def error(self, signer: str) -> Error | None:
        """The ``Error`` message in the reply (verified as signed by ``signer``); None for
        any other answer, including exchange 1.1.0's first chunk (an unsigned record)."""
        if self.frame is None or parse_record(self.frame, 0) is not None:
            return None
        _, msg = open_envelope(self.frame, expected_sender=signer)
        return msg if isinstance(msg, Error) else None


async def raw_send(host: Any, info: Any, protocol: str, data: bytes, *, close_write: bool = True,
                   timeout_s: float = 10.0) -> RawReply:
    """Open ``protocol``, write ``data`` verbatim, half-close, read one reply frame."""
    with trio.fail_after(timeout_s):
        await host.connect(info)
        stream = await host.new_stream(info.peer_id, [protocol])
    framed = FramedStream(stream, MAX_FRAME[protocol])
    out = RawReply()
    try:
        with trio.fail_after(timeout_s):
            try:
                if data:
                    await stream.write(data)
                if close_write:
                    await stream.close()
            except Exception:  # noqa: BLE001 — the server may reset us mid-write: that is an answer
                out.reset = True
                return out
            try:
                out.frame = await framed.read_frame()
                out.closed = out.frame is None
            except (PeerUnavailable, MalformedFrame):
                out.reset = True
    finally:
        await framed.reset()
    return out


def db_snapshot(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every CPM table (``last_seen`` excluded: touching is not state)."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        out = {}
        for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"):
            cols = [r[1] for r in con.execute(f"PRAGMA table_info({table})") if r[1] != "last_seen"]
            out[table] = sorted(con.execute(f"SELECT {', '.join(cols)} FROM {table}").fetchall(), key=repr)
        return out
    finally:
        con.close()


def register_msg(i: int = 0) -> Register:
    return Register(f"org{i}", "qwen2", (f"/ip4/127.0.0.1/tcp/{5000 + i}",), "test")


@dataclass
class Teacher:
    """A teacher daemon's exchange side: host, server, agent and its home files."""

    home: Path
    cpm: Identity
    identity: Identity = field(default_factory=Identity.generate)
    agent: CountingAgent = field(default_factory=CountingAgent)
    host: Any = None
    server: ExchangeServer | None = None

    def info(self) -> Any:
        from libp2p.peer.peerinfo import PeerInfo

        return PeerInfo(self.host.get_id(), self.host.get_addrs())

    def used_log(self) -> bytes:
        path = self.home / "used.log"
        return path.read_bytes() if path.exists() else b""


@asynccontextmanager
async def running_teacher(home: Path, *, agent: Any = None, private_texts: tuple[str, ...] = (),
                          **timeouts: float) -> AsyncIterator[Teacher]:
    """A teacher host serving both exchange versions, as a daemon does; ``timeouts`` tune its config."""
    t = Teacher(home, Identity.generate())
    if agent is not None:
        t.agent = agent
    cfg = make_config(t.cpm, **timeouts)
    # off: the fuzz campaigns send thousands of frames from one identity and must reach
    # the parser, not the per-peer limiter (tests/integration/test_ratelimit_exchange.py)
    cfg = replace(cfg, limits=replace(cfg.limits, rate_limit_per_s=0.0))
    t.server = ExchangeServer(t.identity, cfg, AgentWorker(t.agent), UsedDirectives(home / "used.log"),
                              StateFile(home), transfer_hash=TRANSFER_HASH, private_texts=private_texts)
    host = build_host(t.identity.seed, dial_timeout_s=5)
    async with host.run(LOCAL):
        t.host = host
        for protocol in EXCHANGE_PROTOCOLS:
            host.set_stream_handler(protocol, t.server.handle)
        yield t


def error_code(exc: BaseException) -> str:
    return exc.code if isinstance(exc, KnexaError) else type(exc).__name__
