"""Load test: one real CPM process, hundreds of agents speaking /knexa/cpm/1.0.0.

    python -m benchmarks.load --agents 500 --rounds 50 --json
    python -m benchmarks.load --agents 40 --rounds 5 --drivers 2

What runs: ``knexa-cpm serve`` as a subprocess (open admission, tuned settings below),
and ``--drivers`` driver processes, each running its share of the agents in one trio
loop. Every agent has **its own Ed25519 identity, its own py-libp2p host and its own
Noise+yamux connection** to the CPM, and speaks the real protocol through the daemon's
own client (``knexad.cpm_client.CpmRpc``: sealed envelopes, verified CPM replies, Ack
nonce check). Per round an agent sends Profile (its ``SyntheticAgent``'s 32-d profile),
long-polls DirectiveRequest, and as a student sends PeerLookup and Feedback (retried
until Ack). The knowledge exchange itself is peer-to-peer and not CPM load, so the
student computes its Feedback by learning from a package taught by a *replica* of its
teacher (the population is deterministic; replicas start from the same state but do not
see the teacher's later rounds) — the CPM cannot tell the difference.

Reported: rounds completed, profiles/s, directives/s, requests/s, feedback acked vs
stored (lost must be 0, duplicates 0), client retries and refusals, CPM RSS per round
(bounded memory: growth over the second half of the run), round durations.

CPM settings (documented in docs/reliability.md): quorum 1.0 (a round matches when all
agents profiled), round_timer_s 120 (backstop only), directive_ttl_s 300,
request_timeout_s 30, active_window_s 3600, strategy linucb.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MAX_CONSECUTIVE_FAILURES = 120  # ≈ 1-2 min of retries before an agent gives up (reported)


def agent_seed(i: int) -> bytes:
    return hashlib.sha256(f"knexa/load/{i}".encode()).digest()


# ---------------------------------------------------------------------------- driver


async def _agent(i: int, n: int, cpm_addr: str, rounds: int, out: dict[str, Any], population: list[Any],
                 index_of: dict[str, int], n_local: int, all_done: Any) -> None:
    import multiaddr
    import trio

    from knexad.config import DaemonConfig, TimeoutsSection
    from knexad.cpm_client import CpmRpc
    from p2p.host import build_host
    from protocol.envelope import Identity
    from protocol.errors import PeerUnavailable, ProtocolError, Unauthorized

    ident = Identity(agent_seed(i))
    agent = population[i]
    cfg = DaemonConfig(cpm=cpm_addr, timeouts=TimeoutsSection(dial_s=30, request_s=60, long_poll_s=30))
    host = build_host(ident.seed, dial_timeout_s=30)
    th = agent.transfer_set_hash()

    async def call(msg: Any, timeout_s: float | None = None) -> Any:
        failures = 0
        while True:
            try:
                return await rpc.call(msg, timeout_s)
            except PeerUnavailable as exc:
                out["retries"] += 1
                failures += 1
                if failures > MAX_CONSECUTIVE_FAILURES:  # e.g. the CPM refuses our connection
                    out["unreachable"] += 1
                    out["errors"].append(f"{type(msg).__name__}: gave up: {exc}")
                    raise
                await trio.sleep(0.5)
            except (Unauthorized, ProtocolError) as exc:
                out["refused"] += 1
                out["errors"].append(f"{type(msg).__name__}: {exc.code}: {exc}")
                raise

    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        rpc = CpmRpc(host, ident, cfg)
        try:
            await _rounds(ident, agent, rpc, cfg, th, rounds, out, population, index_of, call)
        except (PeerUnavailable, Unauthorized, ProtocolError):
            pass  # counted in ``out``; the report fails the run
        finally:
            out["done"] += 1
            if out["done"] == n_local:
                all_done.set()
            with trio.CancelScope(shield=True):
                await all_done.wait()  # tear hosts down together, after the report is written


async def _rounds(ident: Any, agent: Any, rpc: Any, cfg: Any, th: str, rounds: int, out: dict[str, Any],
                  population: list[Any], index_of: dict[str, int], call: Any) -> None:
    import trio

    from knexad.agent_api import ProtocolArm, TeachRequest
    from knexad.synthetic import package_kb
    from protocol.directives import verify_directive
    from protocol.envelope import now_ms
    from protocol.messages import Directive, DirectiveRequest, Feedback, NoDirective, PeerLookup, Profile, Register

    register = Register(f"org-{ident.peer_id[-6:]}", agent.family, ("/ip4/127.0.0.1/tcp/9",), "load/0.1")
    reply = await call(register)
    r = reply.message.round
    while r <= rounds:
        reply = await call(Profile(r, tuple(agent.profile()), th))
        if isinstance(reply.message, NoDirective):
            nd = reply.message
            if nd.reason == "finished":
                break
            if nd.reason == "advance":
                r = nd.round
            else:
                await trio.sleep(nd.retry_after_ms / 1000)
            continue
        out["profiles"] += 1
        while True:
            reply = await call(DirectiveRequest(r, 30_000), timeout_s=60)
            msg = reply.message
            if isinstance(msg, Directive):
                _, d = verify_directive(reply.raw, cpm_peer_id=cfg.cpm_peer_id, now_ms=now_ms())
                out["directives"] += 1
                if d.student == ident.peer_id:
                    addrs = await call(PeerLookup(d.teacher))
                    assert addrs.message.peer_id == d.teacher
                    arm = ProtocolArm(d.alpha, d.temperature, d.n_samples)
                    teacher = population[index_of[d.teacher]]
                    pkg = teacher.teach(TeachRequest(d.directive_id, d.round, d.transfer_ids[:24], arm))
                    res = agent.learn(pkg, arm)
                    fb = Feedback(d.directive_id, d.round, d.teacher, d.student, max(res.loss_pre, 0.0),
                                  max(res.loss_post, 0.0), package_kb(pkg), True, "")
                    await call(fb)
                    out["acked"].append(d.directive_id)
                r = d.round + 1
                break
            if msg.reason == "round_pending":
                continue
            r = msg.round + 1 if msg.reason == "not_matched" else msg.round
            if msg.reason == "finished":
                r = rounds + 1
            break
        agent.end_round()


async def _driver_main(first: int, count: int, n: int, cpm_addr: str, rounds: int, out_path: Path) -> None:
    import trio

    from knexad.agents import SYNTHETIC_ALPHA
    from knexad.synthetic import make_population
    from protocol.envelope import Identity

    population = make_population(n, alpha=SYNTHETIC_ALPHA, seed=0)
    index_of = {Identity(agent_seed(i)).peer_id: i for i in range(n)}
    out: dict[str, Any] = {"profiles": 0, "directives": 0, "acked": [], "retries": 0, "refused": 0,
                           "unreachable": 0, "errors": [], "done": 0}
    all_done = trio.Event()

    async def report_when_done() -> None:
        await all_done.wait()
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(out))
        os.replace(tmp, out_path)
        # py-libp2p host teardown can stall with hundreds of hosts in one loop; the
        # report is on disk, so leave without waiting for it
        os._exit(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(report_when_done)
        for i in range(first, first + count):
            nursery.start_soon(_agent, i, n, cpm_addr, rounds, out, population, index_of, count, all_done)
            await trio.sleep(0.01)  # stagger the Noise handshakes


def driver(args: argparse.Namespace) -> int:
    import logging

    import structlog
    import trio

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
                        logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    trio.run(_driver_main, args.first, args.count, args.agents, args.cpm, args.rounds, Path(args.out))
    return 0


# ------------------------------------------------------------------------------ main


def _rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _latest_round(db: Path) -> tuple[int, str]:
    """The running CPM's latest round, read-only (never takes its write lock)."""
    from cpm.store import StoreError, open_store

    try:
        store = open_store(db, readonly=True)
        try:
            row = store.latest_round()
        finally:
            store.close()
    except StoreError:
        return 0, "none"
    return (row.round, row.state) if row else (0, "none")


def _setup_cpm(home: Path, rounds: int, strategy: str) -> None:
    from cpm.config import load_config, save_config
    from knexad.agents import SYNTHETIC_ALPHA
    from knexad.synthetic import make_population

    th = make_population(2, alpha=SYNTHETIC_ALPHA, seed=0)[0].transfer_set_hash()
    res = subprocess.run([sys.executable, "-m", "cpm.cli", "init", "--home", str(home), "--open", "--transfer-hash",
                          th, "--max-rounds", str(rounds), "--strategy", strategy], cwd=REPO, capture_output=True,
                         text=True)
    if res.returncode != 0:
        raise RuntimeError(f"knexa-cpm init failed ({res.returncode}): {res.stderr[-2000:]}")
    cfg = load_config(home)
    cfg.quorum, cfg.round_timer_s, cfg.directive_ttl_s = 1.0, 120.0, 300.0
    cfg.request_timeout_s, cfg.active_window_s, cfg.log_format = 30.0, 3600.0, "json"
    save_config(home, cfg)


def run(agents: int, rounds: int, drivers: int, strategy: str, workdir: Path, timeout_s: float) -> dict[str, Any]:
    home = workdir / "cpm"
    _setup_cpm(home, rounds, strategy)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    ready = workdir / "cpm.ready"
    procs: list[subprocess.Popen[bytes]] = []
    log = (workdir / "cpm.log").open("wb")
    try:
        cpm = subprocess.Popen([sys.executable, "-m", "cpm.cli", "serve", "--home", str(home), "--ready-file",
                                str(ready)], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log,
                               start_new_session=True)
        procs.append(cpm)
        deadline = time.monotonic() + 60
        while not ready.exists():
            if cpm.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("CPM did not start")
            time.sleep(0.1)
        addr = json.loads(ready.read_text())["addrs"][0]
        rss: list[tuple[int, int]] = []  # (round, rss_kb)
        t0 = time.monotonic()
        per = -(-agents // drivers)
        outs = []
        for k in range(drivers):
            first, count = k * per, min(per, agents - k * per)
            if count <= 0:
                break
            out = workdir / f"driver{k}.json"
            outs.append(out)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "benchmarks.load", "--driver", "--first", str(first), "--count", str(count),
                 "--agents", str(agents), "--rounds", str(rounds), "--cpm", addr, "--out", str(out)],
                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=(workdir / f"driver{k}.log").open("wb"),
                start_new_session=True))
        db = home / "cpm.db"
        while any(p.poll() is None for p in procs[1:]):
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"load run exceeded {timeout_s} s")
            rnd, _ = _latest_round(db)
            kb = _rss_kb(cpm.pid)
            if kb is not None:
                rss.append((rnd, kb))
            time.sleep(1.0)
        wall = time.monotonic() - t0
        bad = [p.returncode for p in procs[1:] if p.returncode != 0]
        if bad:
            raise RuntimeError(f"driver(s) failed with {bad}; see {workdir}/driver*.log")
        final_rss = _rss_kb(cpm.pid)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        log.close()
    return _report(agents, rounds, drivers, strategy, home / "cpm.db", outs, rss, final_rss, wall, cpm.returncode)


def _report(agents: int, rounds: int, drivers: int, strategy: str, db: Path, outs: list[Path],
            rss: list[tuple[int, int]], final_rss: int | None, wall: float, cpm_rc: int | None) -> dict[str, Any]:
    acked: list[str] = []
    totals = {"profiles": 0, "directives": 0, "retries": 0, "refused": 0, "unreachable": 0}
    errors: list[str] = []
    for out in outs:
        doc = json.loads(out.read_text())
        acked += doc["acked"]
        errors += doc["errors"]
        for k in totals:
            totals[k] += doc[k]
    from cpm.store import open_store

    store = open_store(db, readonly=True)
    try:
        stored = [f.directive_id for f in store.list_feedback()]
        counts = store.counts()
        n_dir, n_prof = counts["directives"], counts["profiles"]
        n_agents_db = sum(1 for a in store.list_agents() if a.registered_at is not None)
        rows = store.list_rounds()
    finally:
        store.close()
    closed = sum(1 for r in rows if r.state == "closed")
    ended = [r.closed_at for r in rows if r.closed_at is not None]
    times = (min((r.opened_at for r in rows), default=None), max(ended, default=None))
    durs = [(r.closed_at - r.opened_at) / 1000 for r in rows if r.closed_at is not None]
    span = max((times[1] - times[0]) / 1000, 1e-9) if times[0] and times[1] else wall
    per_round: dict[int, int] = {}
    for rnd, kb in rss:
        per_round[rnd] = kb  # last sample seen while that round was the latest
    series = [per_round[k] for k in sorted(per_round) if k > 0]
    half = series[len(series) // 2:] if series else []
    lost = sorted(set(acked) - set(stored))
    requests = totals["profiles"] * 2 + len(acked) * 2  # Profile + DirectiveRequest; PeerLookup + Feedback
    return {
        "config": {"agents": agents, "rounds": rounds, "drivers": drivers, "strategy": strategy,
                   "quorum": 1.0, "round_timer_s": 120, "directive_ttl_s": 300, "request_timeout_s": 30},
        "rounds_closed": closed,
        "profiles_stored": n_prof,
        "profiles_acked": totals["profiles"],
        "directives_issued": n_dir,
        "directives_received": totals["directives"],
        "feedback_acked": len(acked),
        "feedback_stored": len(stored),
        "feedback_lost": len(lost),
        "feedback_duplicates": len(acked) - len(set(acked)),
        "client_refusals": totals["refused"],
        "client_retries": totals["retries"],
        "agents_registered": n_agents_db,
        "agents_gave_up": totals["unreachable"],
        "errors": errors[:10],
        "seconds_rounds": round(span, 2),
        "seconds_wall": round(wall, 2),
        "profiles_per_s": round(n_prof / span, 1),
        "directives_per_s": round(n_dir / span, 2),
        "requests_per_s": round(requests / span, 1),
        "round_seconds": {"mean": round(sum(durs) / len(durs), 2) if durs else None,
                          "max": round(max(durs), 2) if durs else None},
        "cpm_rss_mb": {"first_round": round(series[0] / 1024, 1) if series else None,
                       "mid": round(half[0] / 1024, 1) if half else None,
                       "last": round(series[-1] / 1024, 1) if series else None,
                       "max": round(max(series) / 1024, 1) if series else None,
                       "final": round(final_rss / 1024, 1) if final_rss else None,
                       "growth_second_half_mb": round((max(half) - half[0]) / 1024, 1) if half else None},
        "cpm_exit": cpm_rc,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--drivers", type=int, default=4, help="driver processes (agents are split evenly)")
    ap.add_argument("--strategy", default="linucb")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--workdir", type=Path, help="keep CPM home, DB and logs here (default: a temp dir)")
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--cpm", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.driver:
        return driver(args)
    if args.agents < 2 or args.rounds < 1 or args.drivers < 1:
        ap.error("need --agents ≥ 2, --rounds ≥ 1, --drivers ≥ 1")
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        report = run(args.agents, args.rounds, args.drivers, args.strategy, args.workdir, args.timeout)
    else:
        with tempfile.TemporaryDirectory(prefix="knexa-load-") as tmp:
            report = run(args.agents, args.rounds, args.drivers, args.strategy, Path(tmp), args.timeout)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for k, v in report.items():
            print(f"{k:>22}: {v}")
    ok = (report["feedback_lost"] == 0 and report["client_refusals"] == 0 and report["agents_gave_up"] == 0
          and report["agents_registered"] == args.agents and report["rounds_closed"] == args.rounds)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
