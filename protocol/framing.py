"""Unsigned-varint length-prefixed framing, sans-IO.

A stream carries ``varint(len) | payload`` frames. ``FrameDecoder`` is fed whatever
bytes arrive (libp2p streams have no message boundaries) and yields whole frames. The
declared length is checked against ``max_frame`` as soon as the varint is complete —
before a single byte of the body is buffered beyond what already arrived — so an
attacker cannot make us allocate a huge buffer by announcing one.
"""

from __future__ import annotations

from collections import deque

from .errors import FrameTooLarge, MalformedFrame, TruncatedFrame

MAX_VARINT_BYTES = 9  # multiformats unsigned-varint practical maximum (63 bits)


def encode_varint(value: int) -> bytes:
    if value < 0:
        raise ValueError("varint must be non-negative")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_frame(payload: bytes, max_frame: int) -> bytes:
    if len(payload) > max_frame:
        raise FrameTooLarge(f"frame of {len(payload)} bytes exceeds {max_frame}")
    return encode_varint(len(payload)) + payload


def decode_varint(buf: bytes | bytearray | memoryview, start: int = 0) -> tuple[int, int] | None:
    """Return (value, bytes_used) or None if incomplete; raise on overlong/non-minimal."""
    value = 0
    for i in range(MAX_VARINT_BYTES):
        pos = start + i
        if pos >= len(buf):
            return None
        byte = buf[pos]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if byte == 0 and i > 0:
                raise MalformedFrame("non-minimal varint")
            return value, i + 1
    raise MalformedFrame("varint longer than 9 bytes")


def frame_header(length: int, max_frame: int) -> bytes:
    """The varint prefix of a ``length``-byte frame, for callers that assemble the frame
    from several buffers in one join (``protocol.knowledge.seal_chunk_frame``)."""
    if length > max_frame:
        raise FrameTooLarge(f"frame of {length} bytes exceeds {max_frame}")
    return encode_varint(length)


class FrameDecoder:
    """Incremental decoder: ``feed(data)`` then drain ``next_frame()`` until None.

    Fed buffers are kept as a list and a frame is made with one join when it is
    complete (or handed out as is when one buffer holds exactly the frame): appending
    to one bytearray and slicing frames out of it copied every 1 MiB knowledge chunk
    three times.
    """

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._parts: deque[bytes | memoryview] = deque()
        self._size = 0
        self._need: int | None = None  # body length of the frame in progress

    @property
    def buffered(self) -> int:
        return self._size

    @property
    def at_boundary(self) -> bool:
        """True when no partial frame is pending (a clean EOF is possible here)."""
        return not self._size and self._need is None

    def feed(self, data: bytes) -> None:
        if data:
            self._parts.append(data)
            self._size += len(data)
        self._check_header()

    def _check_header(self) -> None:
        if self._need is None and self._size:
            parsed = decode_varint(self._peek(MAX_VARINT_BYTES))
            if parsed is None:
                return
            length, used = parsed
            if length > self.max_frame:
                raise FrameTooLarge(f"declared frame of {length} bytes exceeds {self.max_frame}")
            self._take(used)
            self._need = length

    def _peek(self, n: int) -> bytes:
        out = b""
        for part in self._parts:
            out += bytes(part[: n - len(out)])
            if len(out) >= n:
                break
        return out

    def _take(self, n: int) -> bytes:
        """Remove and return the first ``n`` buffered bytes (``n <= buffered``)."""
        if not n:
            return b""
        first = self._parts[0]
        if len(first) == n and isinstance(first, bytes):
            self._parts.popleft()
            self._size -= n
            return first
        pieces = []
        left = n
        while left:
            part = self._parts.popleft()
            if len(part) > left:
                view = memoryview(part)
                self._parts.appendleft(view[left:])
                part = view[:left]
            pieces.append(part)
            left -= len(part)
        self._size -= n
        return b"".join(pieces)

    def next_frame(self) -> bytes | None:
        self._check_header()
        if self._need is None or self._size < self._need:
            return None
        frame = self._take(self._need)
        self._need = None
        self._check_header()
        return frame

    def bytes_wanted(self) -> int:
        """How many more bytes complete the current frame (≥1 when unknown)."""
        if self._need is None:
            return 1
        return max(self._need - self._size, 0)

    def close(self) -> None:
        """Call at EOF: a partial frame is a truncation, not a clean end."""
        if self._size or self._need is not None:
            raise TruncatedFrame("stream ended inside a frame (truncated)")
