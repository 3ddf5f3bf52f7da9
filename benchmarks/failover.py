"""CPM replica failover, measured with real processes (issue #18).

Two ``knexa-cpm serve --lease S`` replicas share one PostgreSQL store (a throwaway
server, ``benchmarks.pgserver``) and one identity key, each with its own home and
listen address; N daemons (synthetic agents) know both addresses (``knexad init --cpm
A --cpm B``; half of them list B first, so both replicas ingest). Per trial, the replica
holding the lease is killed with SIGKILL at a chosen moment of a round:

* ``feedback`` — the round is matched, directives are out, feedback is not all in
  (between directives and feedback);
* ``profiles`` — the round is open with some profiles in (before matching);
* ``matching`` — *inside* the matching: the holder has written the round's directives
  and its ``matched`` state in its open write transaction and not committed. A matching
  takes milliseconds, so the replicas run with the test-only knob of ``cpm.faults``
  (``KNEXA_FAULT_MATCH_HOLD_S`` + an arm file): the trial creates the arm file, the
  holder's next matching takes it, logs ``cpm.match.holding`` and holds; the trial
  kills it then. The new holder must match that round once: one ``cpm.round.matched``
  for it across all replicas (none by the killed one), all its directives written by
  one matching (one ``issued_at``, equal to the round's ``matched_at``).

The killed replica is restarted (the next trial kills the other one's lease). Read
from the database (its clock, ``clock_timestamp()``; the replicas' ``now_ms`` for the
round rows — same host):

* ``takeover_s`` — lease expiry of the killed holder → the new holder's ``acquired_at``;
* ``next_transition_s`` — lease expiry → the first round transition (open, matched or
  closed) written after the kill, by the new holder;
* ``next_match_s`` — lease expiry → the next ``matched_at`` (needs the daemons'
  feedback and profiles too, so it includes a round of their work).

Checked after every trial (a violation fails the run): every profile and feedback a
daemon logged as acknowledged is in the database; the strategy's reward count
(``z.n`` in the stored bandit state) equals the feedback rows (no reward applied twice
or lost); no agent is in two directives of one round; every directive a daemon
received is in the database (none from a matching that did not commit).

Usage::

    python -m benchmarks.failover                 # 10 trials (feedback, profiles, matching, …), lease 2 s
    python -m benchmarks.failover --kinds matching --trials 3
    python -m benchmarks.failover --trials 2 --json
    python -m benchmarks.failover --trials 0 --pauses 2   # SIGSTOP the holder instead

``tests/e2e/test_cpm_replicas.py`` runs one trial of the same ``Cluster``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from p2p.logs import log_events

REPO = Path(__file__).resolve().parents[1]
CPM = [sys.executable, "-m", "cpm.cli"]
KNEXAD = [sys.executable, "-m", "knexad.cli"]
FAST_ENV = {  # short retries and deadlines: a failover shows within seconds
    "KNEXA_RETRY_BASE_S": "0.2", "KNEXA_RETRY_MAX_S": "1.0", "KNEXA_TIMEOUTS_DIAL_S": "4",
    "KNEXA_TIMEOUTS_REQUEST_S": "5", "KNEXA_TIMEOUTS_LONG_POLL_S": "5", "KNEXA_TIMEOUTS_EXCHANGE_STEP_S": "5",
}
KINDS = ("feedback", "profiles", "matching")
MATCH_HOLD_S = 60.0  # the armed holder holds this long; the trial kills it long before


class ClusterError(AssertionError):
    """A wait timed out or an invariant does not hold (with the processes' log tails)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A subprocess in its own process group, stderr (JSON logs) in a file."""

    def __init__(self, name: str, argv: list[str], logdir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.err = logdir / f"{name}.err"
        with (logdir / f"{name}.out").open("ab") as out, self.err.open("ab") as err:
            self.popen = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                          start_new_session=True)

    def events(self, name: str) -> list[dict[str, Any]]:
        return log_events(self.err.read_text(errors="replace"), name)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill9(self) -> None:
        if self.alive():
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=30)

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill9()


class Cluster:
    """Two CPM replicas on ``url`` and ``n_daemons`` daemons, under ``workdir``."""

    def __init__(self, workdir: Path, url: str, *, n_daemons: int = 4, lease_s: float = 2.0,
                 round_timer_s: float = 30.0, seed: int = 0) -> None:
        self.dir, self.url, self.n, self.lease_s, self.seed = workdir, url, n_daemons, lease_s, seed
        self.round_timer_s = round_timer_s
        self.ports = [_free_port(), _free_port()]
        self.replicas: list[Proc | None] = [None, None]
        self.daemons: list[Proc] = []
        self.all_procs: list[Proc] = []
        self.peer_id = ""
        self.arm_file = workdir / "match-hold.arm"  # cpm.faults: one hold per arming
        self._starts = 0
        self._observer: Any = None

    # ---- processes ------------------------------------------------------------------
    def _run(self, argv: list[str]) -> str:
        r = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise ClusterError(f"{' '.join(argv[2:5])} exited {r.returncode}: {r.stderr[-2000:]}")
        return r.stdout

    def _transfer_hash(self) -> str:
        from knexad.agents import build_agent
        from knexad.config import AgentSection, DaemonConfig
        from protocol.envelope import Identity

        cfg = DaemonConfig(cpm=f"/ip4/127.0.0.1/tcp/1/p2p/{Identity.generate().peer_id}",
                           agent=AgentSection(n_agents=self.n, seed=self.seed))
        return build_agent(cfg).transfer_set_hash()

    def setup(self) -> None:
        """Both homes (one identity key, one store) and every daemon home."""
        thash = self._transfer_hash()
        for i in (0, 1):
            home = self.dir / f"cpm{i}"
            if i == 1:  # the same identity: directives verify the same whichever replica signed
                home.mkdir(parents=True)
                shutil.copy2(self.dir / "cpm0" / "identity.key", home / "identity.key")
            self.peer_id = self._run([
                *CPM, "init", "--home", str(home), "--open", "--transfer-hash", thash, "--store", self.url,
                "--round-timer", str(self.round_timer_s), "--directive-ttl", "60",
                "--listen", f"/ip4/127.0.0.1/tcp/{self.ports[i]}"]).strip().splitlines()[-1]
        addrs = [f"/ip4/127.0.0.1/tcp/{p}/p2p/{self.peer_id}" for p in self.ports]
        for i in range(self.n):
            order = addrs if i % 2 == 0 else addrs[::-1]  # half the daemons start on each replica
            self._run([*KNEXAD, "init", "--home", str(self.dir / f"d{i}"), "--cpm", order[0], "--cpm", order[1],
                       "--agent-index", str(i), "--n-agents", str(self.n), "--seed", str(self.seed),
                       "--org", f"org{i}"])

    def start_replica(self, i: int) -> Proc:
        self._starts += 1
        name = f"cpm{i}-{self._starts}"
        p = Proc(name, [*CPM, "serve", "--home", str(self.dir / f"cpm{i}"), "--log-format", "json",
                        "--lease", str(self.lease_s), "--ready-file", str(self.dir / f"{name}.ready")], self.dir,
                 # test-only (cpm.faults): inert until a 'matching' trial creates the arm file
                 {"KNEXA_FAULT_MATCH_HOLD_S": str(MATCH_HOLD_S), "KNEXA_FAULT_MATCH_HOLD_FILE": str(self.arm_file)})
        self.replicas[i] = p
        self.all_procs.append(p)
        self.wait(lambda: (self.dir / f"{name}.ready").exists(), 90, f"{name} ready")
        return p

    def start(self) -> None:
        """The whole cluster: homes, both replicas (replica 0 first: it takes the lease),
        then the daemons."""
        self.setup()
        self.start_replica(0)
        self.start_replica(1)
        self.start_daemons()

    def start_daemons(self) -> None:
        for i in range(self.n):
            p = Proc(f"d{i}", [*KNEXAD, "run", "--home", str(self.dir / f"d{i}"), "--log-format", "json"],
                     self.dir, FAST_ENV)
            self.daemons.append(p)
            self.all_procs.append(p)

    def stop(self) -> None:
        for p in self.all_procs:
            p.stop()
        if self._observer is not None:
            self._observer.close()
            self._observer = None

    def wait(self, predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.05)
        tails = "\n".join(f"--- {p.name} ---\n{p.err.read_text(errors='replace')[-2500:]}" for p in self.all_procs)
        raise ClusterError(f"timed out waiting for {what}\n{tails}")

    # ---- the database ---------------------------------------------------------------
    def sql(self, statement: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """A read on the store's database, over an observer's read-only connection (the
        PostgreSQL backend's own, ``PostgresStore.db``: no driver import here)."""
        if self._observer is None:
            from cpm.store import open_store

            self._observer = open_store(self.url, readonly=True)
        return list(self._observer.db.execute(statement, args).fetchall())  # type: ignore[attr-defined]

    def lease(self) -> tuple[str, int, float] | None:
        """(holder, epoch, expires_at as epoch seconds) of the round lease."""
        rows = self.sql("SELECT holder, epoch, EXTRACT(EPOCH FROM expires_at) FROM lease WHERE name = 'rounds'")
        return None if not rows else (rows[0][0], int(rows[0][1]), float(rows[0][2]))

    def holder_index(self) -> int:
        """Which replica holds the lease (its pid is in the holder name)."""
        lease = self.lease()
        assert lease is not None
        pid = int(lease[0].split("/")[1])
        for i, p in enumerate(self.replicas):
            if p is not None and p.popen.pid == pid:
                return i
        raise ClusterError(f"no running replica holds the lease {lease}")

    def latest_round(self) -> tuple[int, str] | None:
        rows = self.sql("SELECT round, state FROM rounds ORDER BY round DESC LIMIT 1")
        return None if not rows else (int(rows[0][0]), str(rows[0][1]))

    def replica_procs(self) -> list[Proc]:
        """Every replica process this run started, killed ones included."""
        return [p for p in self.all_procs if p.name.startswith("cpm")]

    def hold_in_matching(self, timeout_s: float) -> tuple[int, int]:
        """The 'matching' kill point: once a round ≥ 2 is open, arm one hold
        (``cpm.faults``) and wait until a replica logs ``cpm.match.holding`` — it is
        inside its matching's write transaction. Returns (replica index, round)."""
        self.wait(lambda: (row := self.latest_round()) is not None and row[0] >= 2 and row[1] == "open",
                  timeout_s, "an open round ≥ 2 to arm the matching hold in")
        seen = {p.name: len(p.events("cpm.match.holding")) for p in self.replica_procs()}
        self.arm_file.touch()

        def holding() -> tuple[int, int] | None:
            for i, p in enumerate(self.replicas):
                events = p.events("cpm.match.holding") if p is not None else []
                if p is not None and len(events) > seen.get(p.name, 0):
                    return i, int(events[-1]["round"])
            return None
        return self.wait(holding, timeout_s, "the lease holder holding inside a matching (cpm.match.holding)")

    def check_matched_once(self, round_: int, killed: Proc) -> dict[str, Any]:
        """The round the killed holder was matching was matched after the kill, once:
        one ``cpm.round.matched`` for it over every replica process (not by the killed
        one, whose transaction never committed), and every directive row of the round
        written by that one matching (one ``issued_at``, the round's ``matched_at``)."""
        rows = self.sql("SELECT state, matched_at FROM rounds WHERE round = %s", (round_,))
        if not rows or rows[0][1] is None:
            raise ClusterError(f"round {round_} was not matched after the kill")
        n, distinct, issued_at = self.sql("SELECT count(*), count(DISTINCT issued_at), min(issued_at) "
                                          "FROM directives WHERE round = %s", (round_,))[0]
        if int(n) == 0 or int(distinct) != 1 or int(issued_at) != int(rows[0][1]):
            raise ClusterError(f"round {round_}: {n} directives from {distinct} matchings (issued_at {issued_at}, "
                               f"matched_at {rows[0][1]})")
        logged = [p.name for p in self.replica_procs() for e in p.events("cpm.round.matched")
                  if int(e["round"]) == round_]
        if len(logged) != 1 or logged[0] == killed.name:
            raise ClusterError(f"round {round_} logged as matched by {logged} (killed: {killed.name})")
        return {"matched_round": round_, "directives": int(n), "matched_by": logged[0]}

    def moment(self, kind: str) -> Callable[[], bool]:
        """The kill point: 'feedback' (matched, feedback pending) or 'profiles' (open,
        some profiles in, not all); 'matching' is ``hold_in_matching``."""
        def ready() -> bool:
            row = self.latest_round()
            if row is None or row[0] < 2:  # round 1 holds start-up
                return False
            r, state = row
            if kind == "feedback":
                if state != "matched":
                    return False
                n_dir = self.sql("SELECT count(*) FROM directives WHERE round = %s", (r,))[0][0]
                n_fb = self.sql("SELECT count(*) FROM feedback WHERE round = %s", (r,))[0][0]
                return n_dir > 0 and n_fb < n_dir
            n = self.sql("SELECT count(*) FROM profiles WHERE round = %s", (r,))[0][0]
            return state == "open" and 0 < n < self.n
        return ready

    # ---- one trial ------------------------------------------------------------------
    def trial(self, kind: str, *, rounds_after: int = 2, timeout_s: float = 240.0) -> dict[str, Any]:
        """Kill -9 the lease holder at ``kind``; wait until ``rounds_after`` more rounds
        closed; restart it. Returns the measurements (seconds)."""
        held_round = None
        if kind == "matching":
            victim, held_round = self.hold_in_matching(timeout_s)
            if self.holder_index() != victim:
                raise ClusterError(f"cpm{victim} holds in a matching but does not hold the lease")
        else:
            self.wait(self.moment(kind), timeout_s, f"a round at '{kind}'")
            victim = self.holder_index()
        before = self.lease()
        proc = self.replicas[victim]
        assert proc is not None and before is not None
        proc.kill9()
        killed_at = time.time()
        old = self.lease()  # its last renewal: the expiry the takeover waits for
        assert old is not None and old[1] == before[1]
        expires = old[2]
        start_round = self.latest_round()
        assert start_round is not None
        new = self.wait(lambda: (lease := self.lease()) is not None and lease[1] > old[1] and lease, timeout_s,
                        "another replica taking the lease over")
        acquired = float(self.sql("SELECT EXTRACT(EPOCH FROM acquired_at) FROM lease WHERE name = 'rounds'")[0][0])
        target = start_round[0] + rounds_after
        self.wait(lambda: (row := self.latest_round()) is not None and row[0] > target, timeout_s,
                  f"round {target} closed after the kill")
        after_ms = int(killed_at * 1000)
        transitions = self.sql(
            "SELECT min(t) FROM (SELECT opened_at AS t FROM rounds UNION ALL SELECT matched_at FROM rounds "
            "UNION ALL SELECT closed_at FROM rounds) x WHERE t > %s", (after_ms,))[0][0]
        matched = self.sql("SELECT min(matched_at) FROM rounds WHERE matched_at > %s", (after_ms,))[0][0]
        once = self.check_matched_once(held_round, proc) if held_round is not None else {}
        self.check()
        self.start_replica(victim)
        return {"kind": kind, "killed": victim, "epoch": new[1], "round": start_round[0],
                "state": start_round[1], "takeover_s": round(acquired - expires, 3),
                "next_transition_s": round(int(transitions) / 1000 - expires, 3),
                "next_match_s": round(int(matched) / 1000 - expires, 3), **once}

    def pause_trial(self, *, rounds_after: int = 1, timeout_s: float = 240.0) -> dict[str, Any]:
        """SIGSTOP the lease holder between directives and feedback (a holder that hangs
        while connected), wait for the takeover and ``rounds_after`` more rounds, SIGCONT
        it: it must notice it lost the term (``cpm.lease.lost``) and go on as a follower
        without writing a round transition; then one more round must close."""
        self.wait(self.moment("feedback"), timeout_s, "a round at 'feedback'")
        victim = self.holder_index()
        proc = self.replicas[victim]
        old = self.lease()
        assert proc is not None and old is not None
        os.killpg(proc.popen.pid, signal.SIGSTOP)
        try:
            start_round = self.latest_round()
            assert start_round is not None
            self.wait(lambda: (lease := self.lease()) is not None and lease[1] > old[1], timeout_s,
                      "another replica taking the lease over from the paused one")
            target = start_round[0] + rounds_after
            self.wait(lambda: (row := self.latest_round()) is not None and row[0] > target, timeout_s,
                      f"round {target} closed while the old holder is paused")
        finally:
            os.killpg(proc.popen.pid, signal.SIGCONT)
        lost = self.wait(lambda: proc.events("cpm.lease.lost"), timeout_s, "the resumed holder noticing")
        resumed_round = self.latest_round()
        assert resumed_round is not None
        self.wait(lambda: (row := self.latest_round()) is not None and row[0] > resumed_round[0] + 1, timeout_s,
                  "a round closed after the old holder resumed")
        self.check()
        if not proc.alive():
            raise ClusterError(f"{proc.name} exited after it resumed")
        return {"kind": "pause", "paused": victim, "round": start_round[0], "lost": lost[0].get("reason")}

    # ---- invariants -----------------------------------------------------------------
    def check(self) -> dict[str, int]:
        """Nothing acknowledged is missing, no reward twice, no agent twice in a round.
        The daemons' logs are read before the database: an Ack logged after the read
        of the rows would otherwise look lost."""
        acked = []
        for i, d in enumerate(self.daemons):
            ready = d.events("daemon.ready")
            acked.append((i, ready[0]["peer"] if ready else None, d.events("cpm.profile.accepted"),
                          d.events("cpm.feedback.acked"), d.events("daemon.round.done")))
        profiles = {(r[0], int(r[1])) for r in self.sql("SELECT peer_id, round FROM profiles")}
        feedback = {r[0] for r in self.sql("SELECT directive_id FROM feedback")}
        directives = {r[0] for r in self.sql("SELECT directive_id FROM directives")}
        for i, peer, accepted, fb_acked, done in acked:
            for e in done:  # a directive from a matching that never committed would show here
                if e.get("directive") and e["directive"] not in directives:
                    raise ClusterError(f"d{i}: received directive {e['directive']} is not stored")
            for e in accepted:
                if (peer, int(e["round"])) not in profiles:
                    raise ClusterError(f"d{i}: acknowledged profile of round {e['round']} is not stored")
            for e in fb_acked:
                if e["directive"] not in feedback:
                    raise ClusterError(f"d{i}: acknowledged feedback {e['directive']} is not stored")
        # one statement: one snapshot of the state and the rows it counted
        state, n_feedback = self.sql("SELECT (SELECT state FROM bandit_state WHERE id = 1), "
                                     "(SELECT count(*) FROM feedback)")[0]
        n_rewards = int(json.loads(state)["z"]["n"]) if state else 0
        if n_rewards != int(n_feedback):
            raise ClusterError(f"the bandit counted {n_rewards} rewards for {n_feedback} feedback rows")
        twice = self.sql(
            "SELECT round, p, count(*) FROM (SELECT round, teacher AS p FROM directives UNION ALL "
            "SELECT round, student FROM directives) x GROUP BY round, p HAVING count(*) > 1")
        if twice:
            raise ClusterError(f"agents in two directives of one round: {twice}")
        return {"profiles": len(profiles), "feedback": int(n_feedback), "rewards": n_rewards}


def _summary(values: list[float]) -> dict[str, float]:
    s = sorted(values)
    return {"min": s[0], "median": round(statistics.median(s), 3), "max": s[-1], "mean": round(statistics.fmean(s), 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"kill points, taken in turn ({', '.join(KINDS)})")
    ap.add_argument("--daemons", type=int, default=4)
    ap.add_argument("--lease", type=float, default=2.0, help="lease_s of the replicas")
    ap.add_argument("--pauses", type=int, default=0, help="then this many SIGSTOP/SIGCONT trials of the holder")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or any(k not in KINDS for k in kinds):
        ap.error(f"--kinds: choose from {', '.join(KINDS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from benchmarks.pgserver import PgServer

    work = Path(tempfile.mkdtemp(prefix="knexa-failover-"))
    server = PgServer().start()
    cluster = Cluster(work, server.create_database("failover"), n_daemons=args.daemons, lease_s=args.lease)
    results: list[dict[str, Any]] = []
    try:
        cluster.start()
        for t in range(args.trials):
            res = cluster.trial(kinds[t % len(kinds)])
            results.append(res)
            if not args.json:
                print(json.dumps(res), flush=True)
        pauses = []
        for _ in range(args.pauses):
            pauses.append(cluster.pause_trial())
            if not args.json:
                print(json.dumps(pauses[-1]), flush=True)
        totals = cluster.check()
    finally:
        cluster.stop()
        server.stop()
    report = {"trials": results, "pauses": pauses, "lease_s": args.lease, "daemons": args.daemons, "totals": totals,
              **{k: _summary([r[k] for r in results]) for k in ("takeover_s", "next_transition_s", "next_match_s")
                 if results},
              "by_kind": {kind: {k: _summary([r[k] for r in results if r["kind"] == kind])
                                 for k in ("takeover_s", "next_transition_s", "next_match_s")}
                          for kind in kinds if any(r["kind"] == kind for r in results)}}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for k in ("takeover_s", "next_transition_s", "next_match_s"):
            if k in report:
                print(f"{k:18s} {report[k]}")
        for kind, summary in report["by_kind"].items():
            print(f"{kind:18s} {json.dumps(summary)}")
        print(f"totals             {totals}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
