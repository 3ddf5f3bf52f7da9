"""The CPM side of the load test (``benchmarks.load``): one SQLite node, or N replicas
on one PostgreSQL store.

Why a module of its own: the load test measures the CPM as an operator runs it, and with
replicas (issue #18) that is several ``knexa-cpm serve --lease`` processes sharing one
identity key and one database (docs/operations.md §13) plus a throwaway PostgreSQL
server (``benchmarks.pgserver``) — set up the way ``benchmarks.failover`` does it — and
observed while it runs: the latest round, which replica holds the round lease, each
replica's memory, and after the run each replica's CPU seconds and what its log says it
ingested and matched. The agents (``benchmarks.load``'s drivers) only need the
addresses.

Replica homes: ``cpm0``, ``cpm1``, … under the work directory; replica 0's identity key
is copied into the others before their ``init`` (directives verify the same whichever
replica signed them). Each listens on its own 127.0.0.1 port (port 0: the ready file
says which).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from p2p.logs import log_events

REPO = Path(__file__).resolve().parents[1]
STORES = ("sqlite", "postgresql")
LEASE_S = 5.0  # docs/operations.md: failover ≈ lease_s + 0.5 s; generous on a loaded 2-core machine


def proc_cpu_s(pid: int) -> float | None:
    """utime + stime of a running process (all its threads), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class CpmCluster:
    """``replicas`` CPM processes on one store (``store``: 'sqlite' needs replicas == 1)."""

    def __init__(self, workdir: Path, rounds: int, strategy: str, *, replicas: int = 1, store: str = "sqlite",
                 lease_s: float = LEASE_S, url: str = "") -> None:
        if store not in STORES:
            raise ValueError(f"store must be one of {STORES}, not {store!r}")
        if replicas < 1 or (store == "sqlite" and replicas != 1):
            raise ValueError("replicas need --store postgresql (SQLite is single-node); replicas ≥ 1")
        self.dir, self.rounds, self.strategy = workdir, rounds, strategy
        self.n, self.store, self.lease_s = replicas, store, lease_s
        self.homes = [workdir / ("cpm" if replicas == 1 and store == "sqlite" else f"cpm{i}") for i in range(replicas)]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.addrs: list[str] = []
        self.pg: Any = None  # benchmarks.pgserver.PgServer, when we started one
        self.url = url  # an empty PostgreSQL database to use (a test's); else a throwaway server's
        self._observer: Any = None
        self._logs: list[Any] = []
        self.cpu_s: list[float | None] = [None] * replicas  # read before the processes stop
        self.pg_cpu_s: float | None = None

    # ---- set up and start -------------------------------------------------------------
    @property
    def target(self) -> str | Path:
        """The store location, as ``cpm.store.open_store`` takes it."""
        return self.url if self.store == "postgresql" else self.homes[0] / "cpm.db"

    def setup(self) -> None:
        from cpm.config import load_config, save_config
        from knexad.agents import SYNTHETIC_ALPHA
        from knexad.synthetic import make_population

        if self.store == "postgresql" and not self.url:
            from benchmarks.pgserver import PgServer

            self.pg = PgServer().start()
            self.url = self.pg.create_database("load")
        th = make_population(2, alpha=SYNTHETIC_ALPHA, seed=0)[0].transfer_set_hash()
        for i, home in enumerate(self.homes):
            if i > 0:  # one identity: directives verify the same whichever replica signed
                home.mkdir(parents=True)
                shutil.copy2(self.homes[0] / "identity.key", home / "identity.key")
            argv = [sys.executable, "-m", "cpm.cli", "init", "--home", str(home), "--open", "--transfer-hash", th,
                    "--max-rounds", str(self.rounds), "--strategy", self.strategy]
            if self.url:
                argv += ["--store", self.url]
            res = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
            if res.returncode != 0:
                raise RuntimeError(f"knexa-cpm init failed ({res.returncode}): {res.stderr[-2000:]}")
            cfg = load_config(home)
            cfg.quorum, cfg.round_timer_s, cfg.directive_ttl_s = 1.0, 120.0, 300.0
            cfg.request_timeout_s, cfg.active_window_s, cfg.log_format = 30.0, 3600.0, "json"
            save_config(home, cfg)

    def start(self, env: dict[str, str]) -> list[str]:
        """Start every replica, wait for their ready files; their first addresses."""
        for i, home in enumerate(self.homes):
            ready = self.dir / f"{home.name}.ready"
            log = (self.dir / f"{home.name}.log").open("wb")
            self._logs.append(log)
            argv = [sys.executable, "-m", "cpm.cli", "serve", "--home", str(home), "--ready-file", str(ready)]
            if self.n > 1:
                argv += ["--lease", str(self.lease_s)]
            self.procs.append(subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log,
                                               start_new_session=True))
        for i, home in enumerate(self.homes):
            ready = self.dir / f"{home.name}.ready"
            deadline = time.monotonic() + 120
            while not ready.exists():
                if self.procs[i].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"CPM replica {i} did not start; see {self.dir}/{home.name}.log")
                time.sleep(0.1)
            self.addrs.append(json.loads(ready.read_text())["addrs"][0])
        return self.addrs

    # ---- observe while running --------------------------------------------------------
    def _pg(self) -> Any:
        if self._observer is None:
            from cpm.store import open_store

            self._observer = open_store(self.url, readonly=True)
        return self._observer

    def latest_round(self) -> tuple[int, str]:
        """The latest round, read-only (never takes the SQLite write lock; a PostgreSQL
        observer keeps one connection)."""
        from cpm.store import StoreError, open_store

        try:
            if self.store == "postgresql":
                row = self._pg().latest_round()
            else:
                store = open_store(self.target, readonly=True)
                try:
                    row = store.latest_round()
                finally:
                    store.close()
        except StoreError:
            return 0, "none"
        return (row.round, row.state) if row else (0, "none")

    def lease(self) -> tuple[int | None, int]:
        """(index of the replica holding the round lease or None, its epoch); (None, 0)
        without replicas or before anyone took it."""
        if self.n < 2:
            return None, 0
        from cpm.store import StoreError

        try:
            rows = self._pg().db.execute("SELECT holder, epoch FROM lease WHERE name = 'rounds'").fetchall()
        except StoreError:
            return None, 0
        if not rows:
            return None, 0
        pid = int(str(rows[0][0]).split("/")[1])  # holder: host/pid/nonce (cpm.lease)
        index = next((i for i, p in enumerate(self.procs) if p.pid == pid), None)
        return index, int(rows[0][1])

    def rss_kb(self) -> list[int | None]:
        return [rss_kb(p.pid) for p in self.procs]

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def read_cpu(self) -> None:
        self.cpu_s = [proc_cpu_s(p.pid) for p in self.procs]
        self.pg_cpu_s = self.pg.cpu_s() if self.pg is not None else None

    # ---- after the run ----------------------------------------------------------------
    def db_checks(self) -> dict[str, Any] | None:
        """Duplicates as the database sees them (PostgreSQL: the replicas' shared store):
        rewards the strategy counted vs feedback rows (a feedback applied twice, or by
        two replicas, shows here), agents in two directives of one round, profiles
        stored twice for one agent and round."""
        if self.store != "postgresql":
            return None
        db = self._pg().db
        state, n_feedback = db.execute("SELECT (SELECT state FROM bandit_state WHERE id = 1), "
                                       "(SELECT count(*) FROM feedback)").fetchall()[0]
        doc = json.loads(state) if state else {}
        rewards = int(doc["z"]["n"]) if isinstance(doc.get("z"), dict) and "n" in doc["z"] else None
        twice = db.execute("SELECT count(*) FROM (SELECT round, p FROM (SELECT round, teacher AS p FROM directives "
                           "UNION ALL SELECT round, student FROM directives) x GROUP BY round, p "
                           "HAVING count(*) > 1) y").fetchall()[0][0]
        dup_profiles = db.execute("SELECT count(*) FROM (SELECT peer_id, round FROM profiles GROUP BY peer_id, round "
                                  "HAVING count(*) > 1) y").fetchall()[0][0]
        _, epoch = self.lease()
        return {"rewards_counted": rewards, "feedback_rows": int(n_feedback), "agents_in_two_directives": int(twice),
                "profiles_stored_twice": int(dup_profiles), "lease_epoch": epoch}

    def replica_report(self, rss: list[list[tuple[int, int]]], final_kb: list[int | None]) -> list[dict[str, Any]]:
        """Per replica: CPU seconds, what its log says it ingested and ran, memory."""
        out = []
        for i, home in enumerate(self.homes):
            text = (self.dir / f"{home.name}.log").read_text(errors="replace")
            matched = sorted(int(e["round"]) for e in log_events(text, "cpm.round.matched"))
            out.append({
                "cpu_s": round(self.cpu_s[i], 1) if self.cpu_s[i] is not None else None,
                "profiles_ingested": len(log_events(text, "cpm.profile.accepted")),
                "feedback_ingested": len(log_events(text, "cpm.feedback.recorded")),
                "rounds_matched": len(matched),
                "rounds_closed": len(log_events(text, "cpm.round.closed")),
                "lease_acquired": len(log_events(text, "cpm.lease.acquired")),
                "lease_lost": len(log_events(text, "cpm.lease.lost")),
                "rss_mb": rss_summary(rss[i], final_kb[i]),
                "exit": self.procs[i].returncode,
            })
        return out

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for log in self._logs:
            log.close()
        self._logs = []

    def close(self) -> None:
        """After the report: the observer connection and the PostgreSQL server."""
        if self._observer is not None:
            self._observer.close()
            self._observer = None
        if self.pg is not None:
            self.pg.stop()
            self.pg = None


def rss_summary(samples: list[tuple[int, int]], final_kb: int | None = None) -> dict[str, Any]:
    """RSS per round (the last sample while that round was the latest) → first round,
    the middle, last, max, final, and growth over the second half (bounded memory)."""
    per_round: dict[int, int] = {}
    for rnd, kb in samples:
        per_round[rnd] = kb
    series = [per_round[k] for k in sorted(per_round) if k > 0]
    half = series[len(series) // 2:] if series else []

    def mb(kb: int | None) -> float | None:
        return round(kb / 1024, 1) if kb else None

    return {"first_round": mb(series[0]) if series else None, "mid": mb(half[0]) if half else None,
            "last": mb(series[-1]) if series else None, "max": mb(max(series)) if series else None,
            "final": mb(final_kb), "growth_second_half_mb": round((max(half) - half[0]) / 1024, 1) if half else None}
