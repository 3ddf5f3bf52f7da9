"""Our hosts speak only Noise + yamux; frames cross a real libp2p stream intact."""

from __future__ import annotations

import os

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport

from p2p.host import build_host, full_addrs, parse_peer_addr
from p2p.streams import FramedStream
from protocol import FrameTooLarge, Identity, encode_varint

LISTEN = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
PROTO = "/knexa/test/1.0.0"


async def test_frames_and_authenticated_peer() -> None:
    seed_a, seed_b = os.urandom(32), os.urandom(32)
    a, b = build_host(seed_a), build_host(seed_b)
    seen: list[str] = []
    async with a.run(LISTEN), b.run(LISTEN):

        async def handler(stream) -> None:
            fs = FramedStream(stream, 1 << 20)
            seen.append(fs.remote_peer)
            frame = await fs.read_frame()
            await fs.write_frame(frame[::-1])
            await fs.close()

        a.set_stream_handler(PROTO, handler)
        info = parse_peer_addr(full_addrs(a)[0])
        with trio.fail_after(10):
            await b.connect(info)
            fs = FramedStream(await b.new_stream(info.peer_id, [PROTO]), 1 << 20)
            await fs.write_frame(b"knexa" * 1000)
            assert await fs.read_frame() == (b"knexa" * 1000)[::-1]
            assert await fs.read_frame() is None  # clean EOF at a boundary
    # the peer ID Noise authenticated is the one derived from b's envelope key
    assert seen == [Identity(seed_b).peer_id]


async def test_oversize_frame_refused_before_reading_body() -> None:
    a, b = build_host(os.urandom(32)), build_host(os.urandom(32))
    errors: list[Exception] = []
    async with a.run(LISTEN), b.run(LISTEN):

        async def handler(stream) -> None:
            fs = FramedStream(stream, 1024)
            try:
                await fs.read_frame()
            except FrameTooLarge as exc:
                errors.append(exc)
                await fs.reset()

        a.set_stream_handler(PROTO, handler)
        info = parse_peer_addr(full_addrs(a)[0])
        with trio.fail_after(10):
            await b.connect(info)
            stream = await b.new_stream(info.peer_id, [PROTO])
            await stream.write(encode_varint(1 << 33))  # announce 8 GiB, send nothing else
            while not errors:
                await trio.sleep(0.01)
    assert isinstance(errors[0], FrameTooLarge)


async def test_plaintext_dial_is_refused() -> None:
    ours = build_host(os.urandom(32))
    kp = create_new_key_pair()
    plaintext_only = new_host(
        key_pair=kp,
        sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(kp)},
    )
    async with ours.run(LISTEN), plaintext_only.run(LISTEN):
        info = parse_peer_addr(full_addrs(ours)[0])
        with pytest.raises(Exception) as excinfo:  # noqa: PT011 — libp2p raises several types
            with trio.fail_after(15):
                await plaintext_only.connect(info)
        assert not isinstance(excinfo.value, trio.TooSlowError)
        assert not ours.get_network().connections
