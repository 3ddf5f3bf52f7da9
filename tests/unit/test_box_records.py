"""Exchange 1.1.0's record fast paths produce and accept exactly what the generic codec does.

``seal_box_frame`` joins a framed ``KnowledgeBox`` record in one allocation and
``parse_record`` slices a canonical record's box out without unpacking it; both exist
only for speed (benchmarks/stream.py), so the bytes and the verdicts must equal
``encode_frame(encode_record(...))`` and the strict unpacker's in every case.
"""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import E2EBox, MalformedFrame, encode_frame
from protocol.boxes import BOX_OVERHEAD, box_tag, decode_record, encode_record, parse_record, seal_box_frame
from protocol.messages import KnowledgeBox
from tests.unit.test_knowledge_frame import MAX, STUDENT, TEACHER
from tests.unit.test_knowledge_frame import _decode_one as _payload

# payload sizes around msgpack's bin8/bin16/bin32 and the varint's 2/3-byte boundaries
SIZES = [0, 1, 200, 215, 216, 16_000, 65_535 - 80, 65_535, 65_536, 70_000, 1 << 20]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("index", [0, 1, 127, 128, 65_536])
def test_sealed_frame_is_the_generic_encoding_and_opens(size: int, index: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    frame, tag = seal_box_frame(E2EBox(TEACHER, STUDENT.peer_id), "dir-7", index, memoryview(payload), MAX)
    record = decode_record(_payload(frame))
    assert frame == encode_frame(encode_record(record), MAX)
    assert tag == box_tag(record.box) and len(tag) == 16
    parsed = parse_record(_payload(frame), index)
    assert parsed == record
    assert E2EBox(STUDENT, TEACHER.peer_id).open_chunk("dir-7", index, parsed.box) == payload


def _verdict(fn, *args):
    try:
        return fn(*args)
    except MalformedFrame:
        return MalformedFrame


@settings(max_examples=300, deadline=None)
@given(index=st.integers(0, 2**40), expected=st.integers(0, 300), box=st.binary(max_size=300),
       cut=st.integers(0, 400), flip=st.integers(0, 400))
def test_parse_record_agrees_with_the_strict_unpacker(index: int, expected: int, box: bytes, cut: int,
                                                      flip: int) -> None:
    """On a canonical record and on truncated or bit-flipped variants of it: the fast
    path returns what the strict decoder returns, or refuses what it refuses (None: the
    strict decoder found a map that is not a record)."""
    good = encode_record(KnowledgeBox(index, box))
    variants = [good, good[:cut]]
    if flip < len(good):
        variants.append(good[:flip] + bytes([good[flip] ^ 0x01]) + good[flip + 1:])
    for data in variants:
        fast = _verdict(parse_record, data, expected)
        try:
            raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception:  # noqa: BLE001 — any unpack failure: the fast path must refuse too
            assert fast is MalformedFrame
            continue
        if not isinstance(raw, dict) or raw.get("type") != "KnowledgeBox":
            assert fast is None
            continue
        assert fast == _verdict(decode_record, data)
        if fast is not MalformedFrame:
            assert len(fast.box) >= BOX_OVERHEAD
