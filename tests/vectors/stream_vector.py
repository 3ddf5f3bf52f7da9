"""The exchange 1.1.0 stream vector, built from the spec with msgpack and libsodium only.

Deliberately independent of ``protocol.boxes`` / ``protocol.e2e`` (only the envelope of
the trailer comes from ``protocol.seal``, itself pinned by the per-message vectors), so
tests/unit/test_vectors.py can hold our teacher's framing and our student's checks to
bytes that were not produced by them. Spec: docs/protocol.md §6, "Exchange 1.1.0".
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack
import nacl.bindings as sodium

from protocol import Identity, seal
from protocol.messages import KnowledgeTrailer

from .samples import (
    NONCE,
    SIGNER_SEED,
    STREAM_CHUNK,
    STREAM_DIRECTIVE,
    STREAM_DROPPED,
    STREAM_ITEMS,
    STREAM_PAYLOAD,
    STUDENT_SEED,
    TS_MS,
    stream_box_nonce,
)

PROTOCOL = "/knexa/exchange/1.1.0"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _shared_key() -> bytes:
    """Teacher's Ed25519 secret → X25519, student's Ed25519 public → X25519, then the
    NaCl Box precomputation (what either side derives)."""
    _, teacher_sk64 = sodium.crypto_sign_seed_keypair(SIGNER_SEED)
    student_pk32, _ = sodium.crypto_sign_seed_keypair(STUDENT_SEED)
    teacher_sk = sodium.crypto_sign_ed25519_sk_to_curve25519(teacher_sk64)
    student_pk = sodium.crypto_sign_ed25519_pk_to_curve25519(student_pk32)
    return sodium.crypto_box_beforenm(student_pk, teacher_sk)


def build() -> tuple[list[bytes], dict[str, Any]]:
    """The frames the teacher writes (boxes then the trailer) and the JSON description."""
    key = _shared_key()
    pieces = [STREAM_PAYLOAD[i : i + STREAM_CHUNK] for i in range(0, len(STREAM_PAYLOAD), STREAM_CHUNK)] or [b""]
    frames, tags, boxes = [], b"", []
    for index, piece in enumerate(pieces):
        plain = msgpack.packb(["knexa/e2e/1", STREAM_DIRECTIVE, index, piece], use_bin_type=True)
        nonce = stream_box_nonce(index)
        box = nonce + sodium.crypto_box_easy_afternm(plain, nonce, key)
        tags += box[24:40]
        record = msgpack.packb({"type": "KnowledgeBox", "index": index, "box": box}, use_bin_type=True)
        frames.append(_varint(len(record)) + record)
        boxes.append({"index": index, "nonce": nonce.hex(), "plaintext": plain.hex(), "box": box.hex()})
    trailer = KnowledgeTrailer(STREAM_DIRECTIVE, len(pieces), len(STREAM_PAYLOAD), hashlib.sha256(tags).digest(),
                               STREAM_ITEMS, STREAM_DROPPED)
    envelope = seal(trailer, Identity(SIGNER_SEED), ts_ms=TS_MS, nonce=NONCE)
    frames.append(_varint(len(envelope)) + envelope)
    described = {
        "protocol": PROTOCOL,
        "teacher_seed": SIGNER_SEED.hex(),
        "teacher": Identity(SIGNER_SEED).peer_id,
        "student_seed": STUDENT_SEED.hex(),
        "student": Identity(STUDENT_SEED).peer_id,
        "directive_id": STREAM_DIRECTIVE,
        "chunk_bytes": STREAM_CHUNK,
        "payload": STREAM_PAYLOAD.hex(),
        "boxes": boxes,
        "tags_sha256": hashlib.sha256(tags).hexdigest(),
        "trailer_envelope": envelope.hex(),
        "frames": [f.hex() for f in frames],
    }
    return frames, described
