"""Golden vectors: the committed bytes decode to the committed JSON, and re-encoding the
sample messages reproduces the committed bytes exactly (Ed25519 is deterministic).

Exchange 1.1.0 adds an unsigned record (``KnowledgeBox``: its vector is the record
bytes) and a whole-stream vector built from the spec without our box/record code
(tests/vectors/stream_vector.py): our teacher's framing must reproduce its frames and
our student must accept them — two implementations of one spec agreeing on bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from protocol import E2EBox, FrameDecoder, Identity, KnowledgeTrailer, ReplayGuard, open_envelope, seal
from protocol.boxes import TagDigest, box_tag, decode_record, encode_record, frame_from_parts, parse_record
from protocol.ids import EXCHANGE_PROTOCOL_1_1
from tests.vectors import stream_vector
from tests.vectors.samples import (
    NONCE,
    SIGNER_SEED,
    STREAM_CHUNK,
    STREAM_DIRECTIVE,
    STREAM_PAYLOAD,
    STUDENT_SEED,
    TS_MS,
    sample_messages,
    sample_records,
    stream_box_nonce,
)
from tests.vectors.to_json import envelope_json, record_json

VECTORS = Path(__file__).parent.parent / "vectors"
SAMPLES = sample_messages()
RECORDS = sample_records()
STREAM_BIN = VECTORS / "exchange_1_1_0.bin"
STREAM_JSON = VECTORS / "exchange_1_1_0.json"


def test_every_message_type_has_a_vector() -> None:
    from protocol import MESSAGE_TYPES, RECORD_TYPES

    assert set(SAMPLES) == set(MESSAGE_TYPES)
    assert set(RECORDS) == set(RECORD_TYPES)
    assert {p.stem for p in VECTORS.glob("*.msgpack")} == set(MESSAGE_TYPES) | set(RECORD_TYPES)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_bytes_decode_to_golden_json(name: str) -> None:
    blob = (VECTORS / f"{name}.msgpack").read_bytes()
    assert envelope_json(blob) == json.loads((VECTORS / f"{name}.json").read_text())


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_encoding_reproduces_golden_bytes(name: str) -> None:
    blob = seal(SAMPLES[name], Identity(SIGNER_SEED), ts_ms=TS_MS, nonce=NONCE)
    assert blob == (VECTORS / f"{name}.msgpack").read_bytes()


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_record_vectors_round_trip(name: str) -> None:
    blob = (VECTORS / f"{name}.msgpack").read_bytes()
    assert encode_record(RECORDS[name]) == blob
    assert decode_record(blob) == RECORDS[name]
    assert record_json(blob) == json.loads((VECTORS / f"{name}.json").read_text())


def _frames() -> list[bytes]:
    decoder = FrameDecoder(4 * 1024 * 1024)
    decoder.feed(STREAM_BIN.read_bytes())
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    decoder.close()
    return frames


def test_stream_vector_is_reproduced_from_the_spec() -> None:
    frames, described = stream_vector.build()
    assert b"".join(frames) == STREAM_BIN.read_bytes()
    assert described == json.loads(STREAM_JSON.read_text())
    assert described["protocol"] == EXCHANGE_PROTOCOL_1_1 and len(frames) == 4  # three boxes and the trailer


def test_our_teacher_framing_writes_the_stream_vector() -> None:
    """``frame_from_parts`` (what ``seal_box_frame`` joins) gives the vector's frames for
    the vector's boxes, and E2EBox opens each to the payload slice it binds."""
    described = json.loads(STREAM_JSON.read_text())
    frames = _frames()
    student = E2EBox(Identity(STUDENT_SEED), Identity(SIGNER_SEED).peer_id)
    tags = TagDigest()
    for index, box_hex in enumerate(b["box"] for b in described["boxes"]):
        box = bytes.fromhex(box_hex)
        assert box[:24] == stream_box_nonce(index)
        framed = frame_from_parts(index, box[:24], box[24:], 1 << 20)
        assert framed == bytes.fromhex(described["frames"][index])
        record = parse_record(frames[index], index)
        assert record is not None and record.box == box
        piece = STREAM_PAYLOAD[index * STREAM_CHUNK : (index + 1) * STREAM_CHUNK]
        assert student.open_chunk(STREAM_DIRECTIVE, index, record.box) == piece
        tags.add(box_tag(record.box))
    _, trailer = open_envelope(frames[-1], expected_sender=Identity(SIGNER_SEED).peer_id)
    assert isinstance(trailer, KnowledgeTrailer) and trailer.macs_sha256 == tags.digest()
    assert parse_record(frames[-1], 3) is None  # an envelope is not a record


class _VectorStream:
    """A FramedStream stand-in that yields the vector's frames, then a clean EOF."""

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = list(frames)

    async def read_frame(self) -> bytes | None:
        return self.frames.pop(0) if self.frames else None


def test_our_student_accepts_the_stream_vector() -> None:
    from knexad.student import receive_knowledge

    async def main() -> tuple[bytearray, object]:
        return await receive_knowledge(
            _VectorStream(_frames()), Identity(STUDENT_SEED), Identity(SIGNER_SEED).peer_id, STREAM_DIRECTIVE,
            ReplayGuard(window_ms=10**13),  # the trailer is signed at a fixed 2026-01-01 timestamp
            max_package_bytes=1 << 20, step_s=5.0, first_wait_s=5.0, protocol=EXCHANGE_PROTOCOL_1_1,
        )

    plain, end = trio.run(main)
    assert bytes(plain) == STREAM_PAYLOAD and end.chunks == 3 and end.items == 1
