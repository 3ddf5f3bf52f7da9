"""Hostile input against a running CPM (real py-libp2p hosts in one process).

Each attack: the typed error code on the wire (or a reset where docs/protocol.md §5
allows one), a ``cpm.rejected`` log line with that code, and **no state change** — every
row of every SQLite table compared before/after. Attacks already covered elsewhere are
not repeated (docs/threat-model.md maps them): unadmitted peer, Register signed by
another key, replayed/stale Register, oversize CPM frame, partial-header slow peer
(tests/integration/test_cpm_service.py).
"""

from __future__ import annotations

import msgpack
import pytest
import trio
from structlog.testing import capture_logs

from protocol.codec import encode_body, pack
from protocol.envelope import Envelope, Identity, now_ms, seal
from protocol.errors import Unauthorized
from protocol.framing import encode_varint
from protocol.ids import ADMIN_PROTOCOL, CPM_PROTOCOL, MAX_FRAME_ADMIN
from protocol.messages import (
    Ack,
    AdminRevoke,
    Directive,
    DirectiveRequest,
    Feedback,
    KnowledgeRequest,
    NoDirective,
    PeerLookup,
    Profile,
    Registered,
)
from tests.reliability.netkit import ask, client, db_snapshot, raw_send, register_msg, running_cpm

pytestmark = pytest.mark.timeout(120)


def _profile(svc, round_: int = 1, fill: float = 0.1) -> Profile:
    return Profile(round_, (fill,) * 32, svc.config.transfer_hash)


def _rejected(logs: list[dict], code: str) -> bool:
    return any(e["event"] == "cpm.rejected" and e.get("code") == code for e in logs)


def _frame(payload: bytes) -> bytes:
    return encode_varint(len(payload)) + payload


def _envelope_with(ident: Identity, message, **override) -> bytes:
    """A correctly *signed* envelope with fields overridden (e.g. v=2, a raw body)."""
    body = override.pop("body", None)
    env = Envelope(v=override.pop("v", 1), type=override.pop("type", type(message).__name__),
                   sender=ident.peer_id, ts_ms=now_ms(), nonce=b"\x01" * 16,
                   body=body if body is not None else encode_body(message), sig=b"")
    signed = Envelope(env.v, env.type, env.sender, env.ts_ms, env.nonce, env.body, ident.sign(env.signed_bytes()))
    return signed.to_bytes()


async def _two_registered(svc, info, a, b, ha, hb) -> None:
    for ident in (a, b):
        svc.store.admit(ident.peer_id, "org", now_ms())
    assert isinstance(await ask(ha, info, a, register_msg(0)), Registered)
    assert isinstance(await ask(hb, info, b, register_msg(1)), Registered)


async def test_peer_revoked_mid_round_is_cut_off_without_state_change(tmp_path):
    admin, a, b, c = (Identity.generate() for _ in range(4))
    async with running_cpm(tmp_path, admins=[admin.peer_id], quorum=1.0) as (svc, info), \
            client(a) as ha, client(b) as hb, client(c) as hc, client(admin) as hadm:
        await _two_registered(svc, info, a, b, ha, hb)
        svc.store.admit(c.peer_id, "org", now_ms())
        await ask(hc, info, c, register_msg(2))
        assert isinstance(await ask(ha, info, a, _profile(svc)), Ack)  # round 1 open, 1/3 fresh
        await ask(hadm, info, admin, AdminRevoke(peer_id=b.peer_id), protocol=ADMIN_PROTOCOL)
        before = db_snapshot(tmp_path / "cpm.db")
        with capture_logs() as logs:
            for msg in (_profile(svc, fill=0.2), DirectiveRequest(round=1, wait_ms=0), register_msg(1)):
                with pytest.raises(Unauthorized):
                    await ask(hb, info, b, msg)
        assert db_snapshot(tmp_path / "cpm.db") == before
        assert sum(1 for e in logs if e["event"] == "cpm.rejected" and e["peer"] == b.peer_id) == 3
        # quorum shrank with the revocation: c's profile completes the round without b
        assert isinstance(await ask(hc, info, c, _profile(svc, fill=0.3)), Ack)
        (d,) = svc.store.directives_for_round(1)
        assert {d.teacher, d.student} == {a.peer_id, c.peer_id}


async def test_replayed_profile_and_feedback_are_refused(tmp_path):
    a, b = Identity.generate(), Identity.generate()
    async with running_cpm(tmp_path) as (svc, info), client(a) as ha, client(b) as hb:
        await _two_registered(svc, info, a, b, ha, hb)
        profile_blob = seal(_profile(svc), a)
        first = await raw_send(ha, info, CPM_PROTOCOL, _frame(profile_blob))
        assert first.frame is not None and first.error(svc.identity.peer_id) is None
        before = db_snapshot(tmp_path / "cpm.db")
        with capture_logs() as logs:
            again = await raw_send(ha, info, CPM_PROTOCOL, _frame(profile_blob))
        assert again.error(svc.identity.peer_id).code == "replay" and _rejected(logs, "replay")
        assert db_snapshot(tmp_path / "cpm.db") == before

        await ask(hb, info, b, _profile(svc, fill=0.5))  # quorum → matched
        (d,) = svc.store.directives_for_round(1)
        student, host = (a, ha) if d.student == a.peer_id else (b, hb)
        fb_blob = seal(Feedback(d.directive_id, 1, d.teacher, d.student, 2.0, 1.0, 10.0, True, ""), student)
        assert (await raw_send(host, info, CPM_PROTOCOL, _frame(fb_blob))).error(svc.identity.peer_id) is None
        before = db_snapshot(tmp_path / "cpm.db")
        with capture_logs() as logs:
            again = await raw_send(host, info, CPM_PROTOCOL, _frame(fb_blob))
        assert again.error(svc.identity.peer_id).code == "replay" and _rejected(logs, "replay")
        assert db_snapshot(tmp_path / "cpm.db") == before
        assert len(svc.store.list_feedback()) == 1


async def test_profile_signed_by_another_key_than_the_noise_peer(tmp_path):
    a, b = Identity.generate(), Identity.generate()
    async with running_cpm(tmp_path) as (svc, info), client(a) as ha, client(b) as hb:
        await _two_registered(svc, info, a, b, ha, hb)
        before = db_snapshot(tmp_path / "cpm.db")
        with capture_logs() as logs:  # a relays b's (validly signed) profile on its own connection
            reply = await raw_send(ha, info, CPM_PROTOCOL, _frame(seal(_profile(svc), b)))
        assert reply.error(svc.identity.peer_id).code == "bad_signature" and _rejected(logs, "bad_signature")
        assert db_snapshot(tmp_path / "cpm.db") == before


def _cases(svc, a: Identity) -> dict[str, tuple[bytes, str]]:
    """name → (bytes on the wire, expected error code)."""
    pickle_bytes = b"\x80\x04\x95\x1a\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x94\x8c\x04eval\x94\x93\x94."
    ext_env = pack({"v": 1, "type": "Profile", "sender": a.peer_id, "ts": now_ms(), "nonce": b"\0" * 16,
                    "body": b"", "sig": b"\0" * 64}).replace(b"\xa4body\xc4\x00", b"\xa4body\xd4\x05\x00")
    ext_body = _envelope_with(a, _profile(svc), body=msgpack.packb({"round": msgpack.ExtType(1, b"x")}))
    timestamp_ext = _envelope_with(a, _profile(svc), body=msgpack.packb(
        {"round": 1, "vector": [0.1] * 32, "transfer_hash": msgpack.Timestamp(1, 0)}, datetime=False))
    return {
        "pickle_frame": (_frame(pickle_bytes), "malformed"),
        "ext_in_envelope": (_frame(ext_env), "malformed"),
        "ext_in_body": (_frame(ext_body), "malformed"),
        "timestamp_ext_in_body": (_frame(timestamp_ext), "malformed"),
        "version_2": (_frame(_envelope_with(a, _profile(svc), v=2)), "unsupported_version"),
        "unknown_type": (_frame(_envelope_with(a, _profile(svc), type="Pickle")), "unknown_message"),
        "exchange_message_on_cpm": (_frame(seal(KnowledgeRequest(directive=b"x"), a)), "unknown_message"),
        "directive_from_a_peer": (_frame(seal(Directive("d", 1, a.peer_id, a.peer_id, 0, 0.1, 1.0, 1, (1,),
                                                        svc.config.transfer_hash, 0, 1), a)), "unknown_message"),
        "garbage": (_frame(b"\xc1" * 64), "malformed"),
        "non_minimal_varint": (b"\x85\x00" + b"\x00" * 5, "malformed"),
        "truncated": (encode_varint(500) + seal(_profile(svc), a)[:100], "malformed"),
        "nan_in_profile": (_frame(_envelope_with(a, _profile(svc), body=pack(
            {"round": 1, "vector": [float("nan")] * 32, "transfer_hash": svc.config.transfer_hash}))), "malformed"),
        "extra_field": (_frame(_envelope_with(a, _profile(svc), body=pack(
            {"round": 1, "vector": [0.1] * 32, "transfer_hash": svc.config.transfer_hash, "x": 1}))), "malformed"),
    }


async def test_malformed_and_foreign_bytes_on_cpm_protocol(tmp_path):
    a, b = Identity.generate(), Identity.generate()
    async with running_cpm(tmp_path) as (svc, info), client(a) as ha, client(b) as hb:
        await _two_registered(svc, info, a, b, ha, hb)
        before = db_snapshot(tmp_path / "cpm.db")
        for name, (data, code) in _cases(svc, a).items():
            with capture_logs() as logs:
                reply = await raw_send(ha, info, CPM_PROTOCOL, data)
            err = reply.error(svc.identity.peer_id)
            assert err is not None and err.code == code, f"{name}: {reply} {err}"
            assert _rejected(logs, code), name
        assert db_snapshot(tmp_path / "cpm.db") == before
        assert isinstance(await ask(ha, info, a, _profile(svc)), Ack)  # still serving


async def test_garbage_and_oversize_on_admin_protocol(tmp_path):
    admin = Identity.generate()
    async with running_cpm(tmp_path, admins=[admin.peer_id]) as (svc, info), client(admin) as h:
        before = db_snapshot(tmp_path / "cpm.db")
        for data, code in ((_frame(b"\x92\x01"), "malformed"),
                           (_frame(_envelope_with(admin, AdminRevoke(peer_id="x"), v=7)), "unsupported_version"),
                           (_frame(seal(_profile(svc), admin)), "unknown_message"),
                           (_frame(seal(AdminRevoke(peer_id="not-a-peer-id"), admin)), "malformed")):
            with capture_logs() as logs:
                reply = await raw_send(h, info, ADMIN_PROTOCOL, data)
            assert reply.error(svc.identity.peer_id).code == code and _rejected(logs, code)
        with capture_logs() as logs:
            reply = await raw_send(h, info, ADMIN_PROTOCOL, encode_varint(MAX_FRAME_ADMIN + 1) + b"\0" * 64)
        assert reply.reset or reply.error(svc.identity.peer_id).code == "too_large"
        assert _rejected(logs, "too_large")
        assert db_snapshot(tmp_path / "cpm.db") == before


@pytest.mark.parametrize("protocol", [CPM_PROTOCOL, ADMIN_PROTOCOL])
async def test_slow_loris_without_a_single_byte_is_reset(tmp_path, protocol):
    a = Identity.generate()
    async with running_cpm(tmp_path, request_timeout_s=0.5, admins=[a.peer_id]) as (svc, info), client(a) as h:
        svc.store.admit(a.peer_id, "org", now_ms())
        with capture_logs() as logs:
            loris = [await raw_send(h, info, protocol, b"", close_write=False) for _ in range(3)]
        assert all(r.frame is None for r in loris)
        assert svc.rejected.get("timeout") == 3
        assert sum(1 for e in logs if e["event"] == "cpm.rejected" and e["code"] == "timeout") == 3
        assert isinstance(await ask(h, info, a, register_msg()), Registered)


async def test_oversize_frame_is_refused_before_the_body_arrives(tmp_path):
    """Only the 4-byte length prefix is sent: the refusal cannot depend on reading a body."""
    a = Identity.generate()
    async with running_cpm(tmp_path) as (svc, info), client(a) as h:
        svc.store.admit(a.peer_id, "org", now_ms())
        with capture_logs() as logs:
            reply = await raw_send(h, info, CPM_PROTOCOL, encode_varint(2**40), close_write=False)
        assert reply.reset or reply.error(svc.identity.peer_id).code == "too_large"
        assert svc.rejected.get("too_large") == 1 and _rejected(logs, "too_large")


async def test_directive_request_for_a_round_not_ours_leaks_nothing(tmp_path):
    a, b, c = Identity.generate(), Identity.generate(), Identity.generate()
    async with running_cpm(tmp_path) as (svc, info), client(a) as ha, client(b) as hb, client(c) as hc:
        await _two_registered(svc, info, a, b, ha, hb)
        svc.store.admit(c.peer_id, "org", now_ms())
        await ask(hc, info, c, register_msg(2))
        await ask(ha, info, a, _profile(svc))
        await ask(hb, info, b, _profile(svc, fill=0.4))
        await ask(hc, info, c, _profile(svc, fill=0.9))
        with trio.fail_after(10):
            while not svc.store.directives_for_round(1):
                await trio.sleep(0.05)
        (d,) = svc.store.directives_for_round(1)
        outsider = next(x for x in ((a, ha), (b, hb), (c, hc)) if x[0].peer_id not in (d.teacher, d.student))
        nd = await ask(outsider[1], info, outsider[0], DirectiveRequest(round=1, wait_ms=0))
        assert isinstance(nd, NoDirective) and nd.reason == "not_matched"
        with pytest.raises(Unauthorized):  # it cannot learn where the paired peers listen
            await ask(outsider[1], info, outsider[0], PeerLookup(peer_id=d.teacher))
