"""Small programs the network-namespace tests start *inside* testbed namespaces.

Run as ``python -m tests.e2e.netns_tools <command> …`` from the repository root (the
testbed's ``run`` keeps the working directory). Each writes what it observed as JSON
(a ready file or stdout), so the test asserts on facts the far side reports, not on
timing. Commands:

* ``tcp-serve ADDR READY LOG`` — TCP server on ADDR:0; writes ``{"port"}`` to READY;
  per connection appends ``{"peer": [ip, port]}`` to LOG, answers ``pong`` and, if the
  client sends ``hold``, keeps the connection open until the client closes it;
* ``tcp-dial HOST PORT [--hold READY] [--timeout S]`` — prints ``{"ok", "reply"|"error"}``;
  with ``--hold`` it keeps the connection and writes READY once it got the reply;
* ``tcp-push ADDR READY`` — one connection; after a line on stdin, writes to it until
  a write fails and prints the outcomes;
* ``tcp-sink ADDR READY`` / ``tcp-send HOST PORT NBYTES`` — bulk transfer, the sender
  prints ``{"bytes", "seconds"}`` (reported in a log line by the test, never asserted);
* ``p2p-listen ADDR READY LOG`` — a py-libp2p host (``p2p.host.build_host``: Noise +
  yamux) echoing reversed frames on ``/knexa/netns-test/1.0.0``; per stream appends
  ``{"peer", "remote"}`` to LOG;
* ``p2p-dial MADDR`` — dials, sends one frame, prints ``{"peer", "reply"}``;
* ``p2p-relay ADDR READY`` — a circuit relay v2 (``p2p.relay.serve_relay``) on ADDR:0;
  writes ``{"addrs"}`` to READY;
* ``p2p-peer ADDR RELAY_READY READY LOG [TARGET_READY]`` — a host on ADDR:0 with a
  ``p2p.relay.RelayNode`` (reservation on the relay, DCUtR); writes ``{"id", "addrs",
  "circuit"}`` to READY. Without TARGET_READY it serves ``/knexa/netns-test/1.0.0`` and
  appends ``{"side": "teacher", "path"}`` per stream to LOG (the path as
  ``p2p.relay.stream_path`` reads it on the accepting side); with it, it opens that
  protocol to the target the way a student does (``open_stream_via``: direct, relay,
  DCUtR) and appends ``{"side": "student", "path"}`` to LOG;
* ``own-testbed READY`` — builds a ``NatTestbed``, starts two sleepers inside (one
  without ``PDEATHSIG``, so it outlives a SIGKILLed owner), writes
  ``{"tag", "namespaces", "pids"}`` and waits to be signalled.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

PROTO = "/knexa/netns-test/1.0.0"


def _write_json(path: str, doc: object) -> None:
    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps(doc))
    os.replace(tmp, path)


def _append_json(path: str, doc: object) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(doc) + "\n")


def tcp_serve(addr: str, ready: str, log: str) -> None:
    srv = socket.create_server((addr, 0))
    _write_json(ready, {"port": srv.getsockname()[1]})
    held = []
    while True:
        conn, peer = srv.accept()
        _append_json(log, {"peer": list(peer)})
        data = conn.recv(64)
        conn.sendall(b"pong")
        if data.startswith(b"hold"):
            held.append(conn)  # keep the mapping in the NAT's table
        else:
            conn.close()


def tcp_dial(host: str, port: int, timeout: float, hold: str | None) -> None:
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.sendall(b"hold" if hold else b"ping")
        reply = sock.recv(64).decode()
    except OSError as exc:
        print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}))
        return
    print(json.dumps({"ok": True, "reply": reply}), flush=True)
    if hold:
        _write_json(hold, {"local": list(sock.getsockname())})
        time.sleep(3600)


def tcp_push(addr: str, ready: str) -> None:
    """One connection; after a line on stdin, write to it until that fails (≤ 50 tries):
    prints the outcomes, e.g. ``["ok", "ConnectionResetError"]`` once a NAT forgot us."""
    srv = socket.create_server((addr, 0))
    _write_json(ready, {"port": srv.getsockname()[1]})
    conn, _ = srv.accept()
    conn.recv(64)
    conn.sendall(b"pong")
    sys.stdin.readline()
    outcomes = []
    for _ in range(50):
        try:
            conn.sendall(b"x" * 100)
        except OSError as exc:
            outcomes.append(type(exc).__name__)
            break
        outcomes.append("ok")
        time.sleep(0.1)
    print(json.dumps(outcomes), flush=True)


def tcp_sink(addr: str, ready: str) -> None:
    srv = socket.create_server((addr, 0))
    _write_json(ready, {"port": srv.getsockname()[1]})
    conn, _ = srv.accept()
    total = 0
    while chunk := conn.recv(1 << 16):
        total += len(chunk)
    conn.sendall(str(total).encode())
    conn.close()


def tcp_send(host: str, port: int, nbytes: int) -> None:
    sock = socket.create_connection((host, port), timeout=60)
    t0 = time.monotonic()
    sock.sendall(b"\0" * nbytes)
    sock.shutdown(socket.SHUT_WR)
    acked = int(sock.recv(64))
    print(json.dumps({"bytes": acked, "seconds": time.monotonic() - t0}))


def p2p_listen(addr: str, ready: str, log: str) -> None:
    import multiaddr
    import trio

    from p2p.host import build_host, full_addrs
    from p2p.streams import FramedStream

    async def main() -> None:
        host = build_host(os.urandom(32))

        async def handler(stream) -> None:
            fs = FramedStream(stream, 1 << 16)
            remote = stream.muxed_conn.get_remote_address() if hasattr(stream.muxed_conn, "get_remote_address") else None
            _append_json(log, {"peer": fs.remote_peer, "remote": list(remote) if remote else None})
            frame = await fs.read_frame()
            await fs.write_frame(frame[::-1])
            await fs.close()

        async with host.run([multiaddr.Multiaddr(f"/ip4/{addr}/tcp/0")]):
            host.set_stream_handler(PROTO, handler)
            _write_json(ready, {"addrs": full_addrs(host)})
            await trio.sleep_forever()

    trio.run(main)


def p2p_dial(maddr: str) -> None:
    import multiaddr
    import trio

    from p2p.host import build_host, parse_peer_addr
    from p2p.streams import FramedStream
    from protocol import Identity

    async def main() -> None:
        seed = os.urandom(32)
        host = build_host(seed, dial_timeout_s=10)
        async with host.run([multiaddr.Multiaddr("/ip4/0.0.0.0/tcp/0")]):
            info = parse_peer_addr(maddr)
            with trio.fail_after(30):
                await host.connect(info)
                fs = FramedStream(await host.new_stream(info.peer_id, [PROTO]), 1 << 16)
                await fs.write_frame(b"through the nat")
                reply = await fs.read_frame()
        print(json.dumps({"peer": Identity(seed).peer_id, "reply": reply.decode() if reply else None}))

    trio.run(main)


def p2p_relay(addr: str, ready: str) -> None:
    import multiaddr
    import trio

    from p2p.host import build_host, full_addrs
    from p2p.relay import RelayServiceLimits, serve_relay

    async def main() -> None:
        host = build_host(os.urandom(32))
        async with host.run([multiaddr.Multiaddr(f"/ip4/{addr}/tcp/0")]):
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_relay, host, RelayServiceLimits())
                _write_json(ready, {"addrs": full_addrs(host)})
                await trio.sleep_forever()

    trio.run(main)


def p2p_peer(addr: str, relay_ready: str, ready: str, log: str, target_ready: str | None) -> None:
    import multiaddr
    import trio
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import PeerInfo

    from p2p.host import build_host, parse_peer_addr
    from p2p.relay import RelayNode, open_stream_via, stream_path

    async def main() -> None:
        host = build_host(os.urandom(32))
        relay = parse_peer_addr(json.loads(Path(relay_ready).read_text())["addrs"][0])
        async with host.run([multiaddr.Multiaddr(f"/ip4/{addr}/tcp/0")]):
            node = RelayNode(host, relay)

            async def handler(stream) -> None:
                _append_json(log, {"side": "teacher", "path": stream_path(host, stream, node)})
                await stream.write(await stream.read(4))
                await stream.close()

            host.set_stream_handler(PROTO, handler)
            async with trio.open_nursery() as nursery:
                await nursery.start(node.run)
                # the relay must have told us our NAT's public address (identify) before a
                # punch can predict it: wait for that observation
                manager = host._observed_addr_manager
                with trio.move_on_after(30):
                    while manager is not None and not manager.addrs(min_observers=1):
                        await trio.sleep(0.1)
                _write_json(ready, {"id": host.get_id().to_base58(), "circuit": node.circuit_addrs(),
                                    "addrs": [str(a).split("/p2p/", 1)[0] for a in host.get_addrs()]})
                if target_ready is None:
                    await trio.sleep_forever()
                while not os.path.exists(target_ready):
                    await trio.sleep(0.1)
                target = json.loads(Path(target_ready).read_text())
                info = PeerInfo(ID.from_base58(target["id"]),
                                [multiaddr.Multiaddr(a) for a in target["addrs"] + target["circuit"]])
                stream, path = await open_stream_via(host, node, info, PROTO, direct_s=1.0, dial_s=10.0)
                await stream.write(b"ping")
                await stream.read(4)
                await stream.close()
                _append_json(log, {"side": "student", "path": path})
                nursery.cancel_scope.cancel()

    trio.run(main)


def own_testbed(ready: str) -> None:
    from harness.netlab import NatTestbed

    tb = NatTestbed(orgs=2).up()  # handles SIGINT/SIGTERM itself
    sleepers = [tb.run(tb.lan_ns(0), ["sleep", "3600"]),
                tb.run(tb.public_ns("cpm"), ["sleep", "3600"], preexec_fn=None)]  # no PDEATHSIG: survives us
    _write_json(ready, {"tag": tb.tag, "namespaces": tb.namespaces(), "pids": [p.pid for p in sleepers]})
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        sys.exit(130)


def main(argv: list[str]) -> None:
    cmd, args = argv[0], argv[1:]
    if cmd == "tcp-serve":
        tcp_serve(*args)
    elif cmd == "tcp-dial":
        hold = args[args.index("--hold") + 1] if "--hold" in args else None
        timeout = float(args[args.index("--timeout") + 1]) if "--timeout" in args else 5.0
        tcp_dial(args[0], int(args[1]), timeout, hold)
    elif cmd == "tcp-push":
        tcp_push(*args)
    elif cmd == "tcp-sink":
        tcp_sink(*args)
    elif cmd == "tcp-send":
        tcp_send(args[0], int(args[1]), int(args[2]))
    elif cmd == "p2p-listen":
        p2p_listen(*args)
    elif cmd == "p2p-dial":
        p2p_dial(args[0])
    elif cmd == "p2p-relay":
        p2p_relay(*args)
    elif cmd == "p2p-peer":
        p2p_peer(args[0], args[1], args[2], args[3], args[4] if len(args) > 4 else None)
    elif cmd == "own-testbed":
        own_testbed(args[0])
    else:
        raise SystemExit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
