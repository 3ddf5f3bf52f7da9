"""A real CPM service host and real client hosts (py-libp2p, Noise + yamux) in one process."""

from __future__ import annotations

import urllib.request
from contextlib import asynccontextmanager

import multiaddr
import pytest
import trio
from structlog.testing import capture_logs

from cpm.admin import call
from cpm.config import CpmConfig
from cpm.service import CpmService
from cpm.store import open_store
from p2p.host import build_host, parse_peer_addr
from p2p.streams import FramedStream
from protocol.directives import verify_directive
from protocol.envelope import Identity, now_ms, open_envelope, seal
from protocol.errors import BadSignature, Expired, MalformedFrame, PeerUnavailable, Replay, Unauthorized
from protocol.framing import encode_varint
from protocol.ids import ADMIN_PROTOCOL, CPM_PROTOCOL, MAX_FRAME_ADMIN, MAX_FRAME_CPM
from protocol.messages import (
    Ack,
    AdminAdmit,
    AdminQuery,
    AdminResult,
    Directive,
    DirectiveRequest,
    Error,
    Feedback,
    NoDirective,
    PeerAddrs,
    PeerLookup,
    Profile,
    Register,
    Registered,
)

pytestmark = pytest.mark.timeout(120)


@asynccontextmanager
async def running_cpm(tmp_path, **cfg_kw):
    cfg = CpmConfig(**{"strategy": "random", "request_timeout_s": 2.0, **cfg_kw})
    ident = Identity.generate()
    store = open_store(tmp_path / "cpm.db")
    service = CpmService(cfg, ident, store)
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(service.run)
        yield service, parse_peer_addr(addrs[0])
        nursery.cancel_scope.cancel()
    store.close()


@asynccontextmanager
async def client(identity: Identity):
    host = build_host(identity.seed)
    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        yield host


async def ask(host, info, ident, message, *, protocol=CPM_PROTOCOL, timeout_s=10.0):
    max_frame = MAX_FRAME_ADMIN if protocol == ADMIN_PROTOCOL else MAX_FRAME_CPM
    return (await call(host, info, ident, message, protocol_id=protocol, max_frame=max_frame,
                       timeout_s=timeout_s))[1]


async def raw_exchange(host, info, frame_bytes: bytes) -> bytes | None:
    """Write arbitrary bytes on a fresh CPM stream and return the first response frame."""
    await host.connect(info)
    stream = await host.new_stream(info.peer_id, [CPM_PROTOCOL])
    framed = FramedStream(stream, MAX_FRAME_CPM)
    try:
        with trio.fail_after(10):
            await stream.write(frame_bytes)
            return await framed.read_frame()
    finally:
        await framed.close()


def _frame(payload: bytes) -> bytes:
    return encode_varint(len(payload)) + payload


def _register(i: int = 0) -> Register:
    return Register(f"org{i}", "qwen2", (f"/ip4/127.0.0.1/tcp/{5000 + i}",), "test")


def _profile(service: CpmService, round_: int = 1, fill: float = 0.1) -> Profile:
    return Profile(round_, (fill,) * 32, service.config.transfer_hash)


async def test_round_trip_register_profile_longpoll_feedback(tmp_path):
    a, b = Identity.generate(), Identity.generate()
    async with running_cpm(tmp_path) as (svc, info), client(a) as ha, client(b) as hb:
        for ident in (a, b):
            svc.store.admit(ident.peer_id, "org", now_ms())
        reg = await ask(ha, info, a, _register(0))
        assert isinstance(reg, Registered) and reg.round == 1
        assert reg.transfer_hash == svc.config.transfer_hash
        assert isinstance(await ask(hb, info, b, _register(1)), Registered)
        ack = await ask(ha, info, a, _profile(svc))
        assert isinstance(ack, Ack)
        assert [p for p, _ in svc.store.fresh_profiles(1)] == [a.peer_id]  # committed before the Ack

        got: dict[str, object] = {}

        async def long_poll() -> None:
            env_blob = await ask(ha, info, a, DirectiveRequest(round=1, wait_ms=20_000))
            got["a"] = env_blob

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_poll)
            await trio.sleep(0.3)
            assert "a" not in got  # still waiting: the round is open
            assert isinstance(await ask(hb, info, b, _profile(svc, fill=0.2)), Ack)
        directive = got["a"]
        assert isinstance(directive, Directive) and directive.round == 1
        assert {directive.teacher, directive.student} == {a.peer_id, b.peer_id}
        (row,) = svc.store.directives_for_round(1)
        verify_directive(row.envelope, cpm_peer_id=svc.identity.peer_id, now_ms=now_ms())

        student = a if directive.student == a.peer_id else b
        host = ha if student is a else hb
        other = b if student is a else a
        addrs = await ask(host, info, student, PeerLookup(peer_id=other.peer_id))
        assert isinstance(addrs, PeerAddrs) and len(addrs.addrs) == 1
        fb = Feedback(directive.directive_id, 1, directive.teacher, directive.student, 2.0, 1.0, 50.0, True, "")
        assert isinstance(await ask(host, info, student, fb), Ack)
        assert isinstance(await ask(host, info, student, fb), Ack)  # duplicate: still acked
        assert len(svc.store.list_feedback()) == 1
        assert svc.store.get_directive(directive.directive_id).state == "used"
        assert svc.store.latest_round().round == 2
        nd = await ask(ha, info, a, DirectiveRequest(round=1, wait_ms=0))
        assert isinstance(nd, Directive)  # its own directive of a closed round stays fetchable
        teacher_host, teacher = (hb, b) if student is a else (ha, a)
        with pytest.raises(Unauthorized):  # only the student may report
            await ask(teacher_host, info, teacher, fb)
        assert svc.rejected.get("unauthorized") == 1


async def test_unadmitted_peer_is_refused_before_anything_is_stored(tmp_path):
    stranger = Identity.generate()
    async with running_cpm(tmp_path) as (svc, info), client(stranger) as h:
        with capture_logs() as logs, pytest.raises(Unauthorized):
            await ask(h, info, stranger, _register())
        assert any(e["event"] == "cpm.rejected" and e["code"] == "unauthorized" and e["peer"] == stranger.peer_id
                   for e in logs)
        assert svc.store.get_agent(stranger.peer_id) is None
        svc.store.admit(stranger.peer_id, "", now_ms())  # as the admin CLI would, from outside
        assert isinstance(await ask(h, info, stranger, _register()), Registered)
        svc.store.revoke(stranger.peer_id, now_ms())
        with pytest.raises(Unauthorized):
            await ask(h, info, stranger, _profile(svc))
        assert svc.store.list_profiles() == []


async def test_open_admission_admits_on_register(tmp_path):
    a = Identity.generate()
    async with running_cpm(tmp_path, open_admission=True) as (svc, info), client(a) as h:
        assert isinstance(await ask(h, info, a, _register()), Registered)
        assert svc.store.is_admitted(a.peer_id)


async def test_envelope_signed_by_another_key_is_bad_signature(tmp_path):
    a, mallory = Identity.generate(), Identity.generate()
    async with running_cpm(tmp_path) as (svc, info), client(a) as h:
        svc.store.admit(a.peer_id, "", now_ms())
        svc.store.admit(mallory.peer_id, "", now_ms())
        resp = await raw_exchange(h, info, _frame(seal(_register(), mallory)))
        _, err = open_envelope(resp, expected_sender=svc.identity.peer_id)
        assert isinstance(err, Error) and err.code == BadSignature.code
        assert svc.store.get_agent(a.peer_id).registered_at is None
        assert svc.store.get_agent(mallory.peer_id).registered_at is None


async def test_replayed_and_stale_envelopes_are_refused(tmp_path):
    a = Identity.generate()
    async with running_cpm(tmp_path) as (svc, info), client(a) as h:
        svc.store.admit(a.peer_id, "", now_ms())
        blob = seal(_register(), a)
        first = await raw_exchange(h, info, _frame(blob))
        assert isinstance(open_envelope(first)[1], Registered)
        seen = svc.store.get_agent(a.peer_id).last_seen
        second = await raw_exchange(h, info, _frame(blob))
        _, err = open_envelope(second)
        assert isinstance(err, Error) and err.code == Replay.code
        stale = seal(_register(), a, ts_ms=now_ms() - 10 * 60_000)
        _, err = open_envelope(await raw_exchange(h, info, _frame(stale)))
        assert isinstance(err, Error) and err.code == Expired.code
        assert svc.store.get_agent(a.peer_id).last_seen == seen  # no state change


async def test_oversize_frame_is_refused_and_service_keeps_serving(tmp_path):
    a = Identity.generate()
    async with running_cpm(tmp_path) as (svc, info), client(a) as h:
        svc.store.admit(a.peer_id, "", now_ms())
        try:
            resp = await raw_exchange(h, info, encode_varint(MAX_FRAME_CPM + 1) + b"\0" * 1024)
        except PeerUnavailable:
            resp = None  # reset before the Error frame got through: also acceptable
        if resp is not None:
            _, err = open_envelope(resp)
            assert isinstance(err, Error) and err.code == "too_large"
        assert svc.rejected.get("too_large") == 1
        assert isinstance(await ask(h, info, a, _register()), Registered)


async def test_slow_peer_gets_reset_and_service_keeps_serving(tmp_path):
    a = Identity.generate()
    async with running_cpm(tmp_path, request_timeout_s=0.5) as (svc, info), client(a) as h:
        svc.store.admit(a.peer_id, "", now_ms())
        await h.connect(info)
        stream = await h.new_stream(info.peer_id, [CPM_PROTOCOL])
        await stream.write(b"\x10\x01")  # a frame header and one byte, then silence
        framed = FramedStream(stream, MAX_FRAME_CPM)
        with trio.fail_after(10):  # the server gives up on us: reset (or close), no answer
            try:
                frame = await framed.read_frame()
            except (PeerUnavailable, MalformedFrame):
                frame = None
        assert frame is None
        assert svc.rejected.get("timeout") == 1
        assert isinstance(await ask(h, info, a, _register()), Registered)


async def test_profile_for_wrong_round_gets_no_directive(tmp_path):
    a = Identity.generate()
    async with running_cpm(tmp_path) as (svc, info), client(a) as h:
        svc.store.admit(a.peer_id, "", now_ms())
        await ask(h, info, a, _register())
        nd = await ask(h, info, a, _profile(svc, round_=7))
        assert isinstance(nd, NoDirective) and nd.reason == "round_pending" and nd.round == 1
        nd = await ask(h, info, a, DirectiveRequest(round=1, wait_ms=200))
        assert isinstance(nd, NoDirective) and nd.reason == "round_pending"
        with pytest.raises(Unauthorized):
            await ask(h, info, a, PeerLookup(peer_id=svc.identity.peer_id))


async def test_admin_protocol_only_for_admins(tmp_path):
    admin, user, newbie = Identity.generate(), Identity.generate(), Identity.generate()
    async with running_cpm(tmp_path, admins=[admin.peer_id]) as (svc, info), client(admin) as ha, client(user) as hu:
        svc.store.admit(user.peer_id, "", now_ms())
        with pytest.raises(Unauthorized):
            await ask(hu, info, user, AdminAdmit(peer_id=newbie.peer_id, org="x"), protocol=ADMIN_PROTOCOL)
        assert svc.store.get_agent(newbie.peer_id) is None
        ack = await ask(ha, info, admin, AdminAdmit(peer_id=newbie.peer_id, org="x"), protocol=ADMIN_PROTOCOL)
        assert isinstance(ack, Ack) and svc.store.is_admitted(newbie.peer_id)
        res = await ask(ha, info, admin, AdminQuery(what="agents", round=-1), protocol=ADMIN_PROTOCOL)
        assert isinstance(res, AdminResult)
        assert {dict(r)["peer_id"] for r in res.rows} == {user.peer_id, newbie.peer_id}


async def test_metrics_endpoint_counts(tmp_path):
    import socket

    with socket.socket() as s:  # a free port for the HTTP endpoint (prometheus needs a number)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    a = Identity.generate()
    async with running_cpm(tmp_path, metrics_port=port) as (svc, info), client(a) as h:
        assert svc.metrics_port == port
        with pytest.raises(Unauthorized):
            await ask(h, info, a, _register())
        body = await trio.to_thread.run_sync(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        )
        text = body.decode()
        assert 'knexa_cpm_rejected_total{code="unauthorized"} 1.0' in text
        assert "knexa_cpm_round 1.0" in text
