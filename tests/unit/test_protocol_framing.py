"""Varint framing: incremental decode, size cap before allocation, truncation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import FrameDecoder, FrameTooLarge, MalformedFrame, encode_frame, encode_varint
from protocol.framing import decode_varint, frame_header


@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_varint_round_trip(n: int) -> None:
    data = encode_varint(n)
    assert decode_varint(data) == (n, len(data))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=8), st.integers(min_value=1, max_value=50))
def test_frames_survive_any_split(payloads: list[bytes], step: int) -> None:
    stream = b"".join(encode_frame(p, 1024) for p in payloads)
    dec = FrameDecoder(1024)
    out = []
    for i in range(0, len(stream), step):
        dec.feed(stream[i : i + step])
        while (frame := dec.next_frame()) is not None:
            out.append(frame)
    assert out == payloads
    assert dec.at_boundary
    dec.close()


def test_oversize_rejected_before_body_arrives() -> None:
    dec = FrameDecoder(max_frame=1024)
    with pytest.raises(FrameTooLarge):
        dec.feed(encode_varint(1 << 40))  # 1 TiB announced, nothing allocated
    assert dec.buffered <= 9


def test_encode_refuses_oversize() -> None:
    with pytest.raises(FrameTooLarge):
        encode_frame(b"x" * 11, 10)


def test_truncated_frame_is_malformed_at_eof() -> None:
    dec = FrameDecoder(1024)
    dec.feed(encode_frame(b"hello world", 1024)[:-3])
    assert dec.next_frame() is None
    with pytest.raises(MalformedFrame, match="truncated"):
        dec.close()


def test_overlong_and_non_minimal_varints() -> None:
    with pytest.raises(MalformedFrame):
        FrameDecoder(1024).feed(b"\xff" * 10)
    with pytest.raises(MalformedFrame):
        FrameDecoder(1024).feed(b"\x81\x00")


def test_zero_length_frame() -> None:
    dec = FrameDecoder(10)
    dec.feed(b"\x00")
    assert dec.next_frame() == b""


def test_frame_of_exactly_max_frame_bytes_passes() -> None:
    frame = encode_frame(b"x" * 10, 10)
    assert frame_header(10, 10) == frame[:1]
    dec = FrameDecoder(10)
    dec.feed(frame)
    assert dec.next_frame() == b"x" * 10


def test_multi_byte_header_arriving_byte_by_byte() -> None:
    payload = bytes(range(256)) * 2  # 512 bytes: a 2-byte varint prefix
    dec = FrameDecoder(1024)
    out = []
    for byte in encode_frame(payload, 1024) + encode_frame(b"next", 1024):
        dec.feed(bytes([byte]))
        while (frame := dec.next_frame()) is not None:
            out.append(frame)
    assert out == [payload, b"next"]


@pytest.mark.parametrize("partial", [b"\x85", encode_varint(5)])
def test_eof_inside_a_header_or_before_the_body_is_truncation(partial: bytes) -> None:
    dec = FrameDecoder(1024)
    dec.feed(partial)
    assert dec.next_frame() is None and not dec.at_boundary
    with pytest.raises(MalformedFrame, match="truncated"):
        dec.close()


def test_bytes_wanted_is_what_completes_the_frame() -> None:
    """The stream reader sizes its next read with this (p2p.streams)."""
    dec = FrameDecoder(1024)
    assert dec.bytes_wanted() == 1  # no header yet
    dec.feed(encode_varint(300) + b"x" * 100)
    assert dec.bytes_wanted() == 200
    dec.feed(b"x" * 200)
    assert dec.bytes_wanted() == 0
    assert dec.next_frame() == b"x" * 300 and dec.bytes_wanted() == 1
