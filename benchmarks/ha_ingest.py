"""HA ingest cost: signed profiles/s and CPU per profile, SQLite node vs PostgreSQL replicas.

    python -m benchmarks.ha_ingest [--profiles 2000] [--clients 16] [--rounds 3] [--json]
    python -m benchmarks.ha_ingest --quick --json          # the test's size

Why this exists (issue #18): replicas on one PostgreSQL store buy availability; this
measures what they cost per ingested profile, and whether a second replica adds
throughput, against the single SQLite node, in one invocation on one machine. Each
configuration runs real ``knexa-cpm serve`` processes (py-libp2p, Noise + yamux, INFO
logs as JSON to a file) started from fresh homes:

* ``sqlite`` — one node, the home's SQLite store (the default deployment);
* ``pg1`` — one ``serve --lease`` replica on a fresh PostgreSQL database (it holds the
  lease: the HA code path with nobody to share it);
* ``pg2`` — two ``serve --lease`` replicas on one fresh database with one identity key
  (as ``benchmarks.failover`` starts them); client ``i`` uses replica ``i % 2``, so
  the clients are split evenly.

The PostgreSQL server is one throwaway server (``benchmarks.pgserver``, durable
defaults) for the whole run, on the same cores. The clients are ``benchmarks.ingest``'s:
``--clients`` agents in one driver subprocess, each with its own identity, host and
connection, admitted, ``Register`` then sealed ``Profile`` envelopes on one kept-open
stream, ``--pipeline`` in flight (default 1), every ``Ack`` checked (CPM signature,
``ref``). Configurations are interleaved (``sqlite, pg1, pg2`` × ``--rounds``) and the
report gives medians per configuration, so a change of machine load hits all of them.

Measured from "go" to the driver's end, per trial: acked profiles per wall second (all,
and per replica: the profiles its clients got acked); CPU µs per profile of each replica
process (``/proc/<pid>/stat`` utime + stime, per profile *it* acked), of the PostgreSQL
server (the postmaster, its live children and the children it reaped), and of the
client driver (its own ``getrusage``); and for ``pg*``, from ``pg_stat_activity``
sampled every 50 ms, the share of samples in which a replica's backend waited for a
lock (the store's one-writer advisory lock: ``cpm.pgdb``).

Checked per trial (a failure makes the run fail): every profile sent was acked; the
replicas' ``cpm.profile.accepted`` log lines count each acked profile exactly once, on
the replica its client used; and the database, read afterwards, holds one round-1
profile per client, the last one it got an Ack for. Results in docs/performance.md
("HA ingest (PostgreSQL replicas)").
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.failover import CPM, REPO, Proc
from benchmarks.ingest import client_seed

CONFIGS = ("sqlite", "pg1", "pg2")
REPLICAS = {"sqlite": 1, "pg1": 1, "pg2": 2}
LEASE_S = 5.0
SAMPLE_S = 0.05  # pg_stat_activity sampling period


class BenchError(AssertionError):
    """A trial did not run or its counts do not add up (with what was seen)."""


# ------------------------------------------------------------------------------ CPU (/proc)


def _stat(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (index 0 = state)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def proc_cpu_s(pid: int) -> float:
    """utime + stime of one process, all its threads."""
    f = _stat(pid)
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds all cores spent not idle so far (/proc/stat): with our processes'
    own CPU, what the other jobs on this shared machine took meanwhile."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


# ------------------------------------------------------------------------ the CPM processes


class Node:
    """One configuration's CPM processes on fresh homes (and, for ``pg*``, a fresh
    database): ``setup()`` → ``start()`` → … → ``stop()``."""

    def __init__(self, work: Path, config: str, url: str | None, clients: int, transfer_hash: str) -> None:
        self.dir, self.config, self.url, self.clients = work, config, url, clients
        self.transfer_hash = transfer_hash
        self.n = REPLICAS[config]
        self.procs: list[Proc] = []
        self.homes = [work / f"cpm{i}" for i in range(self.n)]
        self.location = url if url is not None else f"sqlite:{self.homes[0] / 'cpm.db'}"

    def _cli(self, argv: list[str]) -> str:
        r = subprocess.run([*CPM, *argv], cwd=REPO, capture_output=True, text=True, timeout=180)
        if r.returncode != 0:
            raise BenchError(f"knexa-cpm {argv[0]} exited {r.returncode}: {r.stderr[-2000:]}")
        return r.stdout

    def setup(self) -> None:
        """``knexa-cpm init`` per home (replica 1 gets replica 0's key), the ingest
        settings of ``benchmarks.ingest`` in config.toml (the round never matches: every
        profile is ingest; no per-peer rate cap: a few clients stand in for many agents),
        and the clients admitted."""
        import shutil

        from cpm.config import load_config, save_config
        from cpm.store import open_store
        from protocol.envelope import Identity

        for i, home in enumerate(self.homes):
            if i > 0:
                home.mkdir(parents=True)
                shutil.copy2(self.homes[0] / "identity.key", home / "identity.key")
            self._cli(["init", "--home", str(home), "--closed", "--transfer-hash", self.transfer_hash,
                       "--strategy", "random", "--min-agents", str(self.clients + 1), "--round-timer", "86400",
                       "--listen", "/ip4/127.0.0.1/tcp/0", *(["--store", self.url] if self.url else [])])
            cfg = load_config(home)
            cfg.request_timeout_s, cfg.active_window_s, cfg.rate_limit_per_s = 60.0, 86_400.0, 0.0
            save_config(home, cfg)
        store = open_store(self.location)
        try:
            with store.transaction():
                for i in range(self.clients):
                    store.admit(Identity(client_seed(i)).peer_id, "bench", 1)
        finally:
            store.close()

    def start(self) -> list[str]:
        """Start the processes one after the other (replica 0 first: it takes the lease
        and opens round 1); returns one address per process."""
        addrs = []
        for i, home in enumerate(self.homes):
            ready = self.dir / f"cpm{i}.ready"
            lease = ["--lease", str(LEASE_S)] if self.url else []
            p = Proc(f"cpm{i}", [*CPM, "serve", "--home", str(home), "--log-format", "json",
                                 "--ready-file", str(ready), *lease], self.dir)
            self.procs.append(p)
            deadline = time.monotonic() + 180
            while not ready.exists():
                if not p.alive() or time.monotonic() > deadline:
                    raise BenchError(f"cpm{i} not ready: {p.err.read_text(errors='replace')[-2000:]}")
                time.sleep(0.05)
            addrs.append(json.loads(ready.read_text())["addrs"][0])
        return addrs

    def pids(self) -> list[int]:
        return [p.popen.pid for p in self.procs]

    def stop(self) -> None:
        for p in self.procs:
            p.stop()

    def accepted(self) -> list[collections.Counter[str]]:
        """Per process: how many ``cpm.profile.accepted`` lines each peer got."""
        return [collections.Counter(str(e["peer"]) for e in p.events("cpm.profile.accepted")) for p in self.procs]

    def holder(self) -> int | None:
        """Which process logged taking the round lease (None: a single node)."""
        for i, p in enumerate(self.procs):
            if p.events("cpm.lease.acquired"):
                return i
        return None

    def stored(self) -> dict[str, float]:
        """Round-1 profiles in the store, read afterwards: peer → the vector's sequence
        number (``benchmarks.ingest._vector``)."""
        from cpm.store import open_store

        store = open_store(self.location, readonly=True)
        try:
            return {r["peer_id"]: r["vector"][1] for r in store.list_profiles(1)}
        finally:
            store.close()


class LockSampler:
    """``pg_stat_activity`` of the store's database every ``SAMPLE_S`` on its own
    connection: how often a backend waited for a lock (the write lock) or was idle in
    an open transaction (a batch waiting for its window or its Ack round trip)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.samples = self.lock_waits = self.idle_in_tx = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LockSampler:
        # an observer's read-only store (autocommit: each sample sees fresh statistics);
        # its connection, not a driver import here: the store seam (test_store_contract)
        from cpm.store import open_store

        self._store = open_store(self.url, readonly=True)
        self.backend_pid = self._store.db.backend_pid()  # type: ignore[attr-defined]  # its CPU leaves the server's
        self._thread.start()
        return self

    def _run(self) -> None:
        sql = ("SELECT count(*) FILTER (WHERE wait_event_type = 'Lock'), "
               "count(*) FILTER (WHERE state = 'idle in transaction') FROM pg_stat_activity "
               "WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'")
        while not self._stop.wait(SAMPLE_S):
            waits, idle = self._store.db.execute(sql).fetchone()  # type: ignore[attr-defined]
            self.samples += 1
            self.lock_waits += int(waits > 0)
            self.idle_in_tx += int(idle > 0)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._store.close()

    def result(self) -> dict[str, Any]:
        n = max(self.samples, 1)
        return {"samples": self.samples, "lock_wait_share": round(self.lock_waits / n, 3),
                "idle_in_tx_share": round(self.idle_in_tx / n, 3)}


# ------------------------------------------------------------------------------ one trial


def _us(seconds: float, n: int) -> float:
    return round(seconds / max(n, 1) * 1e6, 1)


def _verify(node: Node, res: dict[str, Any], profiles: int, clients: int) -> dict[str, Any]:
    """Acked = sent; each acked profile logged accepted exactly once, on its client's
    replica; the store holds each client's last acked profile."""
    from protocol.envelope import Identity

    peers = [Identity(client_seed(i)).peer_id for i in range(clients)]
    acked_by = {i: int(res["last_acked"].get(str(i), 0)) for i in range(clients)}
    accepted = node.accepted()
    stored = node.stored()
    wrong_replica = sum(n for r, counts in enumerate(accepted) for p, n in counts.items()
                        if p in peers and peers.index(p) % node.n != r)
    logged_twice_or_missing = sum(1 for i, p in enumerate(peers)
                                  if sum(c[p] for c in accepted) != acked_by[i])
    last_ack_missing = sum(1 for i, p in enumerate(peers) if stored.get(p) != float(acked_by[i]))
    checks = {"sent": profiles, "acked": res["acked"], "acked_sum_clients": sum(acked_by.values()),
              "accepted_logged": sum(sum(c.values()) for c in accepted), "stored_rows": len(stored),
              "clients_miscounted": logged_twice_or_missing, "accepted_on_other_replica": wrong_replica,
              "last_ack_missing": last_ack_missing}
    checks["ok"] = (res["acked"] == profiles == checks["acked_sum_clients"] == checks["accepted_logged"]
                    and len(stored) == clients and logged_twice_or_missing == 0 and wrong_replica == 0
                    and last_ack_missing == 0)
    return checks


def trial(config: str, work: Path, server: Any, profiles: int, clients: int, pipeline: int,
          transfer_hash: str) -> dict[str, Any]:
    """One configuration on fresh homes (and database): start, drive, measure, stop, check."""
    url = server.create_database(f"ha_{config}") if config != "sqlite" else None
    node = Node(work, config, url, clients, transfer_hash)
    node.setup()
    sampler: LockSampler | None = None
    try:
        addrs = node.start()
        # benchmarks.ingest's driver: client i on addrs[i % len(addrs)]
        cmd = [sys.executable, "-m", "benchmarks.ingest", "--driver", "--profiles", str(profiles),
               "--clients", str(clients), "--pipeline", str(pipeline), "--transfer-hash", transfer_hash,
               "--cpm", ",".join(addrs)]
        drv = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=(work / "driver.err").open("wb"))
        try:
            line = drv.stdout.readline()  # type: ignore[union-attr]
            if line.strip() != b"ready":
                raise BenchError(f"driver not ready (rc {drv.wait()}): "
                                 f"{(work / 'driver.err').read_text(errors='replace')[-2000:]}")
            if url is not None:
                sampler = LockSampler(url).__enter__()
            pids = node.pids()
            cpu0 = [proc_cpu_s(p) for p in pids]
            pg0 = server.cpu_s() if server is not None else 0.0
            own0 = proc_cpu_s(sampler.backend_pid) if sampler else 0.0
            busy0 = machine_busy_s()
            drv.stdin.write(b"go\n")  # type: ignore[union-attr]
            drv.stdin.flush()  # type: ignore[union-attr]
            out = drv.stdout.read()  # type: ignore[union-attr]
            rc = drv.wait(timeout=600)
            busy = machine_busy_s() - busy0
            cpu = [proc_cpu_s(p) - c for p, c in zip(pids, cpu0)]
            own = proc_cpu_s(sampler.backend_pid) - own0 if sampler else 0.0
            pg = (server.cpu_s() - pg0 - own) if server is not None else 0.0
        finally:
            if drv.poll() is None:
                drv.kill()
                drv.wait()
            if sampler is not None:
                sampler.__exit__(None, None, None)
        if rc != 0:
            raise BenchError(f"driver failed (rc {rc}): {(work / 'driver.err').read_text(errors='replace')[-2000:]}")
        res = json.loads(out.decode().strip().splitlines()[-1])
    finally:
        node.stop()
    checks = _verify(node, res, profiles, clients)
    wall = res["t_end"] - res["t_start"]
    acked = res["acked"]
    holder = node.holder()
    per = []
    for r, c in enumerate(cpu):
        mine = sum(v for k, v in res["last_acked"].items() if int(k) % node.n == r)
        per.append({"replica": r, "lease_holder": holder == r, "acked": mine,
                    "profiles_per_s": round(mine / wall, 1) if wall > 0 else 0.0, "cpu_s": round(c, 3),
                    "cpu_us_per_profile": _us(c, mine),
                    "cpu_bound_per_s": round(mine / c, 1) if c > 0 else 0.0,
                    "cpu_share_of_wall": round(c / wall, 3) if wall > 0 else 0.0})
    total_cpu = sum(cpu) + pg + res["client_cpu_s"]
    out_: dict[str, Any] = {
        "config": config, "replicas": node.n, "acked": acked, "wall_s": round(wall, 3),
        "profiles_per_s": round(acked / wall, 1) if wall > 0 else 0.0, "per_replica": per,
        "replicas_cpu_us_per_profile": _us(sum(cpu), acked), "pg_cpu_us_per_profile": _us(pg, acked),
        "client_cpu_us_per_profile": _us(res["client_cpu_s"], acked),
        "server_cpu_us_per_profile": _us(sum(cpu) + pg, acked),
        "total_cpu_us_per_profile": _us(total_cpu, acked),
        "cores_busy": round(total_cpu / wall, 2) if wall > 0 else 0.0,
        # the whole machine over the same window (the driver's exit included), and the rest of it
        "machine_cores_busy": round(busy / wall, 2) if wall > 0 else 0.0,
        "others_cores_busy": round(max(busy - total_cpu, 0.0) / wall, 2) if wall > 0 else 0.0,
        "checks": checks, "verified": checks["ok"]}
    if sampler is not None:
        out_["pg_activity"] = sampler.result()
    return out_


# ------------------------------------------------------------------------------ the run


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 1)


def summarize(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per configuration over its trials (and per replica index)."""
    out: dict[str, Any] = {}
    for config in dict.fromkeys(t["config"] for t in trials):
        ts = [t for t in trials if t["config"] == config]
        s: dict[str, Any] = {"trials": len(ts), "verified": all(t["verified"] for t in ts)}
        for key in ("profiles_per_s", "replicas_cpu_us_per_profile", "pg_cpu_us_per_profile",
                    "client_cpu_us_per_profile", "server_cpu_us_per_profile", "total_cpu_us_per_profile",
                    "cores_busy", "machine_cores_busy", "others_cores_busy"):
            s[key] = _median([t[key] for t in ts])
            s[f"{key}_range"] = [min(t[key] for t in ts), max(t[key] for t in ts)]
        s["per_replica"] = [{key: _median([t["per_replica"][r][key] for t in ts])
                             for key in ("profiles_per_s", "cpu_us_per_profile", "cpu_bound_per_s",
                                         "cpu_share_of_wall")}
                            | {"lease_holder_in": sum(t["per_replica"][r]["lease_holder"] for t in ts)}
                            for r in range(REPLICAS[config])]
        if "pg_activity" in ts[0]:
            s["lock_wait_share"] = round(statistics.median(t["pg_activity"]["lock_wait_share"] for t in ts), 3)
            s["idle_in_tx_share"] = round(statistics.median(t["pg_activity"]["idle_in_tx_share"] for t in ts), 3)
        out[config] = s
    base = out.get("sqlite", {}).get("profiles_per_s")
    for config, s in out.items():
        if base and config != "sqlite":
            s["rate_vs_sqlite"] = round(s["profiles_per_s"] / base, 2)
    if out.get("pg1", {}).get("profiles_per_s") and "pg2" in out:
        out["pg2"]["rate_vs_pg1"] = round(out["pg2"]["profiles_per_s"] / out["pg1"]["profiles_per_s"], 2)
    return out


def run(profiles: int = 2000, clients: int = 16, rounds: int = 3, pipeline: int = 1,
        configs: tuple[str, ...] = CONFIGS, server: Any = None, progress: Any = None) -> dict[str, Any]:
    """``rounds`` × ``configs``, interleaved. ``server``: a started ``PgServer`` (the
    test passes its session server); else one is started and stopped here."""
    from cpm.config import default_transfer_hash

    own = None
    if server is None and any(c != "sqlite" for c in configs):
        from benchmarks.pgserver import PgServer

        server = own = PgServer().start()
    report: dict[str, Any] = {"profiles": profiles, "clients": clients, "rounds": rounds, "pipeline": pipeline,
                              "configs": list(configs), "lease_s": LEASE_S, "cpus": os.cpu_count(),
                              "nice": os.nice(0), "load_avg_before": os.getloadavg(), "trials": []}
    thash = default_transfer_hash()
    try:
        with tempfile.TemporaryDirectory(prefix="knexa-ha-ingest-") as tmp:
            for rnd in range(rounds):
                for config in configs:
                    work = Path(tmp) / f"{rnd}-{config}"
                    work.mkdir()
                    t = trial(config, work, server, profiles, clients, pipeline, thash)
                    t["round"], t["load_avg"] = rnd, os.getloadavg()[0]
                    report["trials"].append(t)
                    if progress is not None:
                        progress(t)
    finally:
        if own is not None:
            own.stop()
    report["load_avg_after"] = os.getloadavg()
    report["summary"] = summarize(report["trials"])
    report["verified"] = all(t["verified"] for t in report["trials"])
    return report


def _print_table(rep: dict[str, Any]) -> None:
    print(f"HA ingest: {rep['clients']} clients, {rep['profiles']} profiles per trial, W = {rep['pipeline']}, "
          f"{rep['rounds']} rounds interleaved, medians; load avg {rep['load_avg_before'][0]:.2f} → "
          f"{rep['load_avg_after'][0]:.2f}, nice {rep['nice']}")
    print(f"{'config':7} {'profiles/s':>10} {'per replica/s':>15} {'replica CPU µs/p':>18} {'PG CPU µs/p':>12} "
          f"{'client µs/p':>12} {'cores busy':>11} {'others':>7} {'lock wait':>10}  verified")
    for config, s in rep["summary"].items():
        per = " / ".join(str(r["profiles_per_s"]) for r in s["per_replica"])
        cpu = " / ".join(str(r["cpu_us_per_profile"]) for r in s["per_replica"])
        print(f"{config:7} {s['profiles_per_s']:>10} {per:>15} {cpu:>18} {s['pg_cpu_us_per_profile']:>12} "
              f"{s['client_cpu_us_per_profile']:>12} {s['cores_busy']:>11} {s['others_cores_busy']:>7} "
              f"{s.get('lock_wait_share', '—'):>10}  "
              f"{s['verified']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profiles", type=int, default=2000, help="profiles per trial (all clients together)")
    ap.add_argument("--clients", type=int, default=16, help="agents, each with its own host and identity")
    ap.add_argument("--rounds", type=int, default=3, help="times each configuration runs (interleaved)")
    ap.add_argument("--pipeline", type=int, default=1, help="requests in flight per agent")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    ap.add_argument("--quick", action="store_true", help="4 clients, 60 profiles, 1 round (the test)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    if args.quick:
        args.clients, args.profiles, args.rounds = 4, 60, 1
    configs = tuple(c for c in args.configs.split(",") if c)
    if any(c not in CONFIGS for c in configs) or min(args.profiles, args.clients, args.rounds, args.pipeline) < 1:
        ap.error(f"--configs must be a subset of {','.join(CONFIGS)}; counts must be ≥ 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    def progress(t: dict[str, Any]) -> None:
        print(f"round {t['round']} {t['config']}: {t['profiles_per_s']} profiles/s, replicas "
              f"{[r['cpu_us_per_profile'] for r in t['per_replica']]} µs/p, PG {t['pg_cpu_us_per_profile']} µs/p, "
              f"verified {t['verified']}", file=sys.stderr, flush=True)

    rep = run(args.profiles, args.clients, args.rounds, args.pipeline, configs, progress=progress)
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        _print_table(rep)
    return 0 if rep["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
