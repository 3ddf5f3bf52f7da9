"""Frames over a libp2p stream: the only place KNEXA touches stream bytes.

libp2p streams have no message boundaries (``read()`` returns whatever is buffered), and
a killed peer looks like a clean EOF — so every message is varint-framed
(``protocol.framing``) and a partial frame at EOF is a ``MalformedFrame`` (truncated),
not a clean close.

How a served stream ends is decided here too (``serving``, ``FramedStream.end``), once
for every handler: our FIN alone is only half an end. A peer that still has bytes in
flight when we refuse it — a js-libp2p peer that wrote garbage and then its FIN, with
more than its send window behind the bad frame — waits for window credit we never
grant once we stop reading, so its side of the stream never ended (issue 14 §5). After
our FIN a handler therefore reads and drops what the peer still sends until its end,
for at most ``LINGER_S`` and ``LINGER_MAX_BYTES``, and resets the stream otherwise.
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
LINGER_S = 2.0  # after our FIN: how long a served stream waits for the peer's end …
LINGER_MAX_BYTES = 4 * 1024 * 1024  # … and how much it still reads and drops, before a reset
RESET_S = 1.0  # a reset from a cancelled task (host shutdown) gets this long, shielded

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
        self._eof = False  # the peer's end (its FIN) was read
        self._reset = False  # reset by either side: nothing is left to end

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
                self._eof = True
                self._decoder.close()  # raises MalformedFrame if truncated
                return None
            except StreamError as exc:  # reset / closed / other stream failure
                self._reset = self._reset or isinstance(exc, StreamReset)
                raise PeerUnavailable(f"stream from {self._peer_safe()} ended: {type(exc).__name__}") from None
            if not data:
                self._eof = True
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
        """Our FIN (a half-close: the peer may still send). Never raises for a stream or
        connection that is already gone — callers are on their way out."""
        try:
            await self.stream.close()
        except NET_ERRORS:
            pass

    async def reset(self) -> None:
        self._reset = True
        try:
            await self.stream.reset()
        except NET_ERRORS:
            pass

    async def abort(self) -> None:
        """Reset, even from a cancelled task (a host shutting down), within ``RESET_S``."""
        with trio.CancelScope(shield=True, deadline=trio.current_time() + RESET_S):
            await self.reset()

    async def end(self, *, linger_s: float = LINGER_S, max_drain: int = LINGER_MAX_BYTES) -> str:
        """End the stream for both sides, promptly: ``"closed"`` or ``"reset"``.

        Our FIN, then — unless the peer's end was already read — what the peer still
        sends is read and dropped until its FIN or reset arrives, for at most
        ``linger_s`` seconds and ``max_drain`` bytes; a peer that keeps sending or keeps
        its side open is reset. Without the drain a peer with bytes in flight waits
        forever for window credit (module docstring). Cancelled meanwhile, it resets.
        """
        if self._reset:
            return "reset"
        ended = False
        try:
            await self.close()
            ended = self._eof
            if not ended:
                with trio.move_on_after(linger_s):
                    ended = await self._drain(max_drain)
        finally:
            if not ended:
                await self.abort()
        return "reset" if self._reset else "closed"

    async def _drain(self, max_bytes: int) -> bool:
        """Read and drop until the peer ends its side: True once it did (FIN or reset),
        False when it sent more than ``max_bytes`` or the connection broke."""
        dropped = 0
        while dropped <= max_bytes:
            try:
                data = await self.stream.read(READ_SIZE)
            except StreamEOF:
                self._eof = True
                return True
            except StreamReset:
                self._reset = True
                return True
            except NET_ERRORS:
                return False
            if not data:
                self._eof = True
                return True
            dropped += len(data)
            self.bytes_in += len(data)
        return False

    def _peer_safe(self) -> str:
        try:
            return self.remote_peer
        except AttributeError:
            return "?"


@asynccontextmanager
async def serving(stream: Any, max_frame: int, *, linger_s: float = LINGER_S) -> AsyncIterator[FramedStream]:
    """The stream of a stream handler, ended however the handler leaves the block.

    A normal exit — an answer written, an ``Error`` written, a refusal, an idle stream —
    ends it with ``FramedStream.end`` (FIN, drain the peer's rest, reset if it lingers);
    an exception escaping the handler resets it. Every KNEXA handler (``cpm.service``,
    ``cpm.admin``, ``knexad.exchange``) serves through this, so no path of theirs can
    leave a stream neither closed nor reset, whatever implementation the peer runs.
    """
    framed = FramedStream(stream, max_frame)
    done = False
    try:
        yield framed
        done = True
    finally:
        if done:
            await framed.end(linger_s=linger_s)
        else:
            await framed.abort()


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


# --- two-stage pipelines: the knowledge chunk stream (knexad.exchange / knexad.student) ---
#
# Each side overlaps its per-chunk crypto with the stream: the teacher seals chunk i+1 in
# a worker thread while chunk i is written, the student verifies and opens chunk i in a
# worker thread while chunk i+1 is read. SHA-256 and XSalsa20-Poly1305 release the GIL,
# so on two cores the crypto runs beside py-libp2p's (pure-Python) yamux and Noise
# instead of after them. It still shares the cores and the GIL with the event loop;
# ``python -m benchmarks.stream --interference`` measures what that alone costs.
# At most PIPELINE_DEPTH frames wait between the two stages.

PIPELINE_DEPTH = 1


@asynccontextmanager
async def pipeline() -> AsyncIterator[trio.Nursery]:
    """A nursery for a two-stage pipeline that fails with the error that stopped it
    (a ``PeerUnavailable``, ``TooSlowError`` …), not an ``ExceptionGroup`` around it,
    so callers keep handling typed errors as before."""
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        errors = leaves(group)
        first = next((e for e in errors if not isinstance(e, trio.Cancelled)), errors[0])
        raise first from None


def leaves(group: BaseExceptionGroup) -> list[BaseException]:
    """Every non-group exception inside ``group``, depth first."""
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out
