"""A federation of real ``knexa-cpm`` and ``knexad`` subprocesses on 127.0.0.1 for
fault injection: start, ``kill -9``, ``SIGSTOP``, restart on the same port, read the
JSON log events and the CPM database. Every process runs in its own process group and
the ``federation`` fixture kills all groups at teardown (SIGCONT first, so a stopped one
dies too)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.procs import CPM, KNEXAD, REPO, Proc  # noqa: F401  (re-exported to the fault tests)
from tests.e2e.procs import FAST_ENV as BASE_FAST_ENV

FAST_ENV = {**BASE_FAST_ENV, "KNEXA_TIMEOUTS_TEACH_S": "5", "OMP_NUM_THREADS": "1"}
# the longest a student can wait on a vanished teacher: lookup + dial + first chunk (step + teach)
STUDENT_DEADLINE_S = 5 + 4 + 5 + 5


def ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def run_cli(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


class Fed:
    """``n`` synthetic daemons (one population of size ``n``) and one CPM."""

    def __init__(self, tmp: Path, n: int, seed: int = 0) -> None:
        self.tmp, self.n, self.seed = tmp, n, seed
        self.cpm_home = tmp / "cpm"
        self.cpm: Proc | None = None
        self.cpm_addr = ""
        self.procs: list[Proc] = []
        self.peers: list[str] = []
        self.daemons: dict[int, Proc] = {}
        self._starts: dict[str, int] = {}

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        k = self._starts[name] = self._starts.get(name, 0) + 1
        p = Proc(f"{name}.{k}", argv, self.tmp, env)
        self.procs.append(p)
        return p

    def init(self, *cpm_args: str) -> None:
        from knexad.agents import build_agent
        from knexad.config import AgentSection, DaemonConfig
        from protocol.envelope import Identity

        th = build_agent(DaemonConfig(cpm=f"/ip4/127.0.0.1/tcp/1/p2p/{Identity.generate().peer_id}",
                                      agent=AgentSection(n_agents=self.n, seed=self.seed))).transfer_set_hash()
        r = run_cli([*CPM, "init", "--home", str(self.cpm_home), "--transfer-hash", th, "--open", *cpm_args])
        assert r.returncode == 0, r.stderr

    def start_cpm(self, port: str | None = None) -> str:
        ready = self.tmp / "cpm.ready"
        ready.unlink(missing_ok=True)
        argv = [*CPM, "serve", "--home", str(self.cpm_home), "--ready-file", str(ready), "--log-format", "json"]
        if port:
            argv += ["--listen", f"/ip4/127.0.0.1/tcp/{port}"]
        self.cpm = self._spawn("cpm", argv)
        doc = self.wait_for(lambda: _read_json(ready), 60, "CPM ready")
        self.cpm_addr = doc["addrs"][0]
        return self.cpm_addr

    @property
    def cpm_port(self) -> str:
        return self.cpm_addr.split("/tcp/")[1].split("/")[0]

    def init_daemons(self) -> None:
        for i in range(self.n):
            home = self.tmp / f"d{i}"
            r = run_cli([*KNEXAD, "init", "--home", str(home), "--cpm", self.cpm_addr, "--agent-index", str(i),
                         "--n-agents", str(self.n), "--seed", str(self.seed), "--org", f"org{i}"])
            assert r.returncode == 0, r.stderr
            self.peers.append(run_cli([*KNEXAD, "peer-id", "--home", str(home)]).stdout.strip())

    def start_daemon(self, i: int) -> Proc:
        p = self._spawn(f"d{i}", [*KNEXAD, "run", "--home", str(self.tmp / f"d{i}"), "--log-format", "json"],
                        FAST_ENV)
        self.daemons[i] = p
        return p

    def db(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        con = sqlite3.connect(f"file:{self.cpm_home / 'cpm.db'}?mode=ro", uri=True, timeout=10)
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()

    def all_events(self, prefix: str, name: str) -> list[dict[str, Any]]:
        """Events ``name`` from every incarnation of processes named ``prefix``."""
        return [e for p in self.procs if p.name.split(".")[0] == prefix for e in p.events(name)]

    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.2)
        tails = "\n".join(f"--- {p.name} ---\n" + p.err.read_text(errors="replace")[-2500:] for p in self.procs[-8:])
        pytest.fail(f"timed out waiting for {what}\n{tails}")

    def cleanup(self) -> None:
        for p in self.procs:
            if p.popen.poll() is None:
                try:
                    os.killpg(p.popen.pid, signal.SIGCONT)
                    os.killpg(p.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.popen.wait(timeout=30)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Callable[[int], Fed]]:
    feds: list[Fed] = []

    def make(n: int, seed: int = 0) -> Fed:
        fed = Fed(tmp_path, n, seed)
        feds.append(fed)
        return fed

    yield make
    for fed in feds:
        fed.cleanup()
