"""The exchange protocol between real py-libp2p hosts in one process.

A CPM identity made here signs directives; a teacher host runs ``ExchangeServer`` with a
counting fake agent; a student host calls ``fetch_package``. Checks: a valid exchange
moves the package end-to-end encrypted; every invalid presentation is refused with the
right error code *before* anything is taught; a teacher that stalls or vanishes costs the
student a ``PeerUnavailable``, not a hang.
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import multiaddr
import pytest
import trio
from libp2p.peer.peerinfo import PeerInfo

from knexad.agent_api import KnowledgeItem, KnowledgePackage, LearnResult, ProtocolArm, TeachRequest
from knexad.agents import AgentWorker
from knexad.config import DaemonConfig, LimitsSection, TimeoutsSection
from knexad.exchange import ExchangeServer, UsedDirectives
from knexad.student import fetch_package
from knexad.state import StateFile
from p2p.host import build_host
from p2p.streams import FramedStream
from protocol.envelope import Identity, now_ms, open_envelope, seal
from protocol.errors import (
    BadSignature,
    Expired,
    KnexaError,
    MalformedFrame,
    PeerUnavailable,
    Replay,
    Unauthorized,
)
from protocol.ids import EXCHANGE_PROTOCOL
from protocol.messages import Directive, Error, KnowledgeRequest

MARKER = "plaintext-marker-giraffe-completion"
TRANSFER_HASH = "ab" * 32


class CountingAgent:
    """A fake teacher: known completions (so the test can look for them on the wire)."""

    family = "qwen2"

    def __init__(self, n_items: int = 40, completion_bytes: int = 200) -> None:
        self.teach_calls = 0
        self.n_items = n_items
        self.completion_bytes = completion_bytes

    def transfer_set_hash(self) -> str:
        return TRANSFER_HASH

    def profile(self) -> list[float]:
        return [0.0] * 32

    def teach(self, request: TeachRequest) -> KnowledgePackage:
        self.teach_calls += 1
        pad = "y" * self.completion_bytes
        items = tuple(
            KnowledgeItem(f"{i}", f"def f_{i}(x):\n", f"    return x  # {MARKER} {pad}", i % 12, 0.5)
            for i in range(self.n_items)
        )
        return KnowledgePackage(self.family, items, {"round": request.round})

    def learn(self, package: KnowledgePackage, arm: ProtocolArm) -> LearnResult:
        return LearnResult(1.0, 0.9, len(package.items))

    def evaluate(self) -> dict[str, float]:
        return {"pass@1": 0.0}

    def save(self, directory: Path) -> None:
        return None

    def load(self, directory: Path) -> bool:
        return False


class RecordingStream:
    """Wraps the teacher's libp2p stream and keeps every byte it writes."""

    def __init__(self, stream, sink: bytearray) -> None:
        self._stream = stream
        self._sink = sink
        self.muxed_conn = stream.muxed_conn

    def get_protocol(self):
        return self._stream.get_protocol()  # the exchange version the teacher serves

    async def read(self, n: int | None = None) -> bytes:
        return await self._stream.read(n)

    async def write(self, data: bytes) -> None:
        self._sink += data
        await self._stream.write(data)

    async def close(self) -> None:
        await self._stream.close()

    async def reset(self) -> None:
        await self._stream.reset()


LOCAL = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]


@asynccontextmanager
async def running_host(identity: Identity):
    host = build_host(identity.seed, dial_timeout_s=5)
    async with host.run(LOCAL):
        yield host


def make_config(cpm: Identity, **timeouts: float) -> DaemonConfig:
    t = TimeoutsSection(dial_s=5.0, request_s=5.0, exchange_step_s=2.0, teach_s=5.0, learn_s=5.0)
    return DaemonConfig(
        cpm=f"/ip4/127.0.0.1/tcp/4001/p2p/{cpm.peer_id}",
        timeouts=replace(t, **timeouts),
        limits=LimitsSection(chunk_bytes=2048),  # several chunks for a small package
    )


def make_directive(
    signer: Identity, teacher: str, student: str, *, expires_in_ms: int = 60_000,
    transfer_hash: str = TRANSFER_HASH, directive_id: str | None = None,
) -> tuple[bytes, Directive]:
    issued = now_ms()
    directive = Directive(
        directive_id=directive_id or os.urandom(8).hex(), round=3, teacher=teacher, student=student,
        arm=1, alpha=0.4, temperature=2.0, n_samples=1, transfer_ids=tuple(range(40)),
        transfer_hash=transfer_hash, issued_at_ms=issued, expires_at_ms=issued + expires_in_ms,
    )
    return seal(directive, signer), directive


class Net:
    """A CPM identity, a running teacher with ExchangeServer, a student host, a third peer."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.cpm = Identity.generate()
        self.teacher_id = Identity.generate()
        self.student_id = Identity.generate()
        self.third_id = Identity.generate()
        self.cfg = make_config(self.cpm)
        self.agent = CountingAgent()
        self.state = StateFile(tmp)
        self.wire = bytearray()
        self.server = ExchangeServer(
            self.teacher_id, self.cfg, AgentWorker(self.agent), UsedDirectives(tmp / "used.log"),
            self.state, transfer_hash=TRANSFER_HASH,
        )
        self.teacher_host = self.student_host = self.third_host = None

    def teacher_info(self) -> PeerInfo:
        return PeerInfo(self.teacher_host.get_id(), self.teacher_host.get_addrs())

    async def recording_handler(self, stream) -> None:
        await self.server.handle(RecordingStream(stream, self.wire))

    async def fetch(self, raw: bytes, directive: Directive, *, as_third: bool = False):
        host, ident = (self.third_host, self.third_id) if as_third else (self.student_host, self.student_id)
        with trio.fail_after(30):  # hang guard only
            return await fetch_package(host, ident, self.cfg, self.teacher_info(), raw, directive)


@pytest.fixture
async def net(tmp_path: Path):
    n = Net(tmp_path)
    async with running_host(n.teacher_id) as t, running_host(n.student_id) as s, running_host(n.third_id) as c:
        n.teacher_host, n.student_host, n.third_host = t, s, c
        t.set_stream_handler(EXCHANGE_PROTOCOL, n.recording_handler)
        yield n


async def test_valid_exchange_moves_package_encrypted(net: Net) -> None:
    raw, directive = make_directive(net.cpm, net.teacher_id.peer_id, net.student_id.peer_id)
    result = await net.fetch(raw, directive)

    assert net.agent.teach_calls == 1
    assert len(result.package.items) == net.agent.n_items
    assert all(MARKER in item.completion for item in result.package.items)
    assert result.plaintext_bytes > 4 * net.cfg.limits.chunk_bytes  # really chunked
    # the teacher's bytes on the (Noise-protected) stream never contain the plaintext
    assert len(net.wire) > result.plaintext_bytes
    assert MARKER.encode() not in bytes(net.wire)
    peers = net.state.state.peers
    assert peers[net.student_id.peer_id].bytes_out >= result.plaintext_bytes
    assert net.server.served == 1


@pytest.mark.parametrize(
    "case, error",
    [
        ("no_directive", MalformedFrame),
        ("other_student", Unauthorized),
        ("expired", Expired),
        ("forged_signer", BadSignature),
        ("tampered_signature", BadSignature),
        ("other_transfer_set", Unauthorized),
    ],
)
async def test_invalid_directive_refused_before_teaching(net: Net, case: str, error: type) -> None:
    teacher, student = net.teacher_id.peer_id, net.student_id.peer_id
    if case == "no_directive":
        _, directive = make_directive(net.cpm, teacher, student)
        raw = b""
    elif case == "other_student":
        raw, directive = make_directive(net.cpm, teacher, net.third_id.peer_id)
    elif case == "expired":
        raw, directive = make_directive(net.cpm, teacher, student, expires_in_ms=-1000)
    elif case == "forged_signer":
        raw, directive = make_directive(Identity.generate(), teacher, student)
    elif case == "tampered_signature":
        raw, directive = make_directive(net.cpm, teacher, student)
        raw = raw[:-10] + bytes(b ^ 0xFF for b in raw[-10:])  # sig is the last map value
    else:
        raw, directive = make_directive(net.cpm, teacher, student, transfer_hash="cd" * 32)

    with pytest.raises(error) as info:
        await net.fetch(raw, directive)
    assert info.value.code == error.code
    assert net.agent.teach_calls == 0
    assert net.server.served == 0


async def present(net: Net, raw_directive: bytes) -> Error:
    """Send a KnowledgeRequest by hand (no student-side checks) and return the reply."""
    stream = await net.student_host.new_stream(net.teacher_host.get_id(), [EXCHANGE_PROTOCOL])
    framed = FramedStream(stream, 4 * 1024 * 1024)
    with trio.fail_after(10):
        await framed.write_frame(seal(KnowledgeRequest(directive=raw_directive), net.student_id))
        reply = await framed.read_frame()
    await framed.close()
    _, message = open_envelope(reply, expected_sender=net.teacher_id.peer_id)
    return message


async def test_directive_naming_another_teacher_is_refused(net: Net) -> None:
    await net.student_host.connect(net.teacher_info())
    raw, _ = make_directive(net.cpm, net.third_id.peer_id, net.student_id.peer_id)
    reply = await present(net, raw)
    assert isinstance(reply, Error) and reply.code == "unauthorized"
    assert net.agent.teach_calls == 0


async def test_directive_is_single_use_even_after_restart(net: Net) -> None:
    raw, directive = make_directive(net.cpm, net.teacher_id.peer_id, net.student_id.peer_id)
    await net.fetch(raw, directive)
    with pytest.raises(Replay):
        await net.fetch(raw, directive)
    assert net.agent.teach_calls == 1

    # a restarted teacher (fresh server, same home) still refuses it
    net.server = ExchangeServer(
        net.teacher_id, net.cfg, AgentWorker(net.agent), UsedDirectives(net.tmp / "used.log"),
        net.state, transfer_hash=TRANSFER_HASH,
    )
    with pytest.raises(Replay):
        await net.fetch(raw, directive)
    assert net.agent.teach_calls == 1


async def test_directive_presented_by_a_third_peer_is_refused(net: Net) -> None:
    raw, directive = make_directive(net.cpm, net.teacher_id.peer_id, net.student_id.peer_id)
    with pytest.raises(Unauthorized):
        await net.fetch(raw, directive, as_third=True)
    assert net.agent.teach_calls == 0
    # the rightful student can still use it: the refusal did not burn the directive
    result = await net.fetch(raw, directive)
    assert len(result.package.items) == net.agent.n_items


async def _stalling_teacher(stream) -> None:
    """Reads the request, starts a frame, then never finishes it (slow loris)."""
    framed = FramedStream(stream, 4 * 1024 * 1024)
    await framed.read_frame()
    await stream.write(b"\x90\x4e" + b"x" * 100)  # declares 10 000 bytes, sends 100
    await trio.sleep_forever()


async def test_stalling_teacher_gives_peer_unavailable(net: Net) -> None:
    net.teacher_host.set_stream_handler(EXCHANGE_PROTOCOL, _stalling_teacher)
    net.cfg = make_config(net.cpm, exchange_step_s=0.5, teach_s=0.5)
    raw, directive = make_directive(net.cpm, net.teacher_id.peer_id, net.student_id.peer_id)
    with pytest.raises(PeerUnavailable):
        await net.fetch(raw, directive)


async def test_teacher_vanishing_mid_stream_gives_peer_unavailable(tmp_path: Path) -> None:
    n = Net(tmp_path)
    vanished = trio.Event()

    async def vanishing_teacher(stream) -> None:
        framed = FramedStream(stream, 4 * 1024 * 1024)
        await framed.read_frame()
        await stream.write(b"\x90\x4e" + b"x" * 100)  # half a frame …
        vanished.set()  # … then the whole host goes away
        await trio.sleep_forever()

    async with running_host(n.student_id) as s:
        n.student_host = s
        async with trio.open_nursery() as nursery:

            async def teacher_lifetime(task_status=trio.TASK_STATUS_IGNORED) -> None:
                async with running_host(n.teacher_id) as t:
                    n.teacher_host = t
                    t.set_stream_handler(EXCHANGE_PROTOCOL, vanishing_teacher)
                    task_status.started()
                    await vanished.wait()
                    await trio.sleep(0.05)

            await nursery.start(teacher_lifetime)
            raw, directive = make_directive(n.cpm, n.teacher_id.peer_id, n.student_id.peer_id)
            with pytest.raises(PeerUnavailable):
                await n.fetch(raw, directive)


async def test_unreachable_teacher_gives_peer_unavailable(tmp_path: Path) -> None:
    n = Net(tmp_path)
    n.cfg = make_config(n.cpm, dial_s=2.0)
    async with running_host(n.student_id) as s:
        n.student_host = s
        dead = PeerInfo(
            __import__("p2p.host", fromlist=["peer_id_of"]).peer_id_of(n.teacher_id.peer_id),
            [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/9")],  # discard port: nothing listens
        )
        raw, directive = make_directive(n.cpm, n.teacher_id.peer_id, n.student_id.peer_id)
        with trio.fail_after(30), pytest.raises(PeerUnavailable):
            await fetch_package(s, n.student_id, n.cfg, dead, raw, directive)


class BrokenAgent(CountingAgent):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def teach(self, request: TeachRequest) -> KnowledgePackage:
        self.teach_calls += 1
        if self.mode == "raise":
            raise RuntimeError("model exploded")
        import time

        time.sleep(1.5)  # longer than teach_s below
        return super().teach(request)


@pytest.mark.parametrize("mode", ["raise", "slow"])
async def test_teacher_agent_failure_is_reported_not_fatal(net: Net, mode: str) -> None:
    net.cfg = make_config(net.cpm, teach_s=0.5)
    net.agent = BrokenAgent(mode)
    net.server = ExchangeServer(
        net.teacher_id, net.cfg, AgentWorker(net.agent), UsedDirectives(net.tmp / "used2.log"),
        net.state, transfer_hash=TRANSFER_HASH,
    )
    raw, directive = make_directive(net.cpm, net.teacher_id.peer_id, net.student_id.peer_id)
    with pytest.raises(KnexaError) as info:
        await net.fetch(raw, directive)
    assert info.value.code == "internal"
    assert net.agent.teach_calls == 1
    # the teacher host is still serving: a healthy server answers the next directive
    net.agent = CountingAgent()
    net.server = ExchangeServer(
        net.teacher_id, net.cfg, AgentWorker(net.agent), UsedDirectives(net.tmp / "used2.log"),
        net.state, transfer_hash=TRANSFER_HASH,
    )
    raw, directive = make_directive(net.cpm, net.teacher_id.peer_id, net.student_id.peer_id)
    assert len((await net.fetch(raw, directive)).package.items) == net.agent.n_items
