"""Knowledge-package throughput: our exchange framing vs a bare py-libp2p stream vs raw TCP.

All move the same bytes in one run, so the ratios are meaningful on a noisy box:

* ``raw_tcp``   — trio TCP socket on 127.0.0.1 (context: the OS ceiling);
* ``bare``      — one py-libp2p stream (Noise + yamux), 1 MiB writes, no framing;
* ``knexa_1.0`` / ``knexa_1.1`` — the exchange's own chunk stream in each wire version
  (``--wire``; ``knexad.exchange.send_knowledge`` / ``receive_knowledge``, the code a
  daemon runs): the package split into 1 MiB chunks, each an E2E box
  (``protocol.e2e``), varint-framed over the same kind of stream, then the signed
  trailer. 1.0.0: each box inside a ``KnowledgeChunk`` envelope signed by the teacher
  (SHA-256 of its body), a ``KnowledgeEnd`` with the SHA-256 of the whole; the student
  verifies every envelope, opens every box, checks size and SHA-256. 1.1.0: each box an
  unsigned ``KnowledgeBox`` record, a ``KnowledgeTrailer`` signed over the digest of the
  boxes' tags; the student opens every box and checks size and the tag digest. Only the
  request/directive step and the package codec are left out. ``knexa`` (and
  ``ratio_knexa_vs_bare``, which ``benchmarks.run_all`` checks) is the version two
  current daemons negotiate, 1.1.0, when it was measured.

Each repeat runs raw TCP, then bare and every wire version in a rotated order, so
drift and order effects hit all of them alike; ``load_avg`` is the 1-minute load
average at the start and the end of the run (the machine is shared).

Both libp2p modes write 1 MiB (plus framing) per ``stream.write`` and use the same
host configuration and py-libp2p defaults (yamux window, Noise), so the ratio is our
protocol's overhead and nothing else.

Besides wall-clock throughput (best repeat) it reports each libp2p mode's process CPU per
MiB (median repeat; both peers and the crypto threads share this process) and
``cpu_ratio_knexa_<wire>_vs_bare``: the ratio CPU alone would allow. On a shared machine
the wall ratio moves with the neighbours' load, the CPU ratio much less. ``zero_window_waits``
counts the sender's stalls on yamux's flow-control window per transfer (0: the window,
which py-libp2p auto-tunes per stream up to 16 MiB, never held it back).

Also times connection setup (dial + Noise + yamux + first stream) with our host config.
``--interference`` also times ``bare`` while two threads do a knexa transfer's crypto at
its measured chunk rate (no stream): that is the most pipelining can reach here.
The process keeps freed megabyte buffers as a daemon does (``p2p.memory``; ``--malloc
default`` leaves glibc's thresholds alone, to measure what that is worth — in a separate
run, since a process cannot go back to glibc's adaptive default).
``--inline`` also times ``knexa_<wire>_inline``: the same transfer with the per-chunk seal
and open run on the event loop instead of worker threads (``trio.to_thread.run_sync``
swapped for a direct call during that run only) — an ablation that prices the thread
hand-offs in CPU per MiB; daemons always use the threads.
Usage: ``python -m benchmarks.stream [--mib 64] [--repeats 2] [--wire 1.0,1.1]
[--yamux-frame-kib N] [--interference] [--inline] [--malloc tuned|default] [--json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import multiaddr
import trio
from libp2p.stream_muxer.yamux import yamux

from knexad.exchange import send_knowledge
from knexad.student import _Opener, receive_knowledge
from p2p.host import build_host, full_addrs, parse_peer_addr
from p2p.memory import keep_freed_buffers
from p2p.streams import FramedStream
from protocol import E2EBox, FrameDecoder, Identity, ReplayGuard, open_envelope
from protocol.boxes import seal_box_frame
from protocol.ids import CHUNK_BYTES, EXCHANGE_PROTOCOL, EXCHANGE_PROTOCOL_1_1, MAX_FRAME_EXCHANGE
from protocol.knowledge import seal_chunk_frame

LISTEN = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
PROTO = "/knexa/bench/1.0.0"
STEP_S = 30.0  # per-frame deadline, as a daemon's exchange_step_s
WIRES = {"1.0": EXCHANGE_PROTOCOL, "1.1": EXCHANGE_PROTOCOL_1_1}  # --wire name → exchange protocol
DAEMON_WIRE = "1.1"  # what two current daemons negotiate: the ``knexa`` figure
INLINE = "_inline"  # mode suffix: the ablation without worker threads (--inline)


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


async def _libp2p(payload: bytes, mode: str) -> tuple[float, float, float, int | None]:
    """Returns (transfer seconds, connect seconds, process CPU seconds during the transfer,
    the sender's zero-window waits). ``mode``: ``bare`` or ``knexa_<wire>``.

    CPU is ``time.process_time`` (both peers and the crypto threads live in this process),
    so CPU per MiB compares the modes' work without the shared machine's scheduling; the
    zero-window count says whether yamux's receive window (py-libp2p auto-tunes it per
    stream up to 16 MiB) ever held the sender back."""
    wire = None if mode == "bare" else WIRES[mode.removeprefix("knexa_").removesuffix(INLINE)]
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
            try:  # raises unless chunk order, size and SHA-256 all check out
                plain, _ = await receive_knowledge(
                    fs, student_id, teacher_id.peer_id, "bench", ReplayGuard(),
                    max_package_bytes=len(payload), step_s=STEP_S, first_wait_s=STEP_S, protocol=wire,
                )
                result["ok"] = len(plain) == len(payload)
            finally:
                done.set()

        # the student is the receiver: it listens here, the teacher dials (same cost either way)
        student.set_stream_handler(PROTO, bare_receiver if mode == "bare" else knexa_receiver)
        info = parse_peer_addr(full_addrs(student)[0])
        t0 = time.perf_counter()
        await teacher.connect(info)
        stream = await teacher.new_stream(info.peer_id, [PROTO])
        connect_s = time.perf_counter() - t0
        start, cpu_start = time.perf_counter(), time.process_time()
        if mode == "bare":
            view = memoryview(payload)
            for i in range(0, len(payload), 1 << 20):
                await stream.write(bytes(view[i : i + (1 << 20)]))
        else:
            fs = FramedStream(stream, MAX_FRAME_EXCHANGE)
            await send_knowledge(
                fs, teacher_id, student_id.peer_id, "bench", payload,
                chunk_bytes=CHUNK_BYTES, step_s=STEP_S, items=0, dropped=0, protocol=wire,
            )
        await done.wait()
        elapsed, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
        window_waits = getattr(getattr(stream, "muxed_stream", None), "_zero_window_waits", None)
        await stream.close()
    if wire is not None and not result.get("ok"):
        raise RuntimeError(f"{mode} transfer failed integrity check")
    return elapsed, connect_s, cpu_s, window_waits


def box_cpu_ms_per_mib(chunks: int = 16, blocks: int = 3) -> dict[str, float]:
    """CPU of exchange 1.1.0's per-chunk work off the event loop, one thread, 1 MiB chunks
    (median of ``blocks`` runs of ``chunks``): the teacher's ``seal_box_frame`` and the
    student's ``_Opener.open`` (parse the record, open the box, append) — the daemon's own
    functions. Set beside ``cpu_ms_per_mib`` it splits our CPU over bare into the box work
    and the rest (framing, thread hand-offs, loop)."""
    teacher, student = Identity.generate(), Identity.generate()
    box = E2EBox(teacher, student.peer_id)
    payload = memoryview(os.urandom(CHUNK_BYTES))
    seal_s, open_s = [], []
    for _ in range(blocks):
        start = time.process_time()
        frames = [seal_box_frame(box, "bench", i, payload, MAX_FRAME_EXCHANGE)[0] for i in range(chunks)]
        seal_s.append(time.process_time() - start)
        bodies = []
        for frame in frames:  # the student sees the frame's body, as FrameDecoder yields it
            decoder = FrameDecoder(MAX_FRAME_EXCHANGE)
            decoder.feed(frame)
            bodies.append(decoder.next_frame())
        opener = _Opener(student, teacher.peer_id, "bench", EXCHANGE_PROTOCOL_1_1)
        start = time.process_time()
        for i, body in enumerate(bodies):
            _, _, failure = opener.open(body, i)
            if failure is not None:
                raise RuntimeError(f"box {i} did not open: {failure}")
        open_s.append(time.process_time() - start)
    mib = CHUNK_BYTES * chunks / (1 << 20)
    return {"seal": round(1000 * statistics.median(seal_s) / mib, 2), "open": round(1000 * statistics.median(open_s) / mib, 2)}


@contextlib.contextmanager
def _inline_threads(on: bool) -> Iterator[None]:
    """While on, ``trio.to_thread.run_sync(fn, *args)`` runs ``fn`` on the loop (the
    ``--inline`` ablation); restored on exit, whatever happens."""
    if not on:
        yield
        return

    async def direct(fn: Any, *args: Any, **_: Any) -> Any:
        return fn(*args)

    real = trio.to_thread.run_sync
    trio.to_thread.run_sync = direct
    try:
        yield
    finally:
        trio.to_thread.run_sync = real


@contextlib.contextmanager
def _yamux_frame(kib: int | None) -> Iterator[int]:
    """Largest yamux DATA frame py-libp2p sends (module constant, 64 KiB by default, as
    go-yamux). Raising it is the "lift the ceiling" experiment: it applies to both libp2p
    modes alike; frames stay within the peer's receive window, as yamux requires."""
    saved = yamux.MAX_MESSAGE_SIZE
    if kib is not None:
        yamux.MAX_MESSAGE_SIZE = kib * 1024
    try:
        yield yamux.MAX_MESSAGE_SIZE
    finally:
        yamux.MAX_MESSAGE_SIZE = saved


class _CryptoLoad:
    """The 1.0.0 exchange's per-chunk work (teacher: seal + package hash; student: verify,
    open, append, package hash) in two threads at ``chunks_per_s``, without a stream.

    Run beside the bare transfer it answers "how fast can py-libp2p's event loop go
    while our crypto shares the process with it" — the ceiling for pipelining on this
    machine, since both peers and both worker threads share its cores and one GIL."""

    def __init__(self, chunks_per_s: float) -> None:
        self.period = 1.0 / chunks_per_s
        self.stop = threading.Event()
        teacher, student = Identity.generate(), Identity.generate()
        self.seal_box, self.open_box = E2EBox(teacher, student.peer_id), E2EBox(student, teacher.peer_id)
        self.teacher = teacher
        self.chunk = os.urandom(CHUNK_BYTES)
        frame = seal_chunk_frame(teacher, self.seal_box, "load", 0, self.chunk, MAX_FRAME_EXCHANGE)
        decoder = FrameDecoder(MAX_FRAME_EXCHANGE)
        decoder.feed(frame)
        self.envelope = decoder.next_frame()
        self.threads = [threading.Thread(target=self._loop, args=(fn,), daemon=True)
                        for fn in (self._teach, self._learn)]

    def _teach(self) -> None:
        seal_chunk_frame(self.teacher, self.seal_box, "load", 0, self.chunk, MAX_FRAME_EXCHANGE)
        hashlib.sha256(self.chunk).digest()

    def _learn(self) -> None:
        _, msg = open_envelope(self.envelope, expected_sender=self.teacher.peer_id)
        payload = self.open_box.open_chunk_view("load", 0, msg.box)
        bytearray().extend(payload)
        hashlib.sha256(payload).digest()

    def _loop(self, fn) -> None:
        while not self.stop.is_set():
            start = time.perf_counter()
            fn()
            self.stop.wait(max(0.0, self.period - (time.perf_counter() - start)))

    def __enter__(self) -> _CryptoLoad:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


def run(mib: int = 64, repeats: int = 2, yamux_frame_kib: int | None = None,
        interference: bool = False, wires: tuple[str, ...] = ("1.0", "1.1"), inline: bool = False,
        malloc: str = "tuned") -> dict[str, object]:
    """Time every mode ``repeats`` times, interleaved; throughput from the best repeat,
    CPU per MiB from the median one."""
    unknown = [w for w in wires if w not in WIRES]
    if unknown or not wires:
        raise ValueError(f"--wire takes a comma-separated subset of {sorted(WIRES)}, got {list(wires)}")
    if malloc not in ("tuned", "default"):
        raise ValueError(f"--malloc takes tuned or default, got {malloc!r}")
    malloc_tuned = malloc == "tuned" and keep_freed_buffers()
    payload = os.urandom(mib * 1024 * 1024)
    modes = ["bare", *(f"knexa_{w}" for w in wires), *([f"knexa_{w}{INLINE}" for w in wires] if inline else [])]
    times: dict[str, list[float]] = {"raw_tcp": [], **{m: [] for m in modes}}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    waits: dict[str, list[int | None]] = {m: [] for m in modes}
    connects: list[float] = []
    load_start = os.getloadavg()[0]
    with _yamux_frame(yamux_frame_kib) as frame_bytes:
        for r in range(repeats):  # interleave, rotating the order, so drift hits all alike
            times["raw_tcp"].append(trio.run(_raw_tcp, payload))
            for mode in modes[r % len(modes):] + modes[: r % len(modes)]:
                with _inline_threads(mode.endswith(INLINE)):
                    elapsed, connect_s, cpu_s, window_waits = trio.run(_libp2p, payload, mode)
                times[mode].append(elapsed)
                cpu[mode].append(cpu_s)
                waits[mode].append(window_waits)
                connects.append(connect_s)
        if interference:  # bare again, with the crypto of a 1.0.0 transfer beside it
            rate = len(payload) / min(min(times[f"knexa_{w}"]) for w in wires) / CHUNK_BYTES
            times["bare_beside_crypto"] = []
            for _ in range(repeats):
                with _CryptoLoad(rate):
                    times["bare_beside_crypto"].append(trio.run(_libp2p, payload, "bare")[0])
    best = {k: min(v) for k, v in times.items()}
    mbps = {k: len(payload) / v / 1e6 for k, v in best.items()}
    cpu_ms_per_mib = {m: statistics.median(v) * 1000 / mib for m, v in cpu.items()}
    box_cpu = box_cpu_ms_per_mib()
    main_wire = DAEMON_WIRE if DAEMON_WIRE in wires else wires[0]
    mbps["knexa"] = mbps[f"knexa_{main_wire}"]
    out: dict[str, object] = {
        "bytes": len(payload),
        "MB_per_s": {k: round(v, 1) for k, v in mbps.items()},
        "seconds": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "knexa_wire": main_wire,
        "ratio_knexa_vs_bare": round(mbps["knexa"] / mbps["bare"], 3),
        **{f"ratio_knexa_{w}_vs_bare": round(mbps[f"knexa_{w}"] / mbps["bare"], 3) for w in wires},
        "ratio_bare_vs_raw_tcp": round(mbps["bare"] / mbps["raw_tcp"], 4),
        # both peers' CPU (one process) per MiB, and what the ratio would be if CPU alone set it
        "cpu_ms_per_mib": {m: round(v, 2) for m, v in cpu_ms_per_mib.items()},
        **{f"cpu_ratio_knexa_{w}_vs_bare": round(cpu_ms_per_mib["bare"] / cpu_ms_per_mib[f"knexa_{w}"], 3)
           for w in wires},
        "box_cpu_ms_per_mib": box_cpu,  # 1.1.0's seal + open alone, one thread
        "malloc_tuned": malloc_tuned,
        "zero_window_waits": waits,
        "connect_ms_median": round(statistics.median(connects) * 1000, 1),
        "yamux_frame_bytes": frame_bytes,
        "load_avg": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "targets": {"ratio_knexa_vs_bare": ">= 0.8", "connect_ms_median": "<= 20"},
    }
    if "1.0" in wires and "1.1" in wires:
        out["ratio_knexa_1.1_vs_1.0"] = round(mbps["knexa_1.1"] / mbps["knexa_1.0"], 3)
    if interference:
        out["ratio_bare_beside_crypto_vs_bare"] = round(mbps["bare_beside_crypto"] / mbps["bare"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--wire", default="1.0,1.1",
                        help="exchange versions to time, comma-separated (1.0, 1.1; default both)")
    parser.add_argument("--yamux-frame-kib", type=int, default=None,
                        help="largest yamux frame for all libp2p modes (default: py-libp2p's 64)")
    parser.add_argument("--interference", action="store_true",
                        help="also time bare while the 1.0 exchange's crypto runs beside it in threads")
    parser.add_argument("--inline", action="store_true",
                        help="also time each wire with seal/open on the event loop (ablation of the worker threads)")
    parser.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                        help="tuned: keep freed MiB buffers as a daemon does (p2p.memory); default: glibc's thresholds")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from p2p.logs import configure_logging

    configure_logging("json", "warning")  # on stderr: stdout is the figures (--json must parse)
    wires = tuple(w.strip() for w in args.wire.split(",") if w.strip())
    try:
        out = run(args.mib, args.repeats, args.yamux_frame_kib, args.interference, wires, args.inline, args.malloc)
    except ValueError as exc:
        parser.error(str(exc))
    if args.json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key:24s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
