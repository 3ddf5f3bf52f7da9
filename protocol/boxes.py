"""Exchange 1.1.0's chunk records: ``KnowledgeBox`` frames and the tag digest the signed
``KnowledgeTrailer`` carries (docs/protocol.md §6, "Exchange 1.1.0").

Why a record and not an envelope: in 1.0.0 every 1 MiB chunk was a signed envelope, so
each side hashed every byte twice with SHA-256 (the envelope body digest, the whole-
package digest) besides the XSalsa20-Poly1305 pass of the box. The box already carries
a MAC that only the two peers' shared key can make, its plaintext already binds the
directive and the index, and Noise binds the connection to the teacher; what the
per-chunk signatures added — the teacher's signature over the stream — one signature
over the SHA-256 of the boxes' 16-byte tags gives once per package, without touching
the payload again. What it does not give (the student holds the same box key, and
Poly1305 is not collision-resistant for a key holder): evidence against the teacher
that a third party could check. Nothing in KNEXA uses such evidence.

Wire form of a record: the msgpack map ``{"type": "KnowledgeBox", "index": int,
"box": bin}`` — exactly these keys, ``index`` ≥ 0, ``box`` = ``nonce(24) ‖
crypto_box_easy_afternm(plaintext)`` (protocol.e2e), so its tag is ``box[24:40]``.
Frames are built in one join (teacher) and parsed without unpacking the box when they
have the canonical layout (student); both paths accept exactly the same records.
"""

from __future__ import annotations

import hashlib
from typing import Any

from .codec import pack, unpack_strict
from .e2e import NONCE_BYTES, E2EBox, bin_header
from .errors import MalformedFrame
from .framing import frame_header
from .messages import KnowledgeBox

RECORD = KnowledgeBox.__name__
MAC_BYTES = 16  # Poly1305 tag, the first bytes of crypto_box_easy's output
BOX_OVERHEAD = NONCE_BYTES + MAC_BYTES
_KEYS = frozenset({"type", "index", "box"})


def encode_record(record: KnowledgeBox) -> bytes:
    """The record's msgpack bytes (the frame payload), canonical key order."""
    return pack({"type": RECORD, "index": record.index, "box": record.box})


def _head(index: int) -> bytes:
    """Canonical record bytes up to the box's bin header."""
    return b"\x83" + pack("type") + pack(RECORD) + pack("index") + pack(index) + pack("box")


def box_tag(box: bytes | memoryview) -> bytes:
    """The box's Poly1305 tag (what the trailer's digest covers)."""
    return bytes(box[NONCE_BYTES:BOX_OVERHEAD])


def seal_box_frame(
    box: E2EBox, directive_id: str, index: int, payload: bytes | memoryview, max_frame: int
) -> tuple[bytes, bytes]:
    """``(frame, tag)``: the framed ``KnowledgeBox`` record for one chunk, in one join
    (the ciphertext is copied once, into the frame), and its tag. Runs in the teacher's
    worker thread; no hash touches the payload."""
    nonce, cipher = box.seal_parts(directive_id, index, payload)
    return frame_from_parts(index, nonce, cipher, max_frame), cipher[:MAC_BYTES]


def frame_from_parts(index: int, nonce: bytes, cipher: bytes, max_frame: int) -> bytes:
    """Frame a record whose box is ``nonce ‖ cipher`` (vectors build the box themselves)."""
    head = _head(index) + bin_header(len(nonce) + len(cipher))
    return b"".join((frame_header(len(head) + len(nonce) + len(cipher), max_frame), head, nonce, cipher))


def parse_record(frame: bytes, expected_index: int) -> KnowledgeBox | None:
    """The ``KnowledgeBox`` in ``frame``, or None when the frame is not a record (then
    it must be an envelope: the caller opens it as one, with that path's errors).

    A canonical record for ``expected_index`` is recognised by prefix and its box sliced
    out without unpacking; anything else goes through the strict unpacker, so a hostile
    encoding gets the same verdict either way. ``MalformedFrame``: a record with other
    keys, a non-integer or negative index, a box that is not bytes or shorter than its
    nonce and tag.
    """
    head = _head(expected_index)
    if frame.startswith(head):
        start = len(head)
        for header_len in (2, 3, 5):
            size = len(frame) - start - header_len
            if size >= BOX_OVERHEAD and frame[start : start + header_len] == bin_header(size):
                return KnowledgeBox(expected_index, frame[start + header_len :])
    raw = unpack_strict(frame)
    if not isinstance(raw, dict) or raw.get("type") != RECORD:
        return None
    return _record_from(raw)


def _record_from(raw: dict[Any, Any]) -> KnowledgeBox:
    if set(raw) != _KEYS:
        raise MalformedFrame(f"{RECORD} keys mismatch: {sorted(map(str, raw))}")
    index, box = raw["index"], raw["box"]
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise MalformedFrame(f"{RECORD} index must be a non-negative int")
    if not isinstance(box, bytes):
        raise MalformedFrame(f"{RECORD} box must be bytes")
    if len(box) < BOX_OVERHEAD:
        raise MalformedFrame(f"{RECORD} box shorter than its nonce and tag")
    return KnowledgeBox(index, box)


def decode_record(data: bytes) -> KnowledgeBox:
    """Strict decode of a record payload (vectors, fuzzers); not-a-record is malformed."""
    raw = unpack_strict(data)
    if not isinstance(raw, dict) or raw.get("type") != RECORD:
        raise MalformedFrame(f"not a {RECORD} record")
    return _record_from(raw)


class TagDigest:
    """SHA-256 over the tags in chunk order — 16 bytes per chunk, so the digest costs
    nothing next to the payload, and the trailer stays 32 bytes at any chunk count."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def add(self, tag: bytes) -> None:
        self._hash.update(tag)

    def digest(self) -> bytes:
        return self._hash.digest()
