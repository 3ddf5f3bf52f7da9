"""Load test: real CPM processes, hundreds of agents speaking /knexa/cpm/1.0.0.

    python -m benchmarks.load --agents 500 --rounds 50 --json
    python -m benchmarks.load --agents 40 --rounds 5 --drivers 2
    python -m benchmarks.load --agents 500 --rounds 50 --replicas 2 --store postgresql --json

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

Replicas (issue #18; ``--replicas N --store postgresql``): N ``knexa-cpm serve --lease 5``
processes share one throwaway PostgreSQL database and one identity key
(``benchmarks.load_cluster``). Every agent knows all N addresses (the daemon's
``cpm = [...]`` list, ``DaemonConfig.cpm_replicas``) and agent i lists replica i mod N
first, so every replica ingests; the client fails over to the next one if its replica
does not answer. Reported on top: per replica its CPU seconds, the profiles and feedback
its log says it ingested, the rounds it matched (the lease holder), its RSS; the agents'
own count of which replica acknowledged; and the database's view of duplicates (rewards
counted vs feedback rows, agents in two directives of a round, profiles stored twice).
Lost feedback is counted as in the single-node run: acknowledged ids vs stored rows.

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


async def _agent(i: int, n: int, cpm_addrs: list[str], rounds: int, out: dict[str, Any], population: list[Any],
                 index_of: dict[str, int], n_local: int, all_done: Any) -> None:
    import multiaddr
    import trio

    from knexad.config import DaemonConfig, TimeoutsSection
    from knexad.cpm_client import CpmRpc
    from p2p.host import build_host
    from protocol.envelope import Identity
    from protocol.errors import KnexaError, PeerUnavailable, ProtocolError, Unauthorized
    from protocol.messages import NoDirective

    ident = Identity(agent_seed(i))
    agent = population[i]
    first = i % len(cpm_addrs)  # agent i starts on replica i mod N: every replica ingests
    order = cpm_addrs[first:] + cpm_addrs[:first]
    cfg = DaemonConfig(cpm=order[0], cpm_replicas=tuple(order[1:]),
                       timeouts=TimeoutsSection(dial_s=30, request_s=60, long_poll_s=30))
    host = build_host(ident.seed, dial_timeout_s=30)
    th = agent.transfer_set_hash()

    mine = [0] * len(cpm_addrs)  # profiles accepted, by replica

    async def call(msg: Any, timeout_s: float | None = None) -> Any:
        failures = 0
        while True:
            try:
                reply = await rpc.call(msg, timeout_s)
                kind = type(msg).__name__  # an accepted Profile, an acknowledged Feedback: by replica
                if kind in out["by_replica"] and not isinstance(reply.message, NoDirective):
                    out["by_replica"][kind][(first + rpc.active) % len(cpm_addrs)] += 1
                    if kind == "Profile":
                        mine[(first + rpc.active) % len(cpm_addrs)] += 1
                return reply
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
            except KnexaError as exc:
                if exc.code != "internal":
                    out["refused"] += 1
                    out["errors"].append(f"{type(msg).__name__}: {exc.code}: {exc}")
                    raise
                # a CPM error (before `unavailable` existed, a store write that waited past
                # lock_timeout came back as this): counted, sent again as a daemon does
                out["internal"] += 1
                failures += 1
                if len(out["internal_samples"]) < 5:
                    out["internal_samples"].append(f"{type(msg).__name__} at {(first + rpc.active) % len(cpm_addrs)}")
                if failures > MAX_CONSECUTIVE_FAILURES:
                    out["unreachable"] += 1
                    out["errors"].append(f"{type(msg).__name__}: gave up: {exc.code}: {exc}")
                    raise
                await trio.sleep(1.0)

    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        rpc = CpmRpc(host, ident, cfg)
        try:
            await _rounds(ident, agent, rpc, cfg, th, rounds, out, population, index_of, call)
        except KnexaError:
            pass  # counted in ``out``; the report fails the run
        finally:
            out["failovers"] += rpc.failovers
            if rpc.failovers == 0:  # never moved: all its profiles went to its first replica
                out["stayed"]["agents"][i % len(cpm_addrs)] += 1
                for k, c in enumerate(mine):
                    out["stayed"]["profiles"][k] += c
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


async def _driver_main(first: int, count: int, n: int, cpm_addrs: list[str], rounds: int, out_path: Path) -> None:
    import trio

    from knexad.agents import SYNTHETIC_ALPHA
    from knexad.synthetic import make_population
    from protocol.envelope import Identity

    population = make_population(n, alpha=SYNTHETIC_ALPHA, seed=0)
    index_of = {Identity(agent_seed(i)).peer_id: i for i in range(n)}
    out: dict[str, Any] = {"profiles": 0, "directives": 0, "acked": [], "retries": 0, "refused": 0,
                           "unreachable": 0, "errors": [], "done": 0, "failovers": 0, "internal": 0,
                           "internal_samples": [],
                           "by_replica": {k: [0] * len(cpm_addrs) for k in ("Profile", "Feedback")},
                           "stayed": {k: [0] * len(cpm_addrs) for k in ("agents", "profiles")}}
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
            nursery.start_soon(_agent, i, n, cpm_addrs, rounds, out, population, index_of, count, all_done)
            await trio.sleep(0.01)  # stagger the Noise handshakes


def driver(args: argparse.Namespace) -> int:
    import logging

    import structlog
    import trio

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
                        logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    trio.run(_driver_main, args.first, args.count, args.agents, args.cpm.split(","), args.rounds, Path(args.out))
    return 0


# ------------------------------------------------------------------------------ main


def run(agents: int, rounds: int, drivers: int, strategy: str, workdir: Path, timeout_s: float, *,
        replicas: int = 1, store: str = "sqlite", url: str = "") -> dict[str, Any]:
    """One load run under ``workdir``; the report. ``url``: an empty PostgreSQL database
    to use instead of starting a throwaway server (the test suite's)."""
    from benchmarks.load_cluster import CpmCluster

    cluster = CpmCluster(workdir, rounds, strategy, replicas=replicas, store=store, url=url)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen[bytes]] = []
    rss: list[list[tuple[int, int]]] = [[] for _ in range(replicas)]  # per replica: (round, rss_kb)
    holders: dict[int, set[int]] = {}  # round → replicas seen holding the lease while it was the latest
    try:
        cluster.setup()
        addrs = cluster.start(env)
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
                 "--agents", str(agents), "--rounds", str(rounds), "--cpm", ",".join(addrs), "--out", str(out)],
                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=(workdir / f"driver{k}.log").open("wb"),
                start_new_session=True))
        timed_out = False
        while any(p.poll() is None for p in procs):
            if time.monotonic() - t0 > timeout_s:  # report what the database holds, marked
                timed_out = True
                break
            rnd, _ = cluster.latest_round()
            for i, kb in enumerate(cluster.rss_kb()):
                if kb is not None:
                    rss[i].append((rnd, kb))
            holder, _ = cluster.lease()
            if holder is not None:
                holders.setdefault(rnd, set()).add(holder)
            time.sleep(1.0)
        wall = time.monotonic() - t0
        bad = [p.returncode for p in procs if p.returncode != 0]
        if bad and not timed_out:
            raise RuntimeError(f"driver(s) failed with {bad}; see {workdir}/driver*.log")
        final_rss = cluster.rss_kb()
        cluster.read_cpu()
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
        cluster.stop()
    try:
        report = _report(agents, rounds, drivers, strategy, cluster.target, outs, rss[0], final_rss[0], wall,
                         cluster.procs[0].returncode)
        if timed_out:
            report["timed_out_after_s"] = timeout_s
        if replicas > 1 or store != "sqlite":
            report["config"].update(replicas=replicas, store=store, lease_s=cluster.lease_s if replicas > 1 else 0)
            report["replicas"] = cluster.replica_report(rss, final_rss)
            report["database_cpu_s"] = round(cluster.pg_cpu_s, 1) if cluster.pg_cpu_s is not None else None
            report["acked_by_replica"] = _acked_by_replica(outs)
            report["client_failovers"] = sum(json.loads(o.read_text())["failovers"] for o in outs if o.exists())
            report["lease_holder_by_round"] = {str(r): sorted(h) for r, h in sorted(holders.items()) if r > 0}
            checks = cluster.db_checks()
            if checks is not None:
                report["database"] = checks
    finally:
        cluster.close()
    return report


def _acked_by_replica(outs: list[Path]) -> dict[str, list[int]]:
    """Which replica accepted each Profile and acknowledged each Feedback, as the agents
    saw it (a retried request counts where it finally succeeded); and for the agents that
    never failed over, how many prefer each replica (agent i: replica i mod N) and the
    profiles each replica accepted from them — equal to rounds × agents when the agents
    are spread as intended."""
    total: dict[str, list[int]] = {}
    for out in outs:
        if not out.exists():
            continue
        doc = json.loads(out.read_text())
        stayed = {f"stayed_{k}": v for k, v in doc["stayed"].items()}
        for kind, counts in {**doc["by_replica"], **stayed}.items():
            acc = total.setdefault(kind, [0] * len(counts))
            for i, c in enumerate(counts):
                acc[i] += c
    return total


def _report(agents: int, rounds: int, drivers: int, strategy: str, db: Path | str, outs: list[Path],
            rss: list[tuple[int, int]], final_rss: int | None, wall: float, cpm_rc: int | None) -> dict[str, Any]:
    from benchmarks.load_cluster import rss_summary

    acked: list[str] = []
    totals = {"profiles": 0, "directives": 0, "retries": 0, "refused": 0, "unreachable": 0, "internal": 0}
    errors: list[str] = []
    internal: list[str] = []
    for out in outs:
        if not out.exists():  # a driver stopped by the timeout: its agents' counts are unknown
            errors.append(f"{out.name}: no report (timed out)")
            continue
        doc = json.loads(out.read_text())
        acked += doc["acked"]
        errors += doc["errors"]
        internal += doc["internal_samples"]
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
        "cpm_internal_errors": totals["internal"],  # answered "internal", sent again (replica: which one)
        "cpm_internal_error_samples": internal[:5],
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
        "cpm_rss_mb": rss_summary(rss, final_rss),  # replica 0's with replicas (each: "replicas")
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
    ap.add_argument("--replicas", type=int, default=1,
                    help="CPM replicas sharing one store (> 1 needs --store postgresql)")
    ap.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite",
                    help="sqlite: the home's file; postgresql: a throwaway server (benchmarks.pgserver)")
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
    if args.replicas < 1 or (args.replicas > 1 and args.store != "postgresql"):
        ap.error("--replicas > 1 needs --store postgresql (SQLite is single-node)")
    opts = {"replicas": args.replicas, "store": args.store}
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        report = run(args.agents, args.rounds, args.drivers, args.strategy, args.workdir, args.timeout, **opts)
    else:
        with tempfile.TemporaryDirectory(prefix="knexa-load-") as tmp:
            report = run(args.agents, args.rounds, args.drivers, args.strategy, Path(tmp), args.timeout, **opts)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for k, v in report.items():
            print(f"{k:>22}: {v}")
    ok = (report["feedback_lost"] == 0 and report["client_refusals"] == 0 and report["agents_gave_up"] == 0
          and report["agents_registered"] == args.agents and report["rounds_closed"] == args.rounds
          and report["feedback_duplicates"] == 0 and replicas_ok(report) and "timed_out_after_s" not in report)
    return 0 if ok else 1


def replicas_ok(report: dict[str, Any]) -> bool:
    """With replicas: the database shows no duplicate (each reward counted once, no agent
    in two directives of a round, no profile stored twice) and every replica ingested."""
    db = report.get("database")
    if db is not None and (db["agents_in_two_directives"] or db["profiles_stored_twice"]
                           or db["rewards_counted"] not in (None, db["feedback_rows"])):
        return False
    return all(r["profiles_ingested"] > 0 for r in report.get("replicas", []))


if __name__ == "__main__":
    sys.exit(main())
