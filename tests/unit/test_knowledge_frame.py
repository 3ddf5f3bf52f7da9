"""The exchange's fast paths produce and accept exactly what the generic codec does.

``seal_chunk_frame`` assembles a framed KnowledgeChunk envelope in one join and
``E2EBox.open_chunk_view`` reads the payload out of the plaintext without unpacking it;
both exist only for speed (benchmarks/stream.py), so the wire bytes and what a student
accepts must not differ from ``encode_frame(seal(...))`` / ``unpack_strict`` in any case.
"""

from __future__ import annotations

import os

import msgpack
import nacl.bindings
import pytest

from protocol import (
    DecryptionFailed,
    E2EBox,
    FrameDecoder,
    Identity,
    KnowledgeChunk,
    encode_frame,
    open_envelope,
    seal,
)
from protocol.e2e import bin_header
from protocol.knowledge import seal_chunk_frame

MAX = 4 * 1024 * 1024
TEACHER = Identity(bytes(range(32)))
STUDENT = Identity(bytes(range(32, 64)))
# payload sizes around msgpack's bin8/bin16/bin32 and the varint's 2/3-byte boundaries
SIZES = [0, 1, 200, 255, 256, 16_000, 65_535 - 80, 65_535, 65_536, 70_000, 1 << 20]


def _decode_one(frame: bytes) -> bytes:
    dec = FrameDecoder(MAX)
    dec.feed(frame)
    body = dec.next_frame()
    assert body is not None and dec.at_boundary
    return body


@pytest.mark.parametrize("size", SIZES)
def test_fast_frame_is_byte_identical_to_the_generic_codec(size: int) -> None:
    payload = os.urandom(size)
    box = E2EBox(TEACHER, STUDENT.peer_id)
    frame = seal_chunk_frame(TEACHER, box, "dir-7", 5, memoryview(payload), MAX)
    env, msg = open_envelope(_decode_one(frame), expected_sender=TEACHER.peer_id, allowed=(KnowledgeChunk,))
    # Ed25519 is deterministic: re-sealing the same fields must give the same bytes
    generic = encode_frame(seal(KnowledgeChunk("dir-7", 5, msg.box), TEACHER, ts_ms=env.ts_ms, nonce=env.nonce), MAX)
    assert frame == generic
    assert E2EBox(STUDENT, TEACHER.peer_id).open_chunk("dir-7", 5, msg.box) == payload


def test_fast_frame_respects_the_frame_cap() -> None:
    from protocol import FrameTooLarge

    with pytest.raises(FrameTooLarge):
        seal_chunk_frame(TEACHER, E2EBox(TEACHER, STUDENT.peer_id), "d", 0, b"x" * 5000, 4096)


def _raw_box(plaintext: bytes) -> bytes:
    """A box around arbitrary plaintext bytes, as another implementation might send."""
    key = nacl.bindings.crypto_box_beforenm(
        nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(STUDENT.public_key), TEACHER.curve25519_private()
    )
    nonce = os.urandom(24)
    return nonce + nacl.bindings.crypto_box_easy_afternm(plaintext, nonce, key)


@pytest.mark.parametrize("size", [0, 3, 255, 256, 70_000])
def test_non_canonical_plaintext_is_accepted_like_the_strict_unpacker(size: int) -> None:
    payload = os.urandom(size)
    # index as uint32 and payload as bin32 although smaller types fit: valid msgpack
    plain = b"\x94" + msgpack.packb("knexa/e2e/1") + msgpack.packb("d1") + b"\xce\x00\x00\x00\x02"
    plain += b"\xc6" + size.to_bytes(4, "big") + payload
    student = E2EBox(STUDENT, TEACHER.peer_id)
    assert bytes(student.open_chunk_view("d1", 2, _raw_box(plain))) == payload


@pytest.mark.parametrize(
    "plain",
    [
        b"\x94" + msgpack.packb("knexa/e2e/1") + msgpack.packb("d1") + b"\x02" + bin_header(3) + b"abcd",  # extra byte
        b"\x94" + msgpack.packb("knexa/e2e/1") + msgpack.packb("d1") + b"\x02" + bin_header(3) + b"ab",  # short
        b"\x94" + msgpack.packb("knexa/e2e/1") + msgpack.packb("d1") + b"\x03" + bin_header(3) + b"abc",  # index
        b"\x94" + msgpack.packb("knexa/e2e/1") + msgpack.packb("d2") + b"\x02" + bin_header(3) + b"abc",  # directive
        b"\x94" + msgpack.packb("knexa/e2e/0") + msgpack.packb("d1") + b"\x02" + bin_header(3) + b"abc",  # domain
        b"\x94" + msgpack.packb("knexa/e2e/1") + msgpack.packb("d1") + b"\x02" + msgpack.packb("abc"),  # str payload
    ],
)
def test_plaintexts_the_strict_unpacker_refuses_are_refused(plain: bytes) -> None:
    with pytest.raises(DecryptionFailed):
        E2EBox(STUDENT, TEACHER.peer_id).open_chunk_view("d1", 2, _raw_box(plain))


def test_short_or_tampered_boxes_are_decryption_failures() -> None:
    student = E2EBox(STUDENT, TEACHER.peer_id)
    sealed = E2EBox(TEACHER, STUDENT.peer_id).seal_chunk("d1", 0, b"knowledge")
    for bad in (b"", sealed[:10], sealed[:30], sealed[:-1] + bytes([sealed[-1] ^ 1])):
        with pytest.raises(DecryptionFailed):
            student.open_chunk_view("d1", 0, bad)


def test_large_frames_split_across_many_reads_come_out_whole() -> None:
    frames = [os.urandom(n) for n in (1 << 20, 0, 3, 300_000, 1 << 20)]
    stream = b"".join(encode_frame(f, MAX) for f in frames)
    for step in (65_536, 262_144, 1_000_003):
        dec = FrameDecoder(MAX)
        out = []
        for i in range(0, len(stream), step):
            dec.feed(stream[i : i + step])
            while (frame := dec.next_frame()) is not None:
                assert type(frame) is bytes
                out.append(frame)
        assert out == frames and dec.at_boundary and dec.buffered == 0


def test_fast_frame_uses_the_given_timestamp_and_nonce() -> None:
    frame = seal_chunk_frame(TEACHER, E2EBox(TEACHER, STUDENT.peer_id), "d", 0, b"abc", MAX,
                             ts_ms=1234, nonce=b"\x07" * 16)
    env, _ = open_envelope(_decode_one(frame), expected_sender=TEACHER.peer_id, allowed=(KnowledgeChunk,))
    assert (env.ts_ms, env.nonce) == (1234, b"\x07" * 16)


@pytest.mark.parametrize("size", [0, 3, 300, 70_000])
def test_canonical_chunk_is_opened_without_copying_the_payload(size: int) -> None:
    """The student's hot path hands out a window on the decrypted plaintext, not a second
    copy of a 1 MiB payload made by the strict unpacker (benchmarks/stream.py)."""
    payload = os.urandom(size)
    sealed = E2EBox(TEACHER, STUDENT.peer_id).seal_chunk("d1", 4, payload)
    view = E2EBox(STUDENT, TEACHER.peer_id).open_chunk_view("d1", 4, sealed)
    assert bytes(view) == payload
    assert len(view.obj) > size
