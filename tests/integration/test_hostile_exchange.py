"""Hostile input against a daemon: its exchange server (teacher side) and its CPM client.

Teacher side — each attack gets its typed ``Error`` code (or a reset where the spec
allows one), an ``exchange.refused``/``exchange.failed`` log line, and no state change:
the agent never taught and ``used_directives.log`` is byte-identical. Attacks already
covered by tests/integration/test_exchange.py (other student, expired, forged CPM
signer, tampered signature, other transfer set, another teacher, reuse across restart,
third-party presenter) are not repeated.

Client side — a CPM answer not signed by the configured CPM key, and a directive that
does not name this daemon, are refused before anything acts on them.
"""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest
import trio
from structlog.testing import capture_logs

from knexad.config import DaemonConfig
from knexad.cpm_client import CpmClient, CpmRpc
from knexad.state import StateFile
from protocol.codec import encode_body
from protocol.envelope import Envelope, Identity, now_ms, seal
from protocol.errors import BadSignature, MalformedFrame
from protocol.framing import encode_varint
from protocol.ids import CPM_PROTOCOL, EXCHANGE_PROTOCOL, EXCHANGE_PROTOCOLS, MAX_FRAME_CPM
from protocol.messages import KnowledgeRequest, Profile, Register, Registered
from p2p.streams import FramedStream
from tests.integration.test_exchange import make_directive
from tests.reliability.netkit import client, raw_send, running_teacher

pytestmark = pytest.mark.timeout(120)


def _frame(payload: bytes) -> bytes:
    return encode_varint(len(payload)) + payload


def _refused(logs: list[dict], code: str) -> bool:
    return any(e["event"] in ("exchange.refused", "exchange.failed") and e.get("error") == code for e in logs)


def _signed(ident: Identity, message, *, v: int = 1, body: bytes | None = None) -> bytes:
    env = Envelope(v, type(message).__name__, ident.peer_id, now_ms(), b"\x02" * 16,
                   body if body is not None else encode_body(message), b"")
    return Envelope(env.v, env.type, env.sender, env.ts_ms, env.nonce, env.body,
                    ident.sign(env.signed_bytes())).to_bytes()


@pytest.mark.parametrize("protocol", EXCHANGE_PROTOCOLS, ids=["1.1", "1.0"])
async def test_hostile_frames_on_exchange_protocol_teach_nothing(tmp_path: Path, protocol: str) -> None:
    """The request step is the same in both versions: each refuses the same frames alike."""
    student = Identity.generate()
    async with running_teacher(tmp_path, exchange_step_s=1.0) as t, client(student) as h:
        raw, _ = make_directive(t.cpm, t.identity.peer_id, student.peer_id)
        request = KnowledgeRequest(directive=raw)
        cases = {
            "garbage": (_frame(b"\xc1\xc1\xc1"), "malformed"),
            "pickle": (_frame(b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00N."), "malformed"),
            "ext_body": (_frame(_signed(student, request, body=msgpack.packb({"directive": msgpack.ExtType(3, b"")}))),
                         "malformed"),
            "version_9": (_frame(_signed(student, request, v=9)), "unsupported_version"),
            "wrong_message": (_frame(seal(Profile(1, (0.0,) * 32, "x"), student)), "unknown_message"),
            "signed_by_other_key": (_frame(seal(request, Identity.generate())), "bad_signature"),
            "stale": (_frame(seal(request, student, ts_ms=now_ms() - 600_000)), "expired"),
            "directive_garbage": (_frame(seal(KnowledgeRequest(directive=b"\x00" * 40), student)), "malformed"),
            "truncated": (encode_varint(900) + seal(request, student)[:200], "malformed"),
        }
        for name, (data, code) in cases.items():
            with capture_logs() as logs:
                reply = await raw_send(h, t.info(), protocol, data)
            err = reply.error(t.identity.peer_id)
            assert err is not None and err.code == code, f"{name}: {reply} {err}"
            assert _refused(logs, code), name
        assert t.agent.teach_calls == 0 and t.server.served == 0 and t.used_log() == b""


async def test_replayed_knowledge_request_envelope_is_refused(tmp_path: Path) -> None:
    student = Identity.generate()
    async with running_teacher(tmp_path) as t, client(student) as h:
        raw, directive = make_directive(t.cpm, t.identity.peer_id, student.peer_id)
        blob = _frame(seal(KnowledgeRequest(directive=raw), student))
        first = await raw_send(h, t.info(), EXCHANGE_PROTOCOL, blob)
        assert first.frame is not None and first.error(t.identity.peer_id) is None  # a chunk
        used = t.used_log()
        assert used == (directive.directive_id + "\n").encode()
        with capture_logs() as logs:
            again = await raw_send(h, t.info(), EXCHANGE_PROTOCOL, blob)
        assert again.error(t.identity.peer_id).code == "replay" and _refused(logs, "replay")
        assert t.agent.teach_calls == 1 and t.used_log() == used


async def test_oversize_and_slow_loris_on_exchange(tmp_path: Path) -> None:
    student = Identity.generate()
    async with running_teacher(tmp_path, exchange_step_s=0.5) as t, client(student) as h:
        with capture_logs() as logs:
            big = await raw_send(h, t.info(), EXCHANGE_PROTOCOL, encode_varint(2**33), close_write=False)
        assert big.reset or big.error(t.identity.peer_id).code == "too_large"
        assert _refused(logs, "too_large")
        with capture_logs() as logs:
            loris = await raw_send(h, t.info(), EXCHANGE_PROTOCOL, b"", close_write=False)
        assert loris.frame is None
        assert any(e["event"] == "exchange.failed" and e["error"] == "peer_unavailable" for e in logs)
        # still serving a legitimate student
        raw, _ = make_directive(t.cpm, t.identity.peer_id, student.peer_id)
        ok = await raw_send(h, t.info(), EXCHANGE_PROTOCOL, _frame(seal(KnowledgeRequest(directive=raw), student)))
        assert ok.error(t.identity.peer_id) is None and t.agent.teach_calls == 1


async def _fake_cpm_handler(cpm: Identity, mallory: Identity, stream) -> None:
    """The real CPM peer (Noise-authenticated) answers with an envelope Mallory signed."""
    framed = FramedStream(stream, MAX_FRAME_CPM)
    await framed.read_frame()
    await framed.write_frame(seal(Registered(round=1, cpm_time_ms=now_ms(), transfer_hash="ab" * 32), mallory))
    await framed.close()


async def test_cpm_answer_signed_by_another_key_is_refused(tmp_path: Path) -> None:
    cpm, mallory, me = Identity.generate(), Identity.generate(), Identity.generate()
    async with client(cpm) as hcpm, client(me) as h:
        hcpm.set_stream_handler(CPM_PROTOCOL, lambda s: _fake_cpm_handler(cpm, mallory, s))
        addr = f"{hcpm.get_addrs()[0]}/p2p/{cpm.peer_id}"
        rpc = CpmRpc(h, me, DaemonConfig(cpm=addr))
        with capture_logs(), pytest.raises(BadSignature), trio.fail_after(20):
            await rpc.call(Register(org="o", family="qwen2", listen_addrs=(), agent_version="t"))


def test_directive_not_naming_this_daemon_is_refused(tmp_path: Path) -> None:
    cpm, me, a, b = (Identity.generate() for _ in range(4))
    cfg = DaemonConfig(cpm=f"/ip4/127.0.0.1/tcp/1/p2p/{cpm.peer_id}")
    rpc = CpmRpc(None, me, cfg)

    async def nothing(*_a) -> None:
        return None

    cl = CpmClient(rpc, cfg, me, StateFile(tmp_path), family="qwen2", transfer_hash="ab" * 32,
                   profile_fn=nothing, on_directive=nothing, on_exit=lambda code: None)
    raw, _ = make_directive(cpm, a.peer_id, b.peer_id)
    with pytest.raises(MalformedFrame):
        cl._check_directive(raw)
    forged, _ = make_directive(a, me.peer_id, b.peer_id)  # names us, but not signed by our CPM
    with pytest.raises(BadSignature):
        cl._check_directive(forged)
    mine, _ = make_directive(cpm, me.peer_id, b.peer_id)
    assert cl._check_directive(mine).teacher == me.peer_id
