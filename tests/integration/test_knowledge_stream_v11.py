"""Exchange 1.1.0's chunk stream against a hostile or broken teacher, over real hosts.

The chunks are unsigned ``KnowledgeBox`` records, so everything a signature used to
catch per chunk must now be caught by the box (made with the pair's key, bound to the
directive and index) or by the signed ``KnowledgeTrailer`` (count, size, the digest of
the tags). Each refusal is the typed error the 1.0.0 path gives for the same fault
(tests/integration/test_knowledge_stream.py), never an ExceptionGroup or a hang.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest

from protocol import (
    BadSignature,
    DecryptionFailed,
    Error,
    FrameTooLarge,
    Identity,
    KnowledgeEnd,
    MalformedFrame,
    PeerUnavailable,
    ProtocolError,
    Replay,
    ReplayGuard,
    Unauthorized,
    UnknownMessage,
    encode_frame,
    encode_varint,
    open_envelope,
    seal,
)
from protocol.boxes import box_tag, decode_record, encode_record, seal_box_frame
from protocol.codec import encode_body, pack
from protocol.e2e import E2EBox
from protocol.framing import decode_varint
from protocol.ids import EXCHANGE_PROTOCOL_1_1
from protocol.messages import KnowledgeBox, KnowledgeTrailer
from tests.assertions import raises_exactly
from tests.integration.test_knowledge_stream import DID, MALLORY, MAX, STUDENT, TEACHER, chunk, scripted
from tests.integration.test_knowledge_stream import student_receives as _receives

A, B = b"a" * 100, b"b" * 100


def box(index: int, payload: bytes, *, bound_did: str = DID, sealer: Identity = TEACHER) -> bytes:
    """The framed record; ``sealer``'s key with the student (MALLORY: a third peer's box)."""
    frame, _ = seal_box_frame(E2EBox(sealer, STUDENT.peer_id), bound_did, index, payload, MAX)
    return frame


def payload_of(frame: bytes) -> bytes:
    """The frame without its varint prefix."""
    length, used = decode_varint(frame)
    assert len(frame) == used + length
    return frame[used:]


def tags_of(*frames: bytes) -> bytes:
    digest = hashlib.sha256()
    for frame in frames:
        digest.update(box_tag(decode_record(payload_of(frame)).box))
    return digest.digest()


def record(payload: dict) -> bytes:
    return encode_frame(pack(payload), MAX)


def trailer(boxes: list[bytes], data: bytes, *, chunks: int | None = None, total: int | None = None,
            macs: bytes | None = None, did: str = DID, signer: Identity = TEACHER) -> bytes:
    end = KnowledgeTrailer(did, len(boxes) if chunks is None else chunks, len(data) if total is None else total,
                           tags_of(*boxes) if macs is None else macs, 0, 0)
    return encode_frame(seal(end, signer), MAX)


def good(*payloads: bytes) -> list[bytes]:
    boxes = [box(i, p) for i, p in enumerate(payloads)]
    return [*boxes, trailer(boxes, b"".join(payloads))]


async def receives(frames: list[bytes], **kwargs) -> bytearray:
    return await _receives(scripted(*frames), protocol=EXCHANGE_PROTOCOL_1_1, **kwargs)


def test_tag_helper_reads_the_box() -> None:
    frame, tag = seal_box_frame(E2EBox(TEACHER, STUDENT.peer_id), DID, 0, A, MAX)
    assert tags_of(frame) == hashlib.sha256(tag).digest()


async def test_a_scripted_valid_stream_is_accepted() -> None:
    """The table below breaks one thing each; this is the baseline it departs from."""
    assert await receives(good(A, B)) == A + B


def _swapped() -> list[bytes]:
    first, second = box(0, A), box(1, B)
    return [first, second, trailer([second, first], A + B)]


def _resealed() -> list[bytes]:
    """Same plaintext, boxes sealed again (fresh nonces): the trailer commits to other tags."""
    sent = [box(0, A), box(1, B)]
    return [*sent, trailer([box(0, A), box(1, B)], A + B)]


# Frames are built when the test runs: a trailer signed at collection could reach the
# student outside its ±120 s window.
@pytest.mark.parametrize(
    "frames, error, match",
    [
        pytest.param(lambda: [box(0, A, sealer=MALLORY)], DecryptionFailed, None, id="box-from-another-peer"),
        pytest.param(lambda: [box(0, A, bound_did="other")], DecryptionFailed, None,
                     id="box-bound-to-other-directive"),
        pytest.param(lambda: [box(1, A)], MalformedFrame, "out of order", id="out-of-order"),
        pytest.param(lambda: [box(0, A), box(0, A)], MalformedFrame, "out of order", id="same-index-twice"),
        pytest.param(lambda: [record({"type": "KnowledgeBox", "index": 0,
                                      "box": E2EBox(TEACHER, STUDENT.peer_id).seal_chunk(DID, 1, A)})],
                     DecryptionFailed, None, id="record-index-not-the-box-index"),
        pytest.param(lambda: [box(0, b""), box(1, A)], MalformedFrame, "after an empty chunk",
                     id="chunk-after-empty-chunk"),
        pytest.param(lambda: [record({"type": "KnowledgeBox", "index": 0, "box": b"x" * 40, "sig": b""})],
                     MalformedFrame, "keys", id="record-extra-key"),
        pytest.param(lambda: [record({"type": "KnowledgeBox", "index": True, "box": b"x" * 40})],
                     MalformedFrame, "index", id="record-bool-index"),
        pytest.param(lambda: [record({"type": "KnowledgeBox", "index": -1, "box": b"x" * 40})],
                     MalformedFrame, "index", id="record-negative-index"),
        pytest.param(lambda: [record({"type": "KnowledgeBox", "index": 0, "box": "x" * 40})],
                     MalformedFrame, "bytes", id="record-box-not-bytes"),
        pytest.param(lambda: [record({"type": "KnowledgeBox", "index": 0, "box": b"x" * 39})],
                     MalformedFrame, "shorter", id="record-box-too-short"),
        pytest.param(lambda: [record({"type": "KnowledgeCrate", "index": 0, "box": b"x" * 40})],
                     MalformedFrame, "envelope", id="unknown-record-type"),
        pytest.param(lambda: [encode_frame(b"\xc1", MAX)], MalformedFrame, "msgpack", id="not-msgpack"),
        pytest.param(lambda: [encode_frame(pack([1, 2]), MAX)], MalformedFrame, None, id="not-a-map"),
        pytest.param(lambda: [encode_varint(MAX + 1)], FrameTooLarge, None, id="frame-too-large"),
        pytest.param(lambda: [chunk(0, A)], UnknownMessage, None, id="1.0-chunk-envelope"),
        pytest.param(lambda: [box(0, A), encode_frame(seal(KnowledgeEnd(DID, 1, 100, bytes(32), 0, 0), TEACHER),
                                                      MAX)], UnknownMessage, None, id="1.0-trailer"),
        pytest.param(lambda: [box(0, A), encode_frame(seal(Error("unauthorized", "no"), TEACHER), MAX)],
                     Unauthorized, None, id="error-frame-mid-stream"),
        pytest.param(lambda: [box(0, A), trailer([box(0, A)], A, signer=MALLORY)], BadSignature, None,
                     id="trailer-signed-by-another-peer"),
        pytest.param(lambda: [box(0, A), encode_frame(encode_body(KnowledgeTrailer(DID, 1, 100, tags_of(box(0, A)),
                                                                                   0, 0)), MAX)],
                     MalformedFrame, "envelope", id="unsigned-trailer"),
        pytest.param(lambda: [box(0, A), trailer([box(0, A)], A, did="other")], MalformedFrame, "expected",
                     id="trailer-for-other-directive"),
        pytest.param(lambda: [*good(A, B)[:2], trailer(good(A, B)[:2], A + B, chunks=3)], ProtocolError,
                     "trailer mismatch", id="trailer-count"),
        pytest.param(lambda: [*good(A, B)[:2], trailer(good(A, B)[:2], A + B, total=199)], ProtocolError,
                     "trailer mismatch", id="trailer-size"),
        pytest.param(_swapped, ProtocolError, "tags", id="trailer-tags-in-other-order"),
        pytest.param(_resealed, ProtocolError, "tags", id="trailer-tags-of-other-boxes"),
        pytest.param(lambda: [box(0, A), trailer([box(0, A)], A, macs=b"")], ProtocolError, "tags",
                     id="trailer-tags-empty"),
        pytest.param(lambda: [box(0, A), box(1, B)], PeerUnavailable, "before KnowledgeTrailer",
                     id="closed-before-trailer"),
        pytest.param(lambda: [box(0, A), b"\x90\x4e" + b"x" * 100], PeerUnavailable, None, id="truncated-frame"),
        pytest.param(lambda: [box(0, A, sealer=MALLORY), b"\x90\x4e" + b"x" * 100], DecryptionFailed, None,
                     id="bad-box-before-truncation"),
    ],
)
async def test_hostile_or_broken_teacher_gives_the_typed_error(
    frames: Callable[[], list[bytes]], error: type, match: str | None
) -> None:
    with raises_exactly(error, match):
        await receives(frames())


async def test_tampered_box_is_refused() -> None:
    frame = bytearray(box(0, A))
    frame[-1] ^= 1  # no signature to re-make: the box's own tag is what fails
    with raises_exactly(DecryptionFailed):
        await receives([bytes(frame)])


async def test_a_non_canonical_record_is_read_like_the_canonical_one() -> None:
    """A map16 header instead of a fixmap: the strict unpacker's path, same verdict."""
    frames = good(A)
    body = payload_of(frames[0])
    assert body[0] == 0x83  # fixmap of 3
    odd = encode_frame(b"\xde\x00\x03" + body[1:], MAX)
    assert await receives([odd, frames[1]]) == A


async def test_a_replayed_trailer_is_refused() -> None:
    frames = good(A)
    guard = ReplayGuard()
    env, _ = open_envelope(payload_of(frames[-1]), expected_sender=TEACHER.peer_id)
    guard.check(env, env.ts_ms)  # seen before, e.g. on an earlier stream
    with raises_exactly(Replay):
        await receives(frames, guard=guard)


async def test_package_over_the_limit_stops_at_the_box_that_crosses_it() -> None:
    with raises_exactly(MalformedFrame, match="max_package_bytes"):
        await receives(good(A, B, A), max_package=150)


def test_record_bytes_are_the_documented_map() -> None:
    rec = KnowledgeBox(index=3, box=b"\x00" * 40)
    assert encode_record(rec) == pack({"type": "KnowledgeBox", "index": 3, "box": b"\x00" * 40})
