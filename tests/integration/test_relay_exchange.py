"""A full knowledge exchange through the circuit relay: the relay never sees plaintext.

How the relay is observed: py-libp2p's hop service moves every relayed byte with
``CircuitV2Protocol._read_stream_with_retry`` (read from one side, write to the other);
the test relay is that class with the read recorded, so ``seen`` is exactly the byte
stream the relay forwards, both directions. A positive control shows the tap does see
the inner connection's cleartext: the security negotiation (multistream-select of
``/noise``) runs in the clear over the circuit, before Noise starts. After it, nothing
is readable to the relay — not the exchange protocol ID (negotiated inside yamux over
Noise), and not the package (also E2E-boxed to the student).
"""

from __future__ import annotations

import os
from pathlib import Path

import multiaddr
import trio
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol

from knexad.agents import AgentWorker
from knexad.exchange import ExchangeServer, UsedDirectives
from knexad.exchanges import read_exchanges
from knexad.state import StateFile
from knexad.student import fetch_package
from p2p.host import build_host, full_addrs, parse_peer_addr
from p2p.relay import PATH_RELAY, RelayNode, RelayServiceLimits, serve_relay
from protocol.envelope import Identity
from protocol.ids import EXCHANGE_PROTOCOL
from tests.integration.test_exchange import MARKER, TRANSFER_HASH, CountingAgent, make_config, make_directive

LISTEN = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]


def tapping_relay(seen: bytearray):
    class TappingRelay(CircuitV2Protocol):
        async def _read_stream_with_retry(self, stream, *args, **kwargs):  # type: ignore[override]
            data = await super()._read_stream_with_retry(stream, *args, **kwargs)
            if data:
                seen.extend(data)
            return data

    return TappingRelay


async def test_exchange_through_relay_is_ciphertext_at_the_relay(tmp_path: Path) -> None:
    cpm, teacher_id, student_id = Identity.generate(), Identity.generate(), Identity.generate()
    cfg = make_config(cpm)
    agent = CountingAgent()
    seen = bytearray()
    relay = build_host(os.urandom(32))
    teacher, student = build_host(teacher_id.seed), build_host(student_id.seed)
    server = ExchangeServer(teacher_id, cfg, AgentWorker(agent), UsedDirectives(tmp_path / "used.log"),
                            StateFile(tmp_path), transfer_hash=TRANSFER_HASH, home=tmp_path, host=teacher)
    async with relay.run(LISTEN), teacher.run(LISTEN), student.run(LISTEN), trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve_relay(relay, RelayServiceLimits(), task_status=task_status,
                                                            protocol_factory=tapping_relay(seen)))
        keeper = RelayNode(teacher, parse_peer_addr(full_addrs(relay)[0]), holepunch=False)
        await nursery.start(keeper.run)
        server.relay = keeper
        teacher.set_stream_handler(EXCHANGE_PROTOCOL, server.handle)
        client = RelayNode(student, None, holepunch=False)
        await nursery.start(client.run)

        raw, directive = make_directive(cpm, teacher_id.peer_id, student_id.peer_id)
        info = PeerInfo(teacher.get_id(), [multiaddr.Multiaddr(a) for a in keeper.circuit_addrs()])
        with trio.fail_after(60):  # hang guard only
            result = await fetch_package(student, student_id, cfg, info, raw, directive, relay=client)
        nursery.cancel_scope.cancel()

    assert result.path == PATH_RELAY
    # the teacher read the same path off the connection the request came over
    assert [r["path"] for r in read_exchanges(tmp_path, side="teacher")] == [PATH_RELAY]
    assert all(MARKER in item.completion for item in result.package.items)  # the student got plaintext
    assert len(seen) > result.plaintext_bytes  # the whole package crossed the tap
    assert b"/noise" in seen  # control: the tap sees the circuit's cleartext negotiation
    assert MARKER.encode() not in seen
    assert EXCHANGE_PROTOCOL.encode() not in seen
    assert b"def f_1(x)" not in seen
