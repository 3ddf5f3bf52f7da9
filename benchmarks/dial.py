"""Connection setup: ours vs a bare py-libp2p dial, side by side in one run.

    python -m benchmarks.dial [--connections 40] [--json]

Each sample is one fresh connection: TCP dial + Noise handshake + yamux + a new stream
(multistream-select of the protocol) + one byte echoed back, so the stream is known to
work end to end; then the dialler disconnects. Two pairs of hosts run in the same trio
loop on 127.0.0.1:

* ``ours`` — both ends built by ``p2p.host.build_host`` (Noise + yamux only, our
  ``ConnectionConfig``, the pre-authentication guard ``p2p.preauth`` installed on the
  listener and the dialler), the stream opened by ``p2p.rpc.open_stream`` (the daemon's
  and the CLI's client path: unblock the negative cache, connect and open under one
  deadline);
* ``bare`` — py-libp2p's ``new_host`` with the same Noise + yamux options and the same
  ``ConnectionConfig`` (``p2p.host.connection_config``), no guard, ``host.connect`` +
  ``host.new_stream``.

The samples alternate ours/bare so drift in the machine's load hits both alike; the
medians and their ratio (target ours/bare ≤ 1.2) are reported with the 1-minute load
average. Absolute milliseconds are context only on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from p2p.host import build_host, connection_config, full_addrs, key_pair_from_seed, parse_peer_addr
from p2p.rpc import open_stream
from protocol import Identity

LISTEN = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
PROTO = "/knexa/bench-dial/1.0.0"
TARGET = 1.2  # ours/bare median, issue 20 item 4
DIAL_S = 10.0


def bare_host(seed: bytes):  # noqa: ANN201 — py-libp2p's BasicHost
    """py-libp2p with Noise + yamux and the same ConnectionConfig as ours, nothing else."""
    kp = key_pair_from_seed(seed)
    noise = NoiseTransport(kp, noise_privkey=create_x25519_key_pair().private_key)
    return new_host(key_pair=kp, sec_opt={NOISE_PROTOCOL_ID: noise}, muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
                    connection_config=connection_config(DIAL_S), enable_mDNS=False, enable_upnp=False)


async def _echo(stream) -> None:  # noqa: ANN001
    data = await stream.read(1)
    await stream.write(data)
    await stream.close()


async def _one(dialer, info, ours: bool) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    if ours:
        stream = await open_stream(dialer, info, PROTO, DIAL_S)
    else:
        with trio.fail_after(DIAL_S):
            await dialer.connect(info)
            stream = await dialer.new_stream(info.peer_id, [PROTO])
    await stream.write(b"x")
    if await stream.read(1) != b"x":
        raise RuntimeError("echo failed")
    elapsed = time.perf_counter() - t0
    await stream.close()
    await dialer.disconnect(info.peer_id)
    return elapsed


async def _run(connections: int, warmup: int) -> dict[str, list[float]]:
    ours_srv, ours_cli = build_host(Identity.generate().seed), build_host(Identity.generate().seed)
    bare_srv, bare_cli = bare_host(Identity.generate().seed), bare_host(Identity.generate().seed)
    times: dict[str, list[float]] = {"ours": [], "bare": []}
    async with ours_srv.run(LISTEN), ours_cli.run(LISTEN), bare_srv.run(LISTEN), bare_cli.run(LISTEN):
        for srv in (ours_srv, bare_srv):
            srv.set_stream_handler(PROTO, _echo)
        ours_info = parse_peer_addr(full_addrs(ours_srv)[0])
        bare_info = parse_peer_addr(full_addrs(bare_srv)[0])
        for i in range(warmup + connections):
            pair = ((True, ours_cli, ours_info), (False, bare_cli, bare_info))
            for ours, dialer, info in pair if i % 2 == 0 else pair[::-1]:  # alternate who goes first
                elapsed = await _one(dialer, info, ours)
                if i >= warmup:
                    times["ours" if ours else "bare"].append(elapsed)
                await trio.sleep(0.01)  # let both sides finish closing before the next dial
    return times


def run(connections: int = 40, warmup: int = 3) -> dict[str, object]:
    load0 = os.getloadavg()[0]
    times = trio.run(_run, connections, warmup)
    load1 = os.getloadavg()[0]
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    return {
        "connections": connections,
        "median_ms": {k: round(v, 2) for k, v in med.items()},
        "p90_ms": {k: round(sorted(v)[int(0.9 * (len(v) - 1))] * 1000, 2) for k, v in times.items()},
        "ratio_ours_vs_bare": round(med["ours"] / med["bare"], 3),
        "target": f"ratio_ours_vs_bare <= {TARGET}",
        "load_avg_1min": [load0, load1],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=40, help="fresh connections per mode")
    ap.add_argument("--warmup", type=int, default=3, help="connections per mode not counted")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.connections < 1:
        ap.error("--connections must be ≥ 1")
    out = run(a.connections, a.warmup)
    if a.json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key:20s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
