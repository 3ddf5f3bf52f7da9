"""One knowledge package over a direct connection and over the circuit relay, inside the
NAT testbed (harness.netlab), same run: the relayed / direct throughput ratio.

Why: behind NATs most exchanges go through the CPM's relay (docs/networking.md), and the
relay's cost is the question — how much slower one package travels relayed than direct,
on the same machine, same code, same moment (the box is shared and loaded: only a ratio
measured side by side means anything; absolute MB/s move with the load).

Layout (three processes, each in its own namespace; docs/performance.md §NAT relay):

* ``relay``   — public host ``relay``: a libp2p host serving circuit relay v2
  (``p2p.relay.serve_relay``, the CPM's relay code, circuit limit raised to fit);
* ``teacher`` — public host ``teacher``: keeps a reservation on the relay
  (``RelayNode``) and answers every stream with the package through the exchange's own
  chunk stream (``knexad.exchange.send_knowledge``: E2E boxes in signed envelopes);
* ``student`` — org-00's LAN host, behind its NAT: for each repeat it dials the teacher
  **direct** (its public address, through the student's NAT) and **relayed** (only the
  ``/p2p-circuit`` address: student → relay → teacher), both with ``open_stream_via`` as a
  daemon does, receives with ``knexad.student.receive_knowledge`` (every envelope
  verified, every box opened, size and SHA-256 checked) and closes the connection, so
  the next transfer dials afresh. Direct and relayed alternate, so drift hits both.

Usage: ``python -m benchmarks.nat_stream [--mib 64] [--repeats 2] [--uplink-mbit N] [--json]``
(root: namespaces). Prints MB/s per path, the ratio relay/direct, and the paths taken.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

PROTO = "/knexa/bench-nat/1.0.0"
STEP_S = 120.0  # per-frame deadline: a relayed 1 MiB chunk on a loaded box
PACKAGE_SEED = 17


def _payload(mib: int) -> bytes:
    return random.Random(PACKAGE_SEED).randbytes(mib * 1024 * 1024)


def _write_ready(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)


async def _wait_file(path: Path, timeout_s: float = 120.0) -> dict[str, Any]:
    with trio.fail_after(timeout_s):
        while not path.exists():
            await trio.sleep(0.1)
    return json.loads(path.read_text())


# -- roles (each runs inside its namespace) ------------------------------------------------


async def relay_role(listen: str, ready: Path, mib: int) -> None:
    import multiaddr

    from p2p.host import build_host, full_addrs
    from p2p.relay import RelayServiceLimits, serve_relay

    host = build_host(os.urandom(32))
    limits = RelayServiceLimits(circuit_bytes=(4 * mib + 64) << 20, circuit_duration_s=3600)
    async with host.run([multiaddr.Multiaddr(listen)]), trio.open_nursery() as nursery:
        await nursery.start(serve_relay, host, limits)
        _write_ready(ready, {"addrs": full_addrs(host)})
        await trio.sleep_forever()


async def teacher_role(listen: str, ready: Path, relay_ready: Path, mib: int) -> None:
    import multiaddr

    from knexad.exchange import send_knowledge
    from p2p.host import build_host, parse_peer_addr
    from p2p.relay import RelayNode
    from p2p.streams import FramedStream
    from protocol import Identity
    from protocol.ids import CHUNK_BYTES, MAX_FRAME_EXCHANGE

    identity = Identity.generate()
    payload = _payload(mib)
    host = build_host(identity.seed)
    relay_info = parse_peer_addr((await _wait_file(relay_ready))["addrs"][0])

    async def serve(stream: Any) -> None:
        student = stream.muxed_conn.peer_id.to_base58()
        await send_knowledge(FramedStream(stream, MAX_FRAME_EXCHANGE), identity, student, "bench", payload,
                             chunk_bytes=CHUNK_BYTES, step_s=STEP_S, items=0, dropped=0)
        await stream.close()

    async with host.run([multiaddr.Multiaddr(listen)]), trio.open_nursery() as nursery:
        keeper = RelayNode(host, relay_info, holepunch=False)
        await nursery.start(keeper.run)
        host.set_stream_handler(PROTO, serve)
        _write_ready(ready, {"peer": identity.peer_id, "addrs": [str(a) for a in host.get_addrs()],
                             "circuit": keeper.circuit_addrs()})
        await trio.sleep_forever()


async def student_role(listen: str, teacher_ready: Path, mib: int, repeats: int, out: Path) -> None:
    import multiaddr
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import PeerInfo

    from knexad.student import receive_knowledge
    from p2p.host import build_host
    from p2p.relay import RelayNode, open_stream_via
    from p2p.streams import FramedStream
    from protocol import Identity, ReplayGuard
    from protocol.ids import MAX_FRAME_EXCHANGE

    identity = Identity.generate()
    host = build_host(identity.seed)
    t = await _wait_file(teacher_ready)
    teacher = ID.from_base58(t["peer"])
    addrs = {"direct": [multiaddr.Multiaddr(a) for a in t["addrs"]],
             "relay": [multiaddr.Multiaddr(a) for a in t["circuit"]]}
    runs: list[dict[str, Any]] = []
    async with host.run([multiaddr.Multiaddr(listen)]), trio.open_nursery() as nursery:
        client = RelayNode(host, None, holepunch=False)
        await nursery.start(client.run)
        for rep in range(repeats):
            for mode in ("direct", "relay"):
                t0 = time.perf_counter()
                stream, path = await open_stream_via(host, client, PeerInfo(teacher, addrs[mode]), PROTO,
                                                     direct_s=10.0, dial_s=30.0)
                t1 = time.perf_counter()
                plain, _ = await receive_knowledge(FramedStream(stream, MAX_FRAME_EXCHANGE), identity, t["peer"],
                                                   "bench", ReplayGuard(), max_package_bytes=mib << 20,
                                                   step_s=STEP_S, first_wait_s=STEP_S)
                t2 = time.perf_counter()
                if len(plain) != mib << 20:
                    raise RuntimeError(f"{mode}: got {len(plain)} bytes")
                runs.append({"repeat": rep, "mode": mode, "path": path, "connect_s": t1 - t0,
                             "transfer_s": t2 - t1})
                with trio.move_on_after(5):
                    await host.disconnect(teacher)  # the next transfer dials afresh
        _write_ready(out, {"runs": runs})
        nursery.cancel_scope.cancel()


# -- orchestration (outside, root) ---------------------------------------------------------


def summarize(runs: list[dict[str, Any]], nbytes: int) -> dict[str, Any]:
    """Best transfer per mode → MB/s and the relay/direct ratio (pure; unit-tested)."""
    best = {m: min(r["transfer_s"] for r in runs if r["mode"] == m) for m in ("direct", "relay")}
    mbps = {m: nbytes / s / 1e6 for m, s in best.items()}
    return {
        "bytes": nbytes,
        "MB_per_s": {m: round(v, 2) for m, v in mbps.items()},
        "ratio_relay_vs_direct": round(mbps["relay"] / mbps["direct"], 3),
        "paths": sorted({(r["mode"], r["path"]) for r in runs}),
        "connect_s_median": {m: round(sorted(r["connect_s"] for r in runs if r["mode"] == m)[
            len([r for r in runs if r["mode"] == m]) // 2], 3) for m in ("direct", "relay")},
        "runs": runs,
    }


def run(mib: int = 64, repeats: int = 2, uplink_mbit: float | None = None, workdir: Path | None = None) -> dict[str, Any]:
    import tempfile

    from harness.netlab import NatTestbed, ns_argv

    work = Path(workdir or tempfile.mkdtemp(prefix="knexa-natstream-"))
    work.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, "-m", "benchmarks.nat_stream"]
    procs: list[subprocess.Popen[Any]] = []
    with NatTestbed(["org-00"], public_hosts=("relay", "teacher")) as tb:
        if uplink_mbit:
            tb.cap_uplink(0, uplink_mbit)
        specs = [
            (tb.public_ns("relay"), ["relay", "--listen", f"/ip4/{tb.public_addr('relay')}/tcp/0",
                                     "--ready", str(work / "relay.json")]),
            (tb.public_ns("teacher"), ["teacher", "--listen", f"/ip4/{tb.public_addr('teacher')}/tcp/0",
                                       "--ready", str(work / "teacher.json"), "--relay-ready", str(work / "relay.json")]),
            (tb.lan_ns(0), ["student", "--listen", f"/ip4/{tb.lan_addr(0)}/tcp/0", "--teacher-ready",
                            str(work / "teacher.json"), "--repeats", str(repeats), "--out", str(work / "student.json")]),
        ]
        try:
            for ns, args in specs:
                log = open(work / f"{args[0]}.log", "w")  # noqa: SIM115 — closed with the process
                procs.append(subprocess.Popen(ns_argv(ns, [*me, *args, "--mib", str(mib)]), stdout=log,
                                              stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1]))
            student = procs[-1]
            code = student.wait(timeout=3600)
            if code != 0:
                raise RuntimeError(f"student exited {code}: {(work / 'student.log').read_text()[-2000:]}")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
    runs = json.loads((work / "student.json").read_text())["runs"]
    out = summarize(runs, mib << 20)
    out["uplink_mbit"] = uplink_mbit
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="role")
    for role in ("relay", "teacher", "student"):
        p = sub.add_parser(role)
        p.add_argument("--listen", required=True)
        p.add_argument("--mib", type=int, default=64)
        if role in ("relay", "teacher"):
            p.add_argument("--ready", type=Path, required=True)
        if role == "teacher":
            p.add_argument("--relay-ready", type=Path, required=True)
        if role == "student":
            p.add_argument("--teacher-ready", type=Path, required=True)
            p.add_argument("--repeats", type=int, default=2)
            p.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--uplink-mbit", type=float, default=None, help="cap org-00's (the student's) upload")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.role == "relay":
        trio.run(relay_role, args.listen, args.ready, args.mib)
    elif args.role == "teacher":
        trio.run(teacher_role, args.listen, args.ready, args.relay_ready, args.mib)
    elif args.role == "student":
        trio.run(student_role, args.listen, args.teacher_ready, args.mib, args.repeats, args.out)
    else:
        out = run(args.mib, args.repeats, args.uplink_mbit, args.workdir)
        if args.json:
            print(json.dumps(out))
        else:
            for key, value in out.items():
                if key != "runs":
                    print(f"{key:24s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
