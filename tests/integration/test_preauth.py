"""Connections that never finish their upgrade are bounded (issue 14 §4, GHSA-hmjq-g7pp-rw3x).

A real host from ``p2p.host.build_host``; hostile clients are plain TCP sockets (no key,
no libp2p). What the node *read* from a hostile socket is counted independently of the
mitigation, by wrapping py-libp2p's ``TrioTCPStream.read`` for the test."""

from __future__ import annotations

import os

import multiaddr
import pytest
import trio
from libp2p.io.trio import TrioTCPStream
from structlog.testing import capture_logs

from benchmarks.preauth import hostile_preamble
from p2p.host import build_host, full_addrs, parse_peer_addr
from p2p.preauth import PreauthLimits
from p2p.streams import FramedStream

LISTEN = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
PROTO = "/knexa/test/1.0.0"
KIB = 1024
HANG_GUARD_S = 20  # only against hangs; bounds are asserted in bytes and events, not time


def tcp_port(host) -> int:
    return int(multiaddr.Multiaddr(full_addrs(host)[0]).value_for_protocol("tcp"))


def refused(logs: list[dict], reason: str) -> list[dict]:
    return [e for e in logs if e.get("event") == "p2p.preauth.refused" and e.get("reason") == reason]


async def echo_once(server, client) -> None:
    """An authenticated peer still connects and gets a frame answered."""
    info = parse_peer_addr(full_addrs(server)[0])
    with trio.fail_after(HANG_GUARD_S):
        await client.connect(info)
        fs = FramedStream(await client.new_stream(info.peer_id, [PROTO]), 1 << 20)
        await fs.write_frame(b"still here")
        assert await fs.read_frame() == b"still here"[::-1]


def serve_echo(host) -> None:
    async def handler(stream) -> None:
        fs = FramedStream(stream, 1 << 20)
        frame = await fs.read_frame()
        await fs.write_frame(frame[::-1])
        await fs.close()

    host.set_stream_handler(PROTO, handler)


@pytest.fixture()
def bytes_read_by_port(monkeypatch) -> dict[int, int]:
    """Bytes the node read per remote TCP port (the hostile client's local port)."""
    counts: dict[int, int] = {}
    original = TrioTCPStream.read

    async def counting_read(self, n=None):
        data = await original(self, n)
        addr = self.get_remote_address()
        if addr is not None:
            counts[addr[1]] = counts.get(addr[1], 0) + len(data)
        return data

    monkeypatch.setattr(TrioTCPStream, "read", counting_read)
    return counts


async def read_until_eof(sock: trio.SocketStream) -> bytes:
    got = bytearray()
    while chunk := await sock.receive_some(4096):
        got += chunk
    return bytes(got)


async def test_oversized_protocol_name_is_closed_after_the_read_budget(bytes_read_by_port) -> None:
    server, client = build_host(os.urandom(32)), build_host(os.urandom(32))
    async with server.run(LISTEN), client.run(LISTEN):
        serve_echo(server)
        with capture_logs() as logs, trio.fail_after(HANG_GUARD_S):
            sock = await trio.open_tcp_stream("127.0.0.1", tcp_port(server))
            local_port = sock.socket.getsockname()[1]
            sent = 0
            # announce a 1 GiB protocol name, then up to 8 MiB of filler: the node must
            # hang up long before, having read no more than its 64 KiB budget
            try:
                await sock.send_all(hostile_preamble(1 << 30))
                while sent < 8 << 20:
                    await sock.send_all(b"\0" * (64 * KIB))
                    sent += 64 * KIB
            except trio.BrokenResourceError:
                pass  # reset by the node: what we want
            try:
                await read_until_eof(sock)  # the node's multistream header, then EOF
            except trio.BrokenResourceError:
                pass
            await sock.aclose()
            assert sent < 8 << 20, "the node kept reading filler"
            assert 0 < bytes_read_by_port[local_port] <= 64 * KIB
            await echo_once(server, client)
    assert [e["remote"] for e in refused(logs, "oversized")] == [f"127.0.0.1:{local_port}"]


async def test_slowloris_is_dropped_at_the_handshake_deadline() -> None:
    server = build_host(os.urandom(32), preauth=PreauthLimits(handshake_deadline_s=0.5))
    client = build_host(os.urandom(32))
    async with server.run(LISTEN), client.run(LISTEN):
        serve_echo(server)
        with capture_logs() as logs:
            sock = await trio.open_tcp_stream("127.0.0.1", tcp_port(server))
            # send nothing. py-libp2p's own inbound timeout is 10 s: the guard is below it,
            # so only the injected 0.5 s deadline can end this read
            with trio.fail_after(8):
                header = await read_until_eof(sock)
            await sock.aclose()
        assert header.endswith(b"/multistream/1.0.0\n")  # it was negotiating, then hung up
        assert len(refused(logs, "deadline")) == 1
        await echo_once(server, client)  # a peer that completes its handshake in time is fine


@pytest.mark.parametrize(("limits", "reason"), [
    (PreauthLimits(per_ip=2, handshake_deadline_s=30), "per_ip_limit"),
    (PreauthLimits(per_ip=8, total=2, handshake_deadline_s=30), "total_limit"),
])
async def test_concurrent_unupgraded_connections_are_capped(limits, reason) -> None:
    server, client = build_host(os.urandom(32), preauth=limits), build_host(os.urandom(32))
    async with server.run(LISTEN), client.run(LISTEN):
        serve_echo(server)
        port = tcp_port(server)
        with capture_logs() as logs, trio.fail_after(HANG_GUARD_S):
            silent = []
            for _ in range(2):  # two silent connections, each mid-negotiation (header received)
                sock = await trio.open_tcp_stream("127.0.0.1", port)
                assert (await sock.receive_some(64)).endswith(b"/multistream/1.0.0\n")
                silent.append(sock)
            third = await trio.open_tcp_stream("127.0.0.1", port)
            try:
                assert await read_until_eof(third) == b""  # closed before a byte was exchanged
            except trio.BrokenResourceError:
                pass
            await third.aclose()
            assert len(refused(logs, reason)) == 1
            for sock in silent:
                await sock.aclose()
            upgrader = server.get_network().upgrader
            while upgrader.pending.total:  # the node notices the EOFs and frees the slots
                await trio.sleep(0.01)
            await echo_once(server, client)
