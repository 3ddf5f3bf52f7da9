"""Group commit and kept-open streams at a real CPM service (py-libp2p hosts, one process).

What a user relies on: an ``Ack`` means the profile is committed (a second connection
to the database sees it at the moment the Ack arrives), concurrent requests share
commits, one bad request does not fail the others, a failed COMMIT acks nothing, and a
stream can carry many requests, also pipelined (one-shot streams keep working)."""

from __future__ import annotations

import os
import sqlite3
from contextlib import asynccontextmanager

import pytest
import trio
from structlog.testing import capture_logs

from cpm.admin import call
from cpm.config import CpmConfig
from cpm.service import CpmService
from cpm.store import Store, open_store
from p2p.host import parse_peer_addr
from p2p.streams import FramedStream
from protocol.envelope import NONCE_BYTES, Identity, now_ms, open_envelope, seal
from protocol.framing import encode_frame
from protocol.ids import CPM_PROTOCOL, MAX_FRAME_CPM
from protocol.messages import Ack, DirectiveRequest, Error, NoDirective, Profile, Register, Registered
from tests.integration.test_cpm_service import client

pytestmark = pytest.mark.timeout(120)


@asynccontextmanager
async def running_cpm(tmp_path, *, cfg_kw=None, **service_kw):
    cfg = CpmConfig(**{"strategy": "random", "request_timeout_s": 5.0, "min_agents": 100,
                       "round_timer_s": 3600.0, **(cfg_kw or {})})
    store = open_store(tmp_path / "cpm.db")
    service = CpmService(cfg, Identity.generate(), store, **service_kw)
    other = open_store(tmp_path / "cpm.db")  # sees only what is committed
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(service.run)
        yield service, parse_peer_addr(addrs[0]), other
        nursery.cancel_scope.cancel()
    other.close()
    store.close()


class Conn:
    """One kept-open /knexa/cpm/1.0.0 stream: many requests, replies checked."""

    def __init__(self, host, info, ident: Identity, cpm_peer: str) -> None:
        self.host, self.info, self.ident, self.cpm_peer = host, info, ident, cpm_peer
        self.framed: FramedStream | None = None

    async def ask(self, message) -> object:
        if self.framed is None:
            await self.host.connect(self.info)
            self.framed = FramedStream(await self.host.new_stream(self.info.peer_id, [CPM_PROTOCOL]), MAX_FRAME_CPM)
        nonce = os.urandom(NONCE_BYTES)
        with trio.fail_after(30):
            await self.framed.write_frame(seal(message, self.ident, nonce=nonce))
            raw = await self.framed.read_frame()
        if raw is None:
            return None
        _, reply = open_envelope(raw, expected_sender=self.cpm_peer)
        if isinstance(reply, Ack):
            assert reply.ref == nonce
        return reply


def _register(i: int) -> Register:
    return Register(f"org{i}", "qwen2", (f"/ip4/127.0.0.1/tcp/{5000 + i}",), "test")


def _profile(svc: CpmService, client: int, seq: int, dim: int = 32) -> Profile:
    return Profile(1, (float(client), float(seq), *([0.5] * (dim - 2))), svc.config.transfer_hash)


def _stored(store: Store) -> dict[str, list[float]]:
    return {p["peer_id"]: p["vector"] for p in store.list_profiles(1)}


async def _with_clients(svc, info, n: int, body) -> None:
    """Admit n identities, each with its own host and kept-open, registered stream, and
    run ``body(i, conn)`` for all of them concurrently."""
    idents = [Identity.generate() for _ in range(n)]
    for ident in idents:
        svc.store.admit(ident.peer_id, "org", now_ms())

    async def one(i: int) -> None:
        async with client(idents[i]) as host:
            conn = Conn(host, info, idents[i], svc.identity.peer_id)
            assert isinstance(await conn.ask(_register(i)), Registered)
            await body(i, conn)

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(one, i)


@pytest.mark.parametrize("group_commit", [True, False], ids=["group", "per_message"])
async def test_every_ack_is_already_committed_and_concurrent_requests_share_commits(tmp_path, group_commit):
    n, per_client = 6, 8
    async with running_cpm(tmp_path, group_commit=group_commit, commit_window_s=0.02) as (svc, info, other):
        checked: list[int] = []

        async def body(i: int, conn: Conn) -> None:
            for seq in range(1, per_client + 1):
                assert isinstance(await conn.ask(_profile(svc, i, seq)), Ack)
                # at the moment of the Ack another connection sees exactly this profile
                assert _stored(other)[conn.ident.peer_id][:2] == [float(i), float(seq)]
                checked.append(seq)

        await _with_clients(svc, info, n, body)
        assert len(checked) == n * per_client
        assert svc.engine.counters["profiles"] == n * per_client
        if group_commit:
            stats = svc.committer.stats
            assert stats["failed_batches"] == 0
            assert stats["messages"] >= n * (per_client + 1)  # every request waited for a commit
            assert stats["batches"] * 2 <= stats["messages"]  # … and they shared commits
        else:
            assert svc.committer is None and svc.store.open_batch is None


async def test_a_failing_request_does_not_fail_its_batch(tmp_path):
    async with running_cpm(tmp_path, commit_window_s=0.05) as (svc, info, other):
        replies: dict[int, object] = {}

        async def body(i: int, conn: Conn) -> None:
            replies[i] = await conn.ask(_profile(svc, i, 1, dim=31 if i == 0 else 32))
            if i == 0:  # an error ends the stream; a new one works
                with trio.fail_after(10):
                    assert await conn.framed.read_frame() is None
                conn.framed = None
                replies[i] = (replies[i], await conn.ask(_profile(svc, i, 3)))

        await _with_clients(svc, info, 5, body)
        bad, retry = replies.pop(0)
        assert isinstance(bad, Error) and bad.code == "malformed" and isinstance(retry, Ack)
        assert all(isinstance(r, Ack) for r in replies.values())
        assert sorted(v[0] for v in _stored(other).values()) == [0.0, 1.0, 2.0, 3.0, 4.0]
        assert svc.committer.stats["failed_batches"] == 0


def _deny_commit(action: int, arg1: str | None, *_: object) -> int:
    if action == sqlite3.SQLITE_TRANSACTION and arg1 == "COMMIT":
        return sqlite3.SQLITE_DENY  # a real failing COMMIT, as a full disk would give
    return sqlite3.SQLITE_OK


async def test_failed_commit_acks_nothing_and_the_node_recovers(tmp_path):
    async with running_cpm(tmp_path) as (svc, info, other):
        replies: dict[int, list[object]] = {}
        registered, go, healed = trio.Event(), trio.Event(), trio.Event()
        count = [0]

        async def body(i: int, conn: Conn) -> None:
            count[0] += 1
            if count[0] == 4:
                registered.set()
            await go.wait()
            replies[i] = [await conn.ask(_profile(svc, i, 1))]
            conn.framed = None  # the error ended the stream
            await healed.wait()
            replies[i].append(await conn.ask(_profile(svc, i, 2)))

        async def failing_disk() -> None:
            await registered.wait()
            svc.store.db.conn.set_authorizer(_deny_commit)  # every COMMIT fails until healed
            with capture_logs() as logs:
                go.set()
                while len(replies) < 4:
                    await trio.sleep(0.005)
                svc.store.db.conn.set_authorizer(None)
            healed.set()
            assert any(e["event"] == "cpm.commit.failed" for e in logs)
            assert any(e["event"] == "cpm.engine.reloaded" for e in logs)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(failing_disk)
            await _with_clients(svc, info, 4, body)
        first = [r[0] for r in replies.values()]
        # transient and typed: a client may send it again (it does: the next ask is acked)
        assert all(isinstance(r, Error) and r.code == "unavailable" for r in first), first
        assert all(isinstance(r[1], Ack) for r in replies.values())  # the retry is acked …
        assert sorted(v[1] for v in _stored(other).values()) == [2.0] * 4  # … and only it was stored
        assert svc.committer.stats["failed_batches"] >= 1


async def test_a_store_locked_by_another_writer_answers_unavailable_and_the_retry_is_acked(tmp_path):
    """Another writer (the admin CLI, a replica on a shared store) holds the write lock
    past the busy timeout: the request gets ``Error{unavailable}`` — transient, nothing
    applied, the daemon keeps its feedback queued — not ``internal``, and the node logs
    ``cpm.store.unavailable`` without a traceback; once the lock is gone the same
    request is acked and stored."""
    async with running_cpm(tmp_path) as (svc, info, other):
        replies: list[object] = []
        locker = sqlite3.connect(tmp_path / "cpm.db", isolation_level=None, timeout=0)

        async def body(_i: int, conn: Conn) -> None:
            locker.execute("BEGIN IMMEDIATE")  # the write lock, held past the node's busy timeout
            with capture_logs() as logs:
                replies.append(await conn.ask(_profile(svc, 0, 1)))
            locker.execute("ROLLBACK")
            assert [e["type"] for e in logs if e["event"] == "cpm.store.unavailable"] == ["Profile"]
            assert not [e for e in logs if e["event"] == "cpm.internal_error"]
            conn.framed = None  # the error ended the stream
            replies.append(await conn.ask(_profile(svc, 0, 2)))

        await _with_clients(svc, info, 1, body)
        locker.close()
        assert isinstance(replies[0], Error) and replies[0].code == "unavailable", replies
        assert isinstance(replies[1], Ack)
        assert [v[:2] for v in _stored(other).values()] == [[0.0, 2.0]]


async def test_one_stream_carries_many_requests_and_one_shot_streams_still_work(tmp_path):
    a = Identity.generate()
    async with running_cpm(tmp_path) as (svc, info, other), client(a) as host:
        svc.store.admit(a.peer_id, "org", now_ms())
        conn = Conn(host, info, a, svc.identity.peer_id)
        assert isinstance(await conn.ask(_register(0)), Registered)
        for seq in range(1, 4):
            assert isinstance(await conn.ask(_profile(svc, 0, seq)), Ack)
        nd = await conn.ask(DirectiveRequest(round=1, wait_ms=0))
        assert isinstance(nd, NoDirective) and nd.reason == "round_pending"
        _, reply = await call(host, info, a, _profile(svc, 0, 9), protocol_id=CPM_PROTOCOL,
                              max_frame=MAX_FRAME_CPM, timeout_s=10)  # one request per stream
        assert isinstance(reply, Ack)
        assert _stored(other)[a.peer_id][1] == 9.0
        svc.store.revoke(a.peer_id, now_ms())  # as the admin CLI would, while the stream is open
        err = await conn.ask(_profile(svc, 0, 10))
        assert isinstance(err, Error) and err.code == "unauthorized"
        assert _stored(other)[a.peer_id][1] == 9.0


async def test_idle_kept_open_stream_ends_quietly(tmp_path):
    a = Identity.generate()
    async with running_cpm(tmp_path, cfg_kw={"request_timeout_s": 0.3}) as (svc, info, _), client(a) as host:
        svc.store.admit(a.peer_id, "org", now_ms())
        conn = Conn(host, info, a, svc.identity.peer_id)
        assert isinstance(await conn.ask(_register(0)), Registered)
        await trio.sleep(0.8)
        with trio.fail_after(5):
            assert await conn.framed.read_frame() is None  # clean EOF from the CPM
        assert "timeout" not in svc.rejected


async def _pipelined(conn: Conn, messages: list) -> tuple[list[bytes], list[object]]:
    """Send all messages in one write, then read every answer (None at EOF)."""
    if conn.framed is None:
        await conn.host.connect(conn.info)
        conn.framed = FramedStream(await conn.host.new_stream(conn.info.peer_id, [CPM_PROTOCOL]), MAX_FRAME_CPM)
    nonces = [os.urandom(NONCE_BYTES) for _ in messages]
    await conn.framed.stream.write(b"".join(encode_frame(seal(m, conn.ident, nonce=n), MAX_FRAME_CPM)
                                            for m, n in zip(messages, nonces)))
    replies: list[object] = []
    with trio.fail_after(30):
        for _ in messages:
            raw = await conn.framed.read_frame()
            replies.append(None if raw is None else open_envelope(raw, expected_sender=conn.cpm_peer)[1])
            if raw is None:
                break
    return nonces, replies


async def test_pipelined_requests_share_one_commit_and_answers_keep_their_order(tmp_path):
    a = Identity.generate()
    async with running_cpm(tmp_path, commit_window_s=0.0) as (svc, info, other), client(a) as host:
        svc.store.admit(a.peer_id, "org", now_ms())
        conn = Conn(host, info, a, svc.identity.peer_id)
        assert isinstance(await conn.ask(_register(0)), Registered)
        before = dict(svc.committer.stats)
        nonces, replies = await _pipelined(conn, [_profile(svc, 0, seq) for seq in range(1, 11)])
        assert [r.ref for r in replies] == nonces  # ten Acks, in request order
        assert _stored(other)[a.peer_id][1] == 10.0
        assert svc.committer.stats["batches"] - before["batches"] == 1  # one COMMIT for the ten
        assert svc.committer.stats["messages"] - before["messages"] == 10
        # a bad request in the middle: the ones before are answered, it gets an Error,
        # the ones after are not processed (no answer, not stored)
        msgs = [_profile(svc, 0, 11), _profile(svc, 0, 12), _profile(svc, 0, 13, dim=31), _profile(svc, 0, 14)]
        nonces, replies = await _pipelined(conn, msgs)
        assert [r.ref for r in replies[:2]] == nonces[:2]
        assert isinstance(replies[2], Error) and replies[2].code == "malformed"
        assert replies[3:] == [None]
        assert _stored(other)[a.peer_id][1] == 12.0
