"""Knowledge-package throughput: our exchange framing vs a bare py-libp2p stream vs raw TCP.

All three move the same bytes in one run, so the ratios are meaningful on a noisy box:

* ``raw_tcp``   — trio TCP socket on 127.0.0.1 (context: the OS ceiling);
* ``bare``      — one py-libp2p stream (Noise + yamux), 1 MiB writes, no framing;
* ``knexa``     — what the teacher sends: the package split into 1 MiB chunks, each an
  E2E box (``protocol.e2e``) inside a ``KnowledgeChunk`` envelope signed by the teacher,
  varint-framed over the same kind of stream, then a ``KnowledgeEnd``; the student
  verifies every envelope, opens every box and checks the SHA-256 of the whole.

Also times connection setup (dial + Noise + yamux + first stream) with our host config.
Usage: ``python -m benchmarks.stream [--mib 64] [--json]``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import statistics
import sys
import time

import multiaddr
import trio

from p2p.host import build_host, full_addrs, parse_peer_addr
from p2p.streams import FramedStream
from protocol import E2EBox, Identity, KnowledgeChunk, KnowledgeEnd, open_envelope, seal
from protocol.ids import CHUNK_BYTES, MAX_FRAME_EXCHANGE

LISTEN = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
PROTO = "/knexa/bench/1.0.0"


async def _raw_tcp(payload: bytes) -> float:
    done = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        got = 0
        while got < len(payload):
            data = await stream.receive_some(1 << 20)
            if not data:
                break
            got += len(data)
        done.set()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        start = time.perf_counter()
        view = memoryview(payload)
        for i in range(0, len(payload), 1 << 20):
            await client.send_all(view[i : i + (1 << 20)])
        await done.wait()
        elapsed = time.perf_counter() - start
        await client.aclose()
        nursery.cancel_scope.cancel()
    return elapsed


async def _libp2p(payload: bytes, mode: str) -> tuple[float, float]:
    """Returns (transfer seconds, connect seconds)."""
    teacher_id, student_id = Identity.generate(), Identity.generate()
    teacher, student = build_host(teacher_id.seed), build_host(student_id.seed)
    done = trio.Event()
    result: dict[str, object] = {}
    async with teacher.run(LISTEN), student.run(LISTEN):

        async def bare_receiver(stream) -> None:
            got = 0
            while got < len(payload):
                data = await stream.read(1 << 20)
                if not data:
                    break
                got += len(data)
            result["got"] = got
            done.set()

        async def knexa_receiver(stream) -> None:
            fs = FramedStream(stream, MAX_FRAME_EXCHANGE)
            box = E2EBox(student_id, teacher_id.peer_id)

            def open_frame(frame: bytes):
                _, msg = open_envelope(frame, expected_sender=teacher_id.peer_id, allowed=(KnowledgeChunk, KnowledgeEnd))
                if isinstance(msg, KnowledgeEnd):
                    return msg
                return box.open_chunk(msg.directive_id, msg.index, msg.box)

            parts = []
            while True:
                frame = await fs.read_frame()
                # verify/decrypt off the event loop (libsodium and hashlib release the GIL)
                item = await trio.to_thread.run_sync(open_frame, frame)
                if isinstance(item, KnowledgeEnd):
                    end = item
                    break
                parts.append(item)
            blob = b"".join(parts)
            result["ok"] = hashlib.sha256(blob).digest() == end.sha256 and len(blob) == end.total_bytes
            done.set()

        # the student is the receiver: it listens here, the teacher dials (same cost either way)
        student.set_stream_handler(PROTO, bare_receiver if mode == "bare" else knexa_receiver)
        info = parse_peer_addr(full_addrs(student)[0])
        t0 = time.perf_counter()
        await teacher.connect(info)
        stream = await teacher.new_stream(info.peer_id, [PROTO])
        connect_s = time.perf_counter() - t0
        start = time.perf_counter()
        if mode == "bare":
            view = memoryview(payload)
            for i in range(0, len(payload), 1 << 20):
                await stream.write(bytes(view[i : i + (1 << 20)]))
        else:
            fs = FramedStream(stream, MAX_FRAME_EXCHANGE)
            box = E2EBox(teacher_id, student_id.peer_id)
            n = 0
            for n, i in enumerate(range(0, len(payload), CHUNK_BYTES)):
                sealed = box.seal_chunk("bench", n, payload[i : i + CHUNK_BYTES])
                await fs.write_frame(seal(KnowledgeChunk("bench", n, sealed), teacher_id))
            end = KnowledgeEnd("bench", n + 1, len(payload), hashlib.sha256(payload).digest(), 0, 0)
            await fs.write_frame(seal(end, teacher_id))
        await done.wait()
        elapsed = time.perf_counter() - start
        await stream.close()
    if mode == "knexa" and not result.get("ok"):
        raise RuntimeError("knexa transfer failed integrity check")
    return elapsed, connect_s


def run(mib: int = 64, repeats: int = 2) -> dict[str, object]:
    payload = os.urandom(mib * 1024 * 1024)
    times: dict[str, list[float]] = {"raw_tcp": [], "bare": [], "knexa": []}
    connects: list[float] = []
    for _ in range(repeats):  # interleave so drift hits all three alike
        times["raw_tcp"].append(trio.run(_raw_tcp, payload))
        for mode in ("bare", "knexa"):
            elapsed, connect_s = trio.run(_libp2p, payload, mode)
            times[mode].append(elapsed)
            connects.append(connect_s)
    best = {k: min(v) for k, v in times.items()}
    mbps = {k: len(payload) / v / 1e6 for k, v in best.items()}
    return {
        "bytes": len(payload),
        "MB_per_s": {k: round(v, 1) for k, v in mbps.items()},
        "ratio_knexa_vs_bare": round(mbps["knexa"] / mbps["bare"], 3),
        "ratio_bare_vs_raw_tcp": round(mbps["bare"] / mbps["raw_tcp"], 4),
        "connect_ms_median": round(statistics.median(connects) * 1000, 1),
        "targets": {"ratio_knexa_vs_bare": ">= 0.8", "connect_ms_median": "<= 20"},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    out = run(args.mib, args.repeats)
    if args.json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key:24s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
