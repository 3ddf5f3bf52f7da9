"""Dialling a peer and one request/reply on a fresh stream: the client side shared by the
daemon's CPM client, the operator's admin commands and the student's exchange.

Why not py-libp2p's ``RequestResponse`` (0.8.1), although it frames messages the same
way (varint length): it does not connect or lift the dialler's 60 s negative cache
(a restarted CPM must be reachable on the next try), it maps every failure to its own
exception types, and it gives up when the write fails — but the CPM may refuse a
request (``Error{unauthorized}``) before reading it and close, and that answer is
still waiting to be read. The server side is ours too: the CPM answers pipelined
requests on one stream and group-commits them (docs/architecture.md §Request/response).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.peerinfo import PeerInfo

from p2p.streams import NET_ERRORS, FramedStream, stream_failures
from protocol.errors import PeerUnavailable


def protocol_list(protocol: str | Sequence[str]) -> list[Any]:
    """One protocol ID or several (in order of preference), as ``new_stream`` takes them."""
    return [protocol] if isinstance(protocol, str) else list(protocol)


async def open_stream(host: IHost, info: PeerInfo, protocol: str | Sequence[str], dial_s: float) -> INetStream:
    """Connect (if needed) and open a stream, under one deadline; failures → PeerUnavailable.

    ``protocol`` may be several IDs in order of preference (the exchange's versions):
    multistream-select tries each until the peer accepts one, and the stream's
    ``get_protocol()`` says which."""
    peer = info.peer_id.to_base58()
    # py-libp2p refuses to dial a peer for 60 s after all its addresses failed (a
    # "negative cache"); our own backoff paces retries, and a restarted CPM must be
    # reachable on the next attempt, not a minute later
    unblock = getattr(host.get_network(), "unblock_peer", None)
    if unblock is not None:
        unblock(info.peer_id)
    try:
        with trio.fail_after(dial_s):
            await host.connect(info)
            return await host.new_stream(info.peer_id, protocol_list(protocol))
    except trio.TooSlowError:
        reason = f"dial {peer} timed out after {dial_s} s"
    except NET_ERRORS as exc:
        reason = f"dial {peer} failed: {type(exc).__name__}: {exc}"
    # a half-dead connection would be reused by the next connect(); drop it
    with trio.move_on_after(2):
        try:
            await host.disconnect(info.peer_id)
        except NET_ERRORS:
            pass
    raise PeerUnavailable(reason)


async def request_reply(
    host: IHost,
    info: PeerInfo,
    protocol: str,
    request: bytes,
    *,
    max_frame: int,
    dial_s: float,
    timeout_s: float,
    what: str,
) -> bytes:
    """Send one sealed request frame on a fresh stream and return the one reply frame.

    Every transport failure, a deadline, or a stream closed without an answer is a
    ``PeerUnavailable`` (the stream is reset); the caller verifies the reply
    (``protocol.conversation.open_reply``)."""
    peer = info.peer_id.to_base58()
    framed = FramedStream(await open_stream(host, info, protocol, dial_s), max_frame)
    async with stream_failures(framed, too_slow=f"{peer} did not answer {what} within {timeout_s} s",
                               broke=f"stream to {peer} failed during {what}"):
        with trio.fail_after(timeout_s):
            try:
                await framed.write_frame(request)
            except PeerUnavailable:
                # refused before reading our request: the answer can still be in the buffer
                pass
            raw = await framed.read_frame()
    await framed.close()
    if raw is None:
        raise PeerUnavailable(f"{peer} closed the stream without answering {what}")
    return raw
