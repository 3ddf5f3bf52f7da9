"""Ingest: signed profiles verified and stored per second at a running CPM over libp2p.

    python -m benchmarks.ingest [--profiles 1000] [--clients 16] [--pipeline 16] [--json]

Why: the CPM must take a whole federation's profiles each round; this measures a real
``CpmService`` (libp2p, the engine, SQLite or PostgreSQL) against its own ceilings in
the same run — the bare py-libp2p transport (``echo`` modes) and signature verification
alone — and then checks on the reopened database that every acked profile is stored.
The modes, ``--registered``, ``--store``, what is measured and what is verified:
docs/performance.md §How the ingest benchmark measures; the figures: same page.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TARGET_PER_S = 5000.0
# mode: (server, group commit, new stream per request, pipelined)
MODES: dict[str, tuple[str, bool, bool, bool]] = {
    "group": ("cpm", True, False, False),
    "per_message": ("cpm", False, False, False),
    "group_new_stream": ("cpm", True, True, False),
    "echo": ("echo", False, False, False),
    "group_pipelined": ("cpm", True, False, True),
    "echo_pipelined": ("echo", False, False, True),
}
ECHO_PROTOCOL = "/knexa-bench/echo/1.0.0"


def client_seed(i: int) -> bytes:
    return hashlib.sha256(f"knexa/ingest/{i}".encode()).digest()


def _vector(client: int, seq: int) -> tuple[float, ...]:
    return (float(client), float(seq), *([0.25] * 30))


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _sys_s() -> float:
    """Kernel CPU (syscalls: socket I/O, fsync) of this process."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


# ------------------------------------------------------------------------ driver (clients)


async def _client(i: int, cpm_addr: str, transfer_hash: str, state: dict[str, Any], new_stream: bool,
                  echo: bool, pipeline: int) -> None:
    import multiaddr
    import trio

    from p2p.host import build_host, parse_peer_addr
    from p2p.streams import FramedStream
    from protocol.envelope import NONCE_BYTES, Identity, open_envelope, seal
    from protocol.framing import encode_frame
    from protocol.ids import CPM_PROTOCOL, MAX_FRAME_CPM
    from protocol.messages import Ack, Error, NoDirective, Profile, Register, Registered

    ident = Identity(client_seed(i))
    info = parse_peer_addr(cpm_addr)
    cpm_peer = info.peer_id.to_base58()
    host = build_host(ident.seed, dial_timeout_s=30)
    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        await host.connect(info)
        framed: FramedStream | None = None

        async def rpc(messages: list[Any], allowed: tuple[type, ...]) -> list[Any]:
            """Send the messages in one write (pipelined), then read and check every answer."""
            nonlocal framed
            if framed is None:
                proto = ECHO_PROTOCOL if echo else CPM_PROTOCOL
                framed = FramedStream(await host.new_stream(info.peer_id, [proto]), MAX_FRAME_CPM)
            nonces = [os.urandom(NONCE_BYTES) for _ in messages]
            await framed.stream.write(b"".join(encode_frame(seal(m, ident, nonce=n), MAX_FRAME_CPM)
                                               for m, n in zip(messages, nonces)))
            replies = []
            for nonce in nonces:
                raw = await framed.read_frame()
                if raw is None:
                    raise RuntimeError("CPM closed the stream without answering")
                if echo:  # the bare transport: any answer will do
                    replies.append(Ack(ref=nonce))
                    continue
                _env, reply = open_envelope(raw, expected_sender=cpm_peer, allowed=(*allowed, Error))
                if isinstance(reply, Error):
                    raise RuntimeError(f"CPM error {reply.code}: {reply.message}")
                if isinstance(reply, Ack) and reply.ref != nonce:
                    raise RuntimeError("Ack refers to another request")
                replies.append(reply)
            if new_stream:
                await framed.close()
                framed = None
            return replies

        with trio.fail_after(60):
            (reg,) = await rpc([Register("bench", "qwen2", ("/ip4/127.0.0.1/tcp/1",), "ingest")], (Registered,))
        assert echo or reg.transfer_hash == transfer_hash
        round_ = 1 if echo else reg.round
        state["ready"] += 1
        if state["ready"] == state["clients"]:
            state["all_ready"].set()
        await state["go"].wait()
        seq = 0
        while state["sent"] < state["target"]:
            n = min(pipeline, state["target"] - state["sent"])
            state["sent"] += n
            msgs = [Profile(round_, _vector(i, seq + k + 1), transfer_hash) for k in range(n)]
            with trio.fail_after(60):
                replies = await rpc(msgs, (Ack, NoDirective))
            if not all(isinstance(r, Ack) for r in replies):
                raise RuntimeError(f"profile not accepted: {replies}")
            seq += n
            state["acked"] += n
            state["last_acked"][i] = seq
        state["t_end"] = max(state["t_end"], time.time())
        if framed is not None:
            await framed.close()


async def _drive(args: argparse.Namespace) -> dict[str, Any]:
    """The clients. ``--cpm`` may list several addresses, comma-separated (replicas of
    one CPM, ``benchmarks.ha_ingest``): client ``i`` talks to ``addrs[i % len(addrs)]``."""
    import trio

    addrs = args.cpm.split(",")
    state: dict[str, Any] = {"clients": args.clients, "target": args.profiles, "ready": 0, "sent": 0,
                             "acked": 0, "last_acked": {}, "t_end": 0.0,
                             "all_ready": trio.Event(), "go": trio.Event()}
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with trio.open_nursery() as nursery:
        for i in range(args.clients):
            nursery.start_soon(_client, i, addrs[i % len(addrs)], args.transfer_hash, state, args.new_stream, args.echo,
                               args.pipeline)
        await state["all_ready"].wait()
        print("ready", flush=True)
        await stdin.receive_some(16)  # the CPM side snapshots its CPU time, then says go
        cpu0, state["t_start"] = _cpu_s(), time.time()
        state["go"].set()
    await stdin.aclose()
    return {"acked": state["acked"], "t_start": state["t_start"], "t_end": state["t_end"],
            "client_cpu_s": _cpu_s() - cpu0, "last_acked": {str(k): v for k, v in state["last_acked"].items()}}


def driver_main(args: argparse.Namespace) -> int:
    import logging

    import structlog
    import trio

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    logging.getLogger("libp2p").addHandler(logging.NullHandler())
    logging.getLogger("libp2p").propagate = False
    result = trio.run(_drive, args)
    print(json.dumps(result), flush=True)
    return 0


# ------------------------------------------------------------------------------ CPM side


class _Echo:
    """The bare transport: a py-libp2p host answering every request frame with one
    stored, CPM-signed Ack — no verification, engine or database."""

    def __init__(self) -> None:
        from protocol.envelope import Identity, seal
        from protocol.messages import Ack

        self.identity = Identity.generate()
        self.answer = seal(Ack(ref=b"\0" * 16), self.identity)
        self.served = 0

    async def run(self, *, task_status: Any) -> None:
        import multiaddr
        import trio

        from p2p.host import build_host, full_addrs
        from p2p.streams import FramedStream
        from protocol.ids import MAX_FRAME_CPM

        async def handle(stream: Any) -> None:
            framed = FramedStream(stream, MAX_FRAME_CPM)
            while await framed.read_frame() is not None:
                await framed.write_frame(self.answer)
                self.served += 1
            await framed.close()

        host = build_host(self.identity.seed, max_inbound=1024)
        async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            host.set_stream_handler(ECHO_PROTOCOL, handle)
            task_status.started(full_addrs(host))
            await trio.sleep_forever()


async def _drive_against(server: Any, mode: str, profiles: int, clients: int, pipeline: int,
                         transfer_hash: str, db_cpu: Any = None) -> tuple[dict[str, Any], float]:
    """Start the driver subprocess against ``server``; returns its result and the CPU
    seconds this process spent between "go" and the driver's exit (``db_cpu()``: the
    database server's CPU seconds so far, sampled at the same two points)."""
    import trio

    cmd = [sys.executable, "-m", "benchmarks.ingest", "--driver", "--profiles", str(profiles),
           "--clients", str(clients), "--pipeline", str(pipeline), "--transfer-hash", transfer_hash]
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(server.run)
        cmd += ["--cpm", addrs[0]] + (["--new-stream"] if MODES[mode][2] else [])
        cmd += ["--echo"] if MODES[mode][0] == "echo" else []
        proc = await trio.lowlevel.open_process(cmd, stdin=-1, stdout=-1, cwd=str(Path(__file__).parents[1]))
        buf = b""
        with trio.fail_after(120):
            while b"ready\n" not in buf:
                chunk = await proc.stdout.receive_some(65536)
                if not chunk:
                    raise RuntimeError(f"driver exited before it was ready (rc {await proc.wait()})")
                buf += chunk
        cpu0, sys0, db0 = _cpu_s(), _sys_s(), db_cpu() if db_cpu else 0.0
        await proc.stdin.send_all(b"go\n")
        buf = buf.split(b"ready\n", 1)[1]
        with trio.fail_after(600):
            while chunk := await proc.stdout.receive_some(65536):
                buf += chunk
            rc = await proc.wait()
        cpu, sys_cpu = _cpu_s() - cpu0, _sys_s() - sys0
        db_used = db_cpu() - db0 if db_cpu else 0.0
        nursery.cancel_scope.cancel()
    if rc != 0:
        raise RuntimeError(f"driver failed (rc {rc})")
    res = json.loads(buf.decode().strip().splitlines()[-1])
    res["cpm_sys_s"] = sys_cpu
    if db_cpu:
        res["db_cpu_s"] = db_used
    return res, cpu


def add_background_agents(store: Any, n: int, now: int) -> None:
    """``n`` admitted, registered, active agents with a profile in round 1, written in
    one transaction through the store (no engine, no network: setup, not measured)."""
    vector = [0.25] * 32
    with store.transaction():
        for i in range(n):
            peer = f"background-{i:06d}"
            store.admit(peer, "background", now)
            store.register(peer, org="background", family="", listen_addrs=(), agent_version="", now_ms=now)
            store.put_profile(peer, 1, vector, "background", now)


async def _run_mode(mode: str, profiles: int, clients: int, pipeline: int, location: str,
                    window_s: float, registered: int = 0, db_cpu: Any = None) -> dict[str, Any]:
    from cpm.config import CpmConfig
    from cpm.service import CpmService
    from cpm.store import open_store
    from protocol.envelope import Identity, now_ms

    cfg = CpmConfig(strategy="random", min_agents=clients + registered + 1, round_timer_s=86_400.0,
                    request_timeout_s=60.0,
                    active_window_s=86_400.0,  # the round never matches: every profile is ingest
                    rate_limit_per_s=0.0)  # a few clients stand in for many agents: no per-peer cap
    kind, group_commit, _new_stream, pipelined = MODES[mode]
    pipeline = pipeline if pipelined else 1
    out: dict[str, Any] = {"mode": mode, "in_flight": pipeline}
    if kind == "echo":
        echo = _Echo()
        res, cpu = await _drive_against(echo, mode, profiles, clients, pipeline, cfg.transfer_hash)
        out["verified"] = echo.served == res["acked"] + clients  # + one "Register" each
    else:
        store = open_store(location)
        for i in range(clients):
            store.admit(Identity(client_seed(i)).peer_id, "bench", 1)
        add_background_agents(store, registered, now_ms())
        service = CpmService(cfg, Identity.generate(), store, group_commit=group_commit,
                             commit_window_s=window_s)
        try:
            res, cpu = await _drive_against(service, mode, profiles, clients, pipeline, cfg.transfer_hash, db_cpu)
        finally:
            store.close()
        # verify on the database reopened from disk: every client's last acked profile is stored
        check = open_store(location)
        stored = {row["peer_id"]: row["vector"] for row in check.list_profiles(1)
                  if not row["peer_id"].startswith("background-")}
        check.close()
        lost = sum(1 for k, seq in res["last_acked"].items()
                   if stored.get(Identity(client_seed(int(k))).peer_id, [0, -1])[1:2] != [float(seq)])
        counted = service.engine.counters["profiles"]
        out.update(engine_counted=counted, stored_rows=len(stored), last_ack_missing=lost,
                   verified=counted == res["acked"] and len(stored) == clients and lost == 0)
        if service.committer is not None:
            stats = service.committer.stats
            out.update(batches=stats["batches"], mean_batch=round(stats["messages"] / max(stats["batches"], 1), 1))
    wall = res["t_end"] - res["t_start"]
    acked = max(res["acked"], 1)
    out.update(acked=res["acked"], wall_s=round(wall, 3),
               profiles_per_s=round(res["acked"] / wall, 1) if wall > 0 else 0.0,
               cpm_cpu_us_per_profile=round(cpu / acked * 1e6, 1),
               cpm_kernel_cpu_us_per_profile=round(res["cpm_sys_s"] / acked * 1e6, 1),
               cpm_cpu_bound_per_s=round(acked / cpu, 1) if cpu > 0 else 0.0,
               client_cpu_us_per_profile=round(res["client_cpu_s"] / acked * 1e6, 1))
    if "db_cpu_s" in res:  # the database server's processes (PostgreSQL), beside the CPM's own
        out.update(db_cpu_us_per_profile=round(res["db_cpu_s"] / acked * 1e6, 1),
                   total_cpu_us_per_profile=round((cpu + res["db_cpu_s"]) / acked * 1e6, 1))
    return out


def verify_ceiling(n: int = 3000) -> dict[str, Any]:
    """``open_envelope`` (strict decode + Ed25519 verify) alone, one thread."""
    from cpm.config import default_transfer_hash
    from protocol.envelope import Identity, open_envelope, seal
    from protocol.messages import Profile

    ident = Identity(client_seed(0))
    frames = [seal(Profile(1, _vector(0, s), default_transfer_hash()), ident) for s in range(n)]
    t0 = time.perf_counter()
    for f in frames:
        open_envelope(f, expected_sender=ident.peer_id, allowed=(Profile,))
    dt = time.perf_counter() - t0
    return {"ops": n, "ops_per_s": round(n / dt, 1), "us_per_op": round(dt / n * 1e6, 1)}


def commit_ms(n: int = 40, location: str | None = None) -> float:
    """One standalone write transaction (SQLite ``synchronous=FULL``: an fsync of the
    WAL; PostgreSQL ``synchronous_commit=on``: a WAL flush) at ``location`` (default: a
    temp SQLite file)."""
    from cpm.store import open_store

    with tempfile.TemporaryDirectory(prefix="knexa-commit-") as tmp:
        store = open_store(location or Path(tmp) / "cpm.db")
        store.admit("peer", "", 0)
        t0 = time.perf_counter()
        for i in range(n):
            store.touch("peer", i)
        dt = time.perf_counter() - t0
        store.close()
    return round(dt / n * 1000, 2)


class _Stores:
    """Fresh, empty store locations of one ``--store`` kind, one per mode; ``db_cpu``
    reads the database server's CPU seconds where it runs here (a throwaway server)."""

    def __init__(self, spec: str, tmp: Path) -> None:
        self.spec, self.tmp, self.n = spec, tmp, 0
        self.server: Any = None
        self.label = "sqlite" if spec == "sqlite" else "postgresql"
        if spec == "postgresql":
            from benchmarks.pgserver import PgServer

            self.server = PgServer().start()
        elif spec != "sqlite" and not spec.startswith(("postgresql://", "postgres://")):
            raise ValueError(f"--store {spec!r}: sqlite, postgresql or a postgresql:// URL")
        self.db_cpu = self.server.cpu_s if self.server is not None else None

    def new(self, name: str) -> str:
        self.n += 1
        if self.spec == "sqlite":
            home = self.tmp / f"{name}-{self.n}"
            home.mkdir()
            return f"sqlite:{home / 'cpm.db'}"
        if self.server is not None:
            return self.server.create_database("ingest")
        sep = "&" if "?" in self.spec else "?"  # a fresh schema per mode in the operator's database
        return f"{self.spec}{sep}options=-csearch_path%3Dknexa_ingest_{os.getpid()}_{self.n}"

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


def run(profiles: int = 1000, clients: int = 16, modes: tuple[str, ...] = tuple(MODES),
        window_s: float = 0.002, pipeline: int = 16, registered: int = 0,
        stores: tuple[str, ...] = ("sqlite",)) -> dict[str, Any]:
    import trio

    from p2p.logs import configure_logging

    out: dict[str, Any] = {"profiles": profiles, "clients": clients, "pipeline": pipeline, "registered": registered,
                           "target_per_s": TARGET_PER_S, "commit_window_ms": window_s * 1000, "stores": list(stores),
                           "load_avg": os.getloadavg(), "verify": verify_ceiling(), "commit_ms": commit_ms(),
                           "results": []}
    with tempfile.TemporaryDirectory(prefix="knexa-ingest-") as tmp:
        with open(Path(tmp) / "cpm.log", "w") as logfile:
            configure_logging("json", "info", stream=logfile)  # the node's INFO lines cost CPU too
            for spec in stores:
                kind = _Stores(spec, Path(tmp))
                try:
                    for mode in modes:
                        if MODES[mode][0] == "echo" and spec != stores[0]:
                            continue  # no store involved: once is enough
                        key = mode if kind.label == "sqlite" else f"{mode}@{kind.label}"
                        location = kind.new(mode)
                        # commit latency drifts on shared disks: sample it per mode (echo: the SQLite one)
                        disk = commit_ms(20, location if MODES[mode][0] == "cpm" else None)
                        out[key] = trio.run(_run_mode, mode, profiles, clients, pipeline, location, window_s,
                                            registered, kind.db_cpu)
                        out[key]["commit_ms_before"] = disk
                        out[key]["store"] = kind.label
                        out["results"].append(key)
                finally:
                    kind.close()
    rate = {m: out[m]["profiles_per_s"] for m in modes if m in out}
    if rate.get("group") and rate.get("per_message"):
        out["ratio_group_vs_per_message"] = round(rate["group"] / rate["per_message"], 2)
    best = max((m for m in ("group", "group_pipelined") if m in rate), key=lambda m: rate[m], default=None)
    if best is not None:
        out["best_mode"] = best
        out["ratio_vs_target"] = round(rate[best] / TARGET_PER_S, 3)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profiles", type=int, default=1000, help="profiles per mode (all clients together)")
    ap.add_argument("--clients", type=int, default=16, help="agents, each with its own host and identity")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    ap.add_argument("--pipeline", type=int, default=16, help="requests in flight per agent in the *_pipelined modes")
    ap.add_argument("--window-ms", type=float, default=2.0, help="group-commit window")
    ap.add_argument("--registered", type=int, default=0,
                    help="extra admitted agents with a profile in the open round (they send nothing)")
    ap.add_argument("--store", action="append", default=None, metavar="STORE",
                    help="sqlite (default), postgresql (a throwaway server) or a postgresql:// URL; repeatable")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cpm", help=argparse.SUPPRESS)
    ap.add_argument("--transfer-hash", help=argparse.SUPPRESS)
    ap.add_argument("--new-stream", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--echo", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.driver:
        return driver_main(args)
    modes = tuple(m for m in args.modes.split(",") if m)
    if (any(m not in MODES for m in modes) or args.pipeline < 1 or args.clients < 1 or args.profiles < 1
            or args.registered < 0):
        ap.error(f"--modes must be a subset of {','.join(MODES)}; counts must be ≥ 1")
    stores = tuple(args.store or ("sqlite",))
    res = run(args.profiles, args.clients, modes, args.window_ms / 1000, args.pipeline, args.registered, stores)
    keys = [k for k in res["results"]]
    ok = all(res[k]["verified"] for k in keys)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0 if ok else 1
    print(f"ingest: {args.clients} agents (+{args.registered} registered, silent), {args.profiles} profiles per mode, "
          f"stores {', '.join(stores)}, load avg {res['load_avg'][0]:.2f}")
    print(f"{'mode':28} {'in flight':>9} {'profiles/s':>11} {'CPM CPU µs/profile':>19} {'DB CPU µs/profile':>18} "
          f"{'CPM-CPU bound/s':>16} {'mean batch':>11} {'commit ms':>10}  verified")
    for k in keys:
        r = res[k]
        print(f"{k:28} {r['in_flight']:>9} {r['profiles_per_s']:>11} {r['cpm_cpu_us_per_profile']:>19} "
              f"{r.get('db_cpu_us_per_profile', '—'):>18} {r['cpm_cpu_bound_per_s']:>16} "
              f"{r.get('mean_batch', '—'):>11} {r['commit_ms_before']:>10}  {r['verified']}")
    v = res["verify"]
    print(f"verify only: {v['ops_per_s']}/s (open_envelope, one thread, {v['us_per_op']} µs); "
          f"one standalone COMMIT: {res['commit_ms']} ms")
    print(f"target ≥ {TARGET_PER_S:.0f} profiles/s: {res.get('best_mode', '—')}/target "
          f"{res.get('ratio_vs_target', '—')}; group/per_message {res.get('ratio_group_vs_per_message', '—')}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
