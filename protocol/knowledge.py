"""KnowledgePackage: the teacher's outputs on transfer prompts, and its wire codec.

The package is packed to msgpack, split into chunks, and each chunk is sealed with
``protocol.e2e`` before it becomes a ``KnowledgeChunk``. Decoding is strict like every
other body: exact keys, typed fields, bounded item count.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field

from .codec import pack, unpack_strict
from .e2e import E2EBox, bin_header
from .envelope import NONCE_BYTES, PROTOCOL_VERSION, Identity, now_ms, signed_bytes
from .errors import MalformedFrame
from .framing import frame_header
from .messages import KnowledgeChunk

MAX_ITEMS = 100_000
_ITEM_KEYS = frozenset({"id", "p", "c", "cat", "s"})


@dataclass(frozen=True, slots=True)
class KnowledgeItem:
    """One teacher output on one transfer prompt."""

    item_id: str
    prompt: str
    completion: str
    category: int = -1  # -1 when unknown; 0..11 for the built-in task categories
    score: float = 0.0  # teacher's own confidence / skill, informational


@dataclass(frozen=True, slots=True)
class KnowledgePackage:
    teacher_family: str
    items: tuple[KnowledgeItem, ...]
    meta: dict[str, float | int | str] = field(default_factory=dict)


def encode_package(package: KnowledgePackage) -> bytes:
    return pack(
        {
            "family": package.teacher_family,
            "items": [
                {"id": i.item_id, "p": i.prompt, "c": i.completion, "cat": i.category, "s": float(i.score)}
                for i in package.items
            ],
            "meta": dict(package.meta),
        }
    )


def decode_package(data: bytes) -> KnowledgePackage:
    raw = unpack_strict(data)
    if not isinstance(raw, dict) or set(raw) != {"family", "items", "meta"}:
        raise MalformedFrame("package must be a map with family, items, meta")
    family, items, meta = raw["family"], raw["items"], raw["meta"]
    if not isinstance(family, str) or not isinstance(items, list) or not isinstance(meta, dict):
        raise MalformedFrame("package field types")
    if len(items) > MAX_ITEMS:
        raise MalformedFrame(f"package has more than {MAX_ITEMS} items")
    out = []
    for item in items:
        if not isinstance(item, dict) or set(item) != _ITEM_KEYS:
            raise MalformedFrame("package item keys")
        ok = (
            isinstance(item["id"], str)
            and isinstance(item["p"], str)
            and isinstance(item["c"], str)
            and isinstance(item["cat"], int)
            and not isinstance(item["cat"], bool)
            and isinstance(item["s"], (int, float))
            and not isinstance(item["s"], bool)
            and math.isfinite(item["s"])
        )
        if not ok:
            raise MalformedFrame("package item field types")
        out.append(KnowledgeItem(item["id"], item["p"], item["c"], item["cat"], float(item["s"])))
    for key, value in meta.items():
        if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise MalformedFrame("package meta must map str to int/float/str")
    return KnowledgePackage(family, tuple(out), dict(meta))


def seal_chunk_frame(
    identity: Identity,
    box: E2EBox,
    directive_id: str,
    index: int,
    payload: bytes | memoryview,
    max_frame: int,
    *,
    ts_ms: int | None = None,
    nonce: bytes | None = None,
) -> bytes:
    """The framed, signed ``KnowledgeChunk`` envelope for one chunk, in one allocation.

    Byte for byte what ``encode_frame(seal(KnowledgeChunk(directive_id, index,
    box.seal_chunk(directive_id, index, payload)), identity), max_frame)`` produces
    (tests/unit/test_knowledge_frame.py holds them equal), but the 1 MiB ciphertext is
    copied once — into the frame — instead of four times (box, body, envelope, frame),
    and the body digest the signature covers is hashed from the pieces. This runs in a
    worker thread on the teacher: hashing and encryption release the GIL, copies do not.
    """
    ts = now_ms() if ts_ms is None else ts_ms
    env_nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
    box_nonce, cipher = box.seal_parts(directive_id, index, payload)
    # KnowledgeChunk body: the map as encode_body packs it, minus the empty bin at the end
    body_head = pack({"directive_id": directive_id, "index": index, "box": b""})[:-2]
    box_len = len(box_nonce) + len(cipher)
    body_parts = (body_head, bin_header(box_len), box_nonce, cipher)
    body_len = sum(len(part) for part in body_parts)
    body_hash = hashlib.sha256()
    for part in body_parts:
        body_hash.update(part)
    type_name = KnowledgeChunk.__name__
    sender = identity.peer_id
    signed = signed_bytes(PROTOCOL_VERSION, type_name, sender, ts, env_nonce, body_hash.digest())
    env_head = b"".join(
        (b"\x87", pack("v"), pack(PROTOCOL_VERSION), pack("type"), pack(type_name), pack("sender"), pack(sender),
         pack("ts"), pack(ts), pack("nonce"), pack(env_nonce), pack("body"), bin_header(body_len))
    )  # a 7-entry fixmap in Envelope.to_bytes key order
    env_tail = pack("sig") + pack(identity.sign(signed))
    env_len = len(env_head) + body_len + len(env_tail)
    return b"".join((frame_header(env_len, max_frame), env_head, *body_parts, env_tail))


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
