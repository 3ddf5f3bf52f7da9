"""Frames over a libp2p stream: the only place KNEXA touches stream bytes.

libp2p streams have no message boundaries (``read()`` returns whatever is buffered), and
a killed peer looks like a clean EOF — so every message is varint-framed
(``protocol.framing``) and a partial frame at EOF is a ``MalformedFrame`` (truncated),
not a clean close.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from libp2p.exceptions import BaseLibp2pError
from libp2p.network.stream.exceptions import StreamClosed, StreamEOF, StreamError, StreamReset

from protocol.errors import KnexaError, PeerUnavailable
from protocol.framing import FrameDecoder, encode_frame

READ_SIZE = 256 * 1024  # minimum read; a pending large frame asks for what it lacks

# What a dead, slow or misbehaving transport raises underneath us.
NET_ERRORS: tuple[type[BaseException], ...] = (
    BaseLibp2pError,
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)


class FramedStream:
    """Read/write whole frames on a libp2p ``INetStream`` with a size cap."""

    def __init__(self, stream: Any, max_frame: int) -> None:
        self.stream = stream
        self.max_frame = max_frame
        self._decoder = FrameDecoder(max_frame)
        self.bytes_in = 0
        self.bytes_out = 0

    @property
    def remote_peer(self) -> str:
        """The Noise-authenticated peer ID of the other end."""
        return self.stream.muxed_conn.peer_id.to_base58()

    async def read_frame(self) -> bytes | None:
        """Next frame, or None on a clean EOF at a frame boundary.

        Raises ``FrameTooLarge``/``MalformedFrame`` for hostile input and
        ``PeerUnavailable`` when the stream is reset. Callers wrap this in
        ``trio.fail_after`` — slow-loris peers get a deadline, not a task forever.
        """
        while True:
            frame = self._decoder.next_frame()
            if frame is not None:
                return frame
            try:
                data = await self.stream.read(max(READ_SIZE, self._decoder.bytes_wanted()))
            except StreamEOF:
                self._decoder.close()  # raises MalformedFrame if truncated
                return None
            except StreamError as exc:  # reset / closed / other stream failure
                raise PeerUnavailable(f"stream from {self._peer_safe()} ended: {type(exc).__name__}") from None
            if not data:
                self._decoder.close()
                return None
            self.bytes_in += len(data)
            self._decoder.feed(data)

    def buffered_frame(self) -> bytes | None:
        """The next frame if the peer already sent all of it, without waiting for more:
        how a server answers pipelined requests in one go (``cpm.service``)."""
        return self._decoder.next_frame()

    async def write_frame(self, payload: bytes) -> None:
        await self.write_encoded(encode_frame(payload, self.max_frame))

    async def write_frames(self, payloads: list[bytes]) -> None:
        """Several frames in one stream write: py-libp2p's CPU cost is per write (yamux,
        Noise, a syscall), not per byte — compare ``echo`` with ``echo_pipelined`` in
        ``benchmarks/ingest.py``."""
        await self.write_encoded(b"".join(encode_frame(p, self.max_frame) for p in payloads))

    async def write_encoded(self, data: bytes) -> None:
        """Write bytes that are already one or more whole frames (built off the event
        loop by ``protocol.knowledge.seal_chunk_frame``), in one stream write."""
        try:
            await self.stream.write(data)
        except (StreamError, StreamClosed, StreamReset) as exc:
            raise PeerUnavailable(f"write to {self._peer_safe()} failed: {type(exc).__name__}") from None
        self.bytes_out += len(data)

    async def close(self) -> None:
        try:
            await self.stream.close()
        except (StreamError, StreamClosed, StreamReset):
            pass

    async def reset(self) -> None:
        try:
            await self.stream.reset()
        except (StreamError, StreamClosed, StreamReset):
            pass

    def _peer_safe(self) -> str:
        try:
            return self.remote_peer
        except AttributeError:
            return "?"


@asynccontextmanager
async def stream_failures(framed: FramedStream, *, too_slow: str, broke: str) -> AsyncIterator[None]:
    """One client-side exchange of frames: every way it can fail resets the stream.

    A deadline (``trio.TooSlowError``) becomes ``PeerUnavailable(too_slow)``, a transport
    error ``PeerUnavailable("<broke>: <error type>")``, and a typed ``KnexaError`` passes
    through unchanged — in each case after the stream was reset, so nothing half-read is
    left open. Used by the daemon's CPM client and the student side of the exchange.
    """
    try:
        yield
    except trio.TooSlowError:
        await framed.reset()
        raise PeerUnavailable(too_slow) from None
    except NET_ERRORS as exc:
        await framed.reset()
        raise PeerUnavailable(f"{broke}: {type(exc).__name__}") from None
    except KnexaError:
        await framed.reset()
        raise
