"""KnowledgePackage: the teacher's outputs on transfer prompts, and its wire codec.

The package is packed to msgpack, split into chunks, and each chunk is sealed with
``protocol.e2e`` before it becomes a ``KnowledgeChunk``. Decoding is strict like every
other body: exact keys, typed fields, bounded item count.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

from .codec import pack, unpack_strict
from .errors import MalformedFrame

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


def split_chunks(data: bytes, chunk_size: int) -> list[bytes]:
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    return [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)] or [b""]


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
