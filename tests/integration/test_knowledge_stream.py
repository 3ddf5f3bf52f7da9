"""The pipelined chunk stream (``send_knowledge`` / ``receive_knowledge``) over real hosts,
in both exchange versions where the behaviour is shared (the 1.0.0 hostile-frame table
is here; 1.1.0's is tests/integration/test_knowledge_stream_v11.py).

Both sides overlap crypto in worker threads with the stream, so these tests pin down
what must not change with it: a hostile or broken teacher still costs the student the
same *typed* error, in the order docs/protocol.md gives (signature, replay, Error,
directive, index, box, size, trailer) — never an ExceptionGroup, never a hang — and a
student that disappears mid-transfer costs the teacher a ``PeerUnavailable``.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager

import multiaddr
import pytest
import trio

from knexad.exchange import send_knowledge
from knexad.student import receive_knowledge
from p2p.host import build_host, full_addrs, parse_peer_addr
from p2p.streams import FramedStream
from protocol import (
    BadSignature,
    DecryptionFailed,
    E2EBox,
    FrameTooLarge,
    Error,
    Identity,
    KnowledgeChunk,
    KnowledgeEnd,
    MalformedFrame,
    PeerUnavailable,
    ProtocolError,
    Replay,
    ReplayGuard,
    Unauthorized,
    UnknownMessage,
    encode_frame,
    seal,
)
from protocol.ids import EXCHANGE_PROTOCOL, EXCHANGE_PROTOCOL_1_1
from protocol.knowledge import digest, seal_chunk_frame
from tests.assertions import raises_exactly

PROTO = "/knexa/test-knowledge/1.0.0"
LOCAL = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
MAX = 4 * 1024 * 1024
DID = "directive-1"
CHUNK = 4096
TEACHER, STUDENT, MALLORY = Identity.generate(), Identity.generate(), Identity.generate()
WIRES = pytest.mark.parametrize("wire", [EXCHANGE_PROTOCOL, EXCHANGE_PROTOCOL_1_1], ids=["1.0", "1.1"])

Teacher = Callable[[FramedStream], Awaitable[None]]


@asynccontextmanager
async def pair():
    t, s = build_host(TEACHER.seed, dial_timeout_s=5), build_host(STUDENT.seed, dial_timeout_s=5)
    async with t.run(LOCAL), s.run(LOCAL):
        yield t, s


async def student_receives(teacher: Teacher, *, max_package: int = MAX, step_s: float = 5.0,
                           protocol: str = EXCHANGE_PROTOCOL, guard: ReplayGuard | None = None) -> bytearray:
    """Run ``teacher`` on the teacher host's end of a stream; the student receives with
    ``protocol``'s rules. What ``receive_knowledge`` raises is re-raised outside the
    hosts' nurseries, as is."""
    raised: list[BaseException] = []
    plain = bytearray()
    async with pair() as (t, s):

        async def handler(stream) -> None:
            framed = FramedStream(stream, MAX)
            try:
                await teacher(framed)
            finally:
                await framed.close()

        t.set_stream_handler(PROTO, handler)
        info = parse_peer_addr(full_addrs(t)[0])
        await s.connect(info)
        framed = FramedStream(await s.new_stream(info.peer_id, [PROTO]), MAX)
        with trio.fail_after(20):  # hang guard only
            try:
                plain, _ = await receive_knowledge(
                    framed, STUDENT, TEACHER.peer_id, DID, guard or ReplayGuard(),
                    max_package_bytes=max_package, step_s=step_s, first_wait_s=step_s, protocol=protocol,
                )
            except Exception as exc:  # noqa: BLE001 — handed to the test unchanged
                raised.append(exc)
    if raised:
        raise raised[0]
    return plain


def chunk(index: int, payload: bytes, *, did: str = DID, bound_did: str = DID, signer: Identity = TEACHER) -> bytes:
    box = E2EBox(signer, STUDENT.peer_id).seal_chunk(bound_did, index, payload)
    return encode_frame(seal(KnowledgeChunk(did, index, box), signer), MAX)


def trailer(count: int, data: bytes, *, sha: bytes | None = None) -> bytes:
    return encode_frame(seal(KnowledgeEnd(DID, count, len(data), sha or digest(data), 0, 0), TEACHER), MAX)


def scripted(*frames: bytes) -> Teacher:
    async def run(framed: FramedStream) -> None:
        for frame in frames:
            await framed.write_encoded(frame)

    return run


@WIRES
async def test_many_chunks_arrive_whole_and_in_order(wire: str) -> None:
    data = os.urandom(CHUNK * 9 + 17)

    async def teacher(framed: FramedStream) -> None:
        count = await send_knowledge(framed, TEACHER, STUDENT.peer_id, DID, data,
                                     chunk_bytes=CHUNK, step_s=5.0, items=0, dropped=0, protocol=wire)
        assert count == 10

    assert await student_receives(teacher, protocol=wire) == data


@WIRES
async def test_empty_package_is_one_empty_chunk(wire: str) -> None:
    async def teacher(framed: FramedStream) -> None:
        await send_knowledge(framed, TEACHER, STUDENT.peer_id, DID, b"", chunk_bytes=CHUNK, step_s=5.0,
                             items=0, dropped=0, protocol=wire)

    assert await student_receives(teacher, protocol=wire) == b""


@pytest.mark.parametrize("sent, read", [(EXCHANGE_PROTOCOL, EXCHANGE_PROTOCOL_1_1),
                                        (EXCHANGE_PROTOCOL_1_1, EXCHANGE_PROTOCOL)], ids=["1.0-as-1.1", "1.1-as-1.0"])
async def test_a_stream_of_the_other_version_is_refused(sent: str, read: str) -> None:
    """Versions never mix: 1.0.0 chunk envelopes are not allowed on 1.1.0, and a 1.1.0
    record is not an envelope on 1.0.0."""
    async def teacher(framed: FramedStream) -> None:
        await send_knowledge(framed, TEACHER, STUDENT.peer_id, DID, A, chunk_bytes=CHUNK, step_s=5.0,
                             items=0, dropped=0, protocol=sent)

    with raises_exactly(UnknownMessage if read == EXCHANGE_PROTOCOL_1_1 else MalformedFrame):
        await student_receives(teacher, protocol=read)


A, B = b"a" * 100, b"b" * 100


# Frames are built when the test runs, never at collection: an envelope signed at
# collection could reach the receiver minutes later, outside its ±120 s window.
@pytest.mark.parametrize(
    "frames, error, match",
    [
        pytest.param(lambda: [chunk(0, A, signer=MALLORY)], BadSignature, None, id="signed-by-another-peer"),
        pytest.param(lambda: [chunk(0, A)] * 2, Replay, None, id="same-envelope-twice"),
        pytest.param(lambda: [chunk(0, A), encode_frame(seal(Error("unauthorized", "no"), TEACHER), MAX)],
                     Unauthorized, None, id="error-frame-mid-stream"),
        pytest.param(lambda: [chunk(0, A, did="other")], MalformedFrame, "expected", id="other-directive"),
        pytest.param(lambda: [chunk(1, A)], MalformedFrame, "out of order", id="out-of-order"),
        pytest.param(lambda: [chunk(0, b""), chunk(1, A)], MalformedFrame, "after an empty chunk",
                     id="chunk-after-empty-chunk"),
        pytest.param(lambda: [chunk(0, A, bound_did="other")], DecryptionFailed, None,
                     id="box-bound-to-other-directive"),
        pytest.param(lambda: [chunk(0, A), chunk(1, B), trailer(3, A + B)], ProtocolError, "trailer",
                     id="trailer-count"),
        pytest.param(lambda: [chunk(0, A), chunk(1, B), trailer(2, A + B, sha=digest(B + A))], ProtocolError,
                     "SHA-256", id="trailer-sha256"),
        pytest.param(lambda: [chunk(0, A), chunk(1, B)], PeerUnavailable, "before KnowledgeEnd",
                     id="closed-before-trailer"),
        pytest.param(lambda: [chunk(0, A), b"\x90\x4e" + b"x" * 100], PeerUnavailable, None, id="truncated-frame"),
        # read ahead must not reorder errors: the bad chunk comes first, so it is reported
        pytest.param(lambda: [chunk(0, A, signer=MALLORY), b"\x90\x4e" + b"x" * 100], BadSignature, None,
                     id="bad-chunk-before-truncation"),
    ],
)
async def test_hostile_or_broken_teacher_gives_the_typed_error(
    frames: Callable[[], list[bytes]], error: type, match: str | None
) -> None:
    with raises_exactly(error, match):
        await student_receives(scripted(*frames()))


async def test_tampered_box_is_refused() -> None:
    frame = bytearray(seal_chunk_frame(TEACHER, E2EBox(TEACHER, STUDENT.peer_id), DID, 0, A, MAX))
    # re-sign a body whose ciphertext has one bit flipped: the signature passes, the box does not
    from protocol import open_envelope

    _, msg = open_envelope(bytes(frame[2:]), expected_sender=TEACHER.peer_id)
    box = bytearray(msg.box)
    box[-1] ^= 1
    bad = encode_frame(seal(KnowledgeChunk(DID, 0, bytes(box)), TEACHER), MAX)
    with raises_exactly(DecryptionFailed):
        await student_receives(scripted(bad))


@WIRES
async def test_package_over_the_limit_is_refused(wire: str) -> None:
    data = os.urandom(CHUNK * 4)

    async def teacher(framed: FramedStream) -> None:
        await send_knowledge(framed, TEACHER, STUDENT.peer_id, DID, data, chunk_bytes=CHUNK, step_s=5.0,
                             items=0, dropped=0, protocol=wire)

    with raises_exactly(MalformedFrame, match="max_package_bytes"):
        await student_receives(teacher, max_package=CHUNK * 2, protocol=wire)


@WIRES
async def test_sealing_error_reaches_the_teacher_as_its_typed_error(wire: str) -> None:
    raised: list[BaseException] = []

    async def teacher(framed: FramedStream) -> None:
        framed.max_frame = 4000  # a sealed 4096-byte chunk cannot fit in a frame
        try:
            await send_knowledge(framed, TEACHER, STUDENT.peer_id, DID, os.urandom(3 * 4096), chunk_bytes=4096,
                                 step_s=5.0, items=0, dropped=0, protocol=wire)
        except Exception as exc:  # noqa: BLE001 — the test inspects exactly what escaped
            raised.append(exc)

    with raises_exactly(PeerUnavailable):  # nothing was sent: the student sees the stream end
        await student_receives(teacher, protocol=wire)
    assert len(raised) == 1 and isinstance(raised[0], FrameTooLarge), raised


async def test_stalling_teacher_hits_the_step_deadline() -> None:
    async def teacher(framed: FramedStream) -> None:
        await framed.write_encoded(chunk(0, A))
        await trio.sleep_forever()

    with pytest.raises(trio.TooSlowError):
        await student_receives(teacher, step_s=0.5)


@WIRES
async def test_student_vanishing_costs_the_teacher_peer_unavailable(wire: str) -> None:
    data = os.urandom(8 * 1024 * 1024)
    outcome: list[BaseException] = []
    started = trio.Event()

    async with pair() as (t, s):

        async def vanishing_student(stream) -> None:
            await stream.read(1024)
            started.set()
            await stream.reset()

        s.set_stream_handler(PROTO, vanishing_student)
        info = parse_peer_addr(full_addrs(s)[0])
        await t.connect(info)
        framed = FramedStream(await t.new_stream(info.peer_id, [PROTO]), MAX)
        with trio.fail_after(20):
            try:
                await send_knowledge(framed, TEACHER, STUDENT.peer_id, DID, data, chunk_bytes=1 << 20,
                                     step_s=2.0, items=0, dropped=0, protocol=wire)
            except Exception as exc:  # noqa: BLE001 — the test inspects exactly what escaped
                outcome.append(exc)
    assert started.is_set()
    assert len(outcome) == 1 and isinstance(outcome[0], PeerUnavailable), outcome
