"""Every rejection ends the stream promptly, on every KNEXA protocol (issue 14 §5).

A js-libp2p peer wrote malformed bytes, half-closed, and in 2 of 4 runs the stream never
ended on its side: the node answered ``Error`` and sent its FIN, but stopped reading, so
the bytes the peer still had in flight never left its send window, its own close never
completed, and nothing reset the stream. Here a py-libp2p peer does the same in-process
(tests/interop/test_js_libp2p.py does it with js-libp2p against real processes): the
stream must end — a clean end after the node drained the rest, or a reset — within a
bound well below py-libp2p's own 5 s yamux window timeout, which would otherwise end it
on the *peer's* side and hide the hang.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from libp2p.network.stream.exceptions import StreamEOF, StreamError
from structlog.testing import capture_logs

from p2p.streams import LINGER_S, NET_ERRORS
from protocol.envelope import Identity
from protocol.framing import encode_varint
from protocol.ids import ADMIN_PROTOCOL, CPM_PROTOCOL, EXCHANGE_PROTOCOL
from tests.reliability.netkit import client, running_cpm, running_teacher

pytestmark = pytest.mark.timeout(120)

BOUND_S = 4.0  # below yamux's 5 s window wait: the node, not the peer's timer, must end it
BAD_FRAME = encode_varint(3) + b"\xc1\xc1\xc1"  # a whole frame that is not msgpack
# a bad frame, then more junk than the largest yamux window (16 MiB) lets be in flight
BAD_FRAME_AND_MORE = BAD_FRAME + b"A" * (20 * 1024 * 1024)


@dataclass
class Outcome:
    """What the peer saw: the bytes the node sent and how the stream ended for it."""

    received: bytes = b""
    how: str = ""  # "eof" (the node's FIN) or "reset"
    write_failed: bool = False  # our bytes or FIN were cut off by the node's reset


# handler → its protocol; "cpm" and "admin" dial as an admitted peer / an admin, so the
# garbage reaches the frame parser; "cpm-unadmitted" is refused before a byte is read
TARGETS = {"cpm": CPM_PROTOCOL, "cpm-unadmitted": CPM_PROTOCOL, "admin": ADMIN_PROTOCOL,
           "exchange": EXCHANGE_PROTOCOL}


@asynccontextmanager
async def target(kind: str, tmp_path: Path) -> AsyncIterator[tuple[Any, Identity, str]]:
    """(PeerInfo, identity to dial as, protocol) for one handler."""
    me = Identity.generate()
    if kind == "exchange":
        async with running_teacher(tmp_path, exchange_step_s=5.0) as t:
            yield t.info(), me, TARGETS[kind]
        return
    async with running_cpm(tmp_path, open_admission=kind != "cpm-unadmitted", admins=[me.peer_id],
                           request_timeout_s=5.0) as (_, info):
        yield info, me, TARGETS[kind]


async def garbage(host: Any, info: Any, protocol: str, data: bytes, *, half_close: bool) -> Outcome:
    """Write ``data``, half-close (or not), and read until the node ends the stream."""
    await host.connect(info)
    stream = await host.new_stream(info.peer_id, [protocol])
    out = Outcome()

    async def write() -> None:
        try:
            await stream.write(data)
            if half_close:
                await stream.close()
        except NET_ERRORS:  # a reset while our bytes were in flight also ends it
            out.write_failed = True

    async def read() -> None:
        while True:
            try:
                chunk = await stream.read(65536)
            except StreamEOF:
                out.how = "eof"
                return
            except StreamError:
                out.how = "reset"
                return
            if not chunk:
                out.how = "eof"
                return
            out.received += chunk

    async def poke() -> None:
        """Still open on our side after the node's FIN: write until the node resets."""
        while True:
            await trio.sleep(0.1)
            try:
                await stream.write(b"x")
            except NET_ERRORS:
                out.how = "reset"
                return

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            nursery.start_soon(read)
        if out.how == "eof" and not half_close:
            await poke()
    finally:
        with trio.CancelScope(shield=True):
            await stream.reset()
    return out


@pytest.mark.parametrize("kind", TARGETS)
@pytest.mark.parametrize("data", [BAD_FRAME, BAD_FRAME_AND_MORE], ids=["bad-frame", "bad-frame-and-20MiB"])
async def test_garbage_then_half_close_ends_promptly(tmp_path: Path, kind: str, data: bytes) -> None:
    async with target(kind, tmp_path) as (info, me, protocol), client(me) as host:
        with capture_logs() as logs:
            with trio.move_on_after(BOUND_S) as waited:
                out = await garbage(host, info, protocol, data, half_close=True)
        assert not waited.cancelled_caught, f"{kind}: stream not ended within {BOUND_S} s"
        assert out.how in ("eof", "reset"), out.how
        assert out.received, "the node answered nothing (an Error frame is expected first)"
        assert any(e["event"] in ("cpm.rejected", "exchange.refused") for e in logs), logs


@pytest.mark.parametrize("kind", TARGETS)
async def test_peer_that_keeps_its_side_open_is_reset_after_the_linger(tmp_path: Path, kind: str) -> None:
    """After a rejection the node waits at most ``LINGER_S`` for the peer's end, then
    resets: a half-open stream the node no longer reads is never left behind."""
    async with target(kind, tmp_path) as (info, me, protocol), client(me) as host:
        with trio.move_on_after(LINGER_S + BOUND_S) as waited:
            out = await garbage(host, info, protocol, BAD_FRAME, half_close=False)
        assert not waited.cancelled_caught, f"{kind}: never reset a peer that stayed open"
        assert out.how == "reset" and out.received


@pytest.mark.parametrize("kind", TARGETS)
async def test_node_still_serves_after_garbage(tmp_path: Path, kind: str) -> None:
    """Many rejected streams in a row cost nothing lasting: the next one is answered too."""
    async with target(kind, tmp_path) as (info, me, protocol), client(me) as host:
        for _ in range(5):
            with trio.fail_after(BOUND_S):
                await garbage(host, info, protocol, BAD_FRAME_AND_MORE, half_close=True)
        with trio.fail_after(BOUND_S):
            last = await garbage(host, info, protocol, BAD_FRAME, half_close=True)
        assert last.how == "eof" and last.received
