"""knexad end to end: a real CPM node and real daemon subprocesses on 127.0.0.1.

What an operator relies on: one full round (profile → directive → encrypted exchange →
feedback stored at the CPM, which never holds package bytes); a CPM killed with -9 and
restarted loses no feedback and counts it once; SIGINT/SIGTERM exit 0 with the
checkpoint saved; an unadmitted daemon exits 5 with the admit command; an unreachable
CPM exits 4 when the operator set a give-up time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from protocol.ids import EXCHANGE_PROTOCOL_1_1
from tests.e2e.procs import CPM, FAST_ENV, KNEXAD, REPO, Proc

SYNTHETIC_MARKERS = (b"# syn c=", b"transform_")  # text only a SyntheticAgent package holds


@pytest.fixture
def spawn(tmp_path: Path):
    procs: list[Proc] = []

    def _spawn(name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        p = Proc(name, argv, tmp_path, env)
        procs.append(p)
        return p

    yield _spawn
    for p in procs:
        if p.popen.poll() is None:
            try:
                os.killpg(p.popen.pid, signal.SIGCONT)
                os.killpg(p.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.popen.wait(timeout=30)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, procs: tuple[Proc, ...] = ()) -> Any:
    """Poll until ``predicate()`` is truthy; on timeout fail with the processes' logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    tails = "\n".join(f"--- {p.name} ---\n" + p.err.read_text(errors="replace")[-3000:] for p in procs)
    pytest.fail(f"timed out waiting for {what}\n{tails}")


def run_cli(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def transfer_hash(n_agents: int, seed: int) -> str:
    from knexad.agents import build_agent
    from knexad.config import AgentSection, DaemonConfig
    from protocol.envelope import Identity

    cfg = DaemonConfig(cpm=f"/ip4/127.0.0.1/tcp/1/p2p/{Identity.generate().peer_id}",
                       agent=AgentSection(n_agents=n_agents, seed=seed))
    return build_agent(cfg).transfer_set_hash()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_ready(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class Federation:
    def __init__(self, tmp: Path, spawn: Callable[..., Proc], *, seed: int = 0) -> None:
        self.tmp, self.spawn, self.seed = tmp, spawn, seed
        self.cpm_home = tmp / "cpm"
        self.cpm: Proc | None = None
        self.cpm_addr = ""

    def init_cpm(self, *extra: str, thash: str | None = None) -> None:
        thash = thash or transfer_hash(2, self.seed)
        r = run_cli([*CPM, "init", "--home", str(self.cpm_home), "--transfer-hash", thash,
                     "--round-timer", "30", *extra])
        assert r.returncode == 0, r.stderr

    def start_cpm(self, listen: str | None = None, name: str = "cpm") -> str:
        ready = self.tmp / f"{name}.ready"
        argv = [*CPM, "serve", "--home", str(self.cpm_home), "--ready-file", str(ready), "--log-format", "json"]
        if listen:
            argv += ["--listen", listen]
        self.cpm = self.spawn(name, argv)
        doc = wait_for(lambda: read_ready(ready), 60, f"{name} ready file", (self.cpm,))
        self.cpm_addr = doc["addrs"][0]
        return self.cpm_addr

    def init_daemon(self, index: int, env: dict[str, str] | None = None) -> tuple[Path, str]:
        home = self.tmp / f"d{index}"
        r = run_cli([*KNEXAD, "init", "--home", str(home), "--cpm", self.cpm_addr, "--agent-index", str(index),
                     "--n-agents", "2", "--seed", str(self.seed), "--org", f"org{index}"], env)
        assert r.returncode == 0, r.stderr
        peer = run_cli([*KNEXAD, "peer-id", "--home", str(home)]).stdout.strip()
        return home, peer

    def start_daemon(self, index: int, env: dict[str, str] | None = None) -> Proc:
        home = self.tmp / f"d{index}"
        ready = self.tmp / f"d{index}.ready"
        return self.spawn(f"d{index}", [*KNEXAD, "run", "--home", str(home), "--ready-file", str(ready),
                                        "--log-format", "json"], {**FAST_ENV, **(env or {})})

    def pairs(self) -> list[dict[str, Any]]:
        r = run_cli([*CPM, "pairs", "--home", str(self.cpm_home), "--json"])
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def status(self, index: int) -> dict[str, Any]:
        r = run_cli([*KNEXAD, "status", "--home", str(self.tmp / f"d{index}"), "--json"])
        assert r.returncode == 0, r.stdout + r.stderr
        return json.loads(r.stdout)


def test_one_full_round_then_clean_shutdown(tmp_path: Path, spawn) -> None:
    fed = Federation(tmp_path, spawn)
    fed.init_cpm("--open", "--max-rounds", "1")
    fed.start_cpm()
    peers = [fed.init_daemon(i)[1] for i in range(2)]
    metrics_port = free_port()
    daemons = [fed.start_daemon(0, {"KNEXA_METRICS_PORT": str(metrics_port)}), fed.start_daemon(1)]
    everyone = (fed.cpm, *daemons)

    for i, d in enumerate(daemons):
        ready = wait_for(lambda i=i: read_ready(tmp_path / f"d{i}.ready"), 60, f"d{i} ready", everyone)
        assert ready["peer_id"] == peers[i] and ready["addrs"][0].endswith(f"/p2p/{peers[i]}")
        # the multiaddr is printed on stdout too
        wait_for(lambda d=d, a=ready["addrs"][0]: a in d.out.read_text(), 10, "stdout multiaddr", everyone)

    rows = wait_for(lambda: [r for r in fed.pairs() if r["ok"] is not None], 90, "feedback at the CPM", everyone)
    assert len(rows) == 1
    row = rows[0]
    assert row["round"] == 1 and row["ok"] is True and row["state"] == "used"
    assert {row["teacher"], row["student"]} == set(peers)
    assert row["loss_pre"] > 0 and row["loss_post"] > 0 and row["kb"] > 1

    # the CPM is non-aggregating: its database never held package bytes
    for f in fed.cpm_home.iterdir():
        if f.is_file():
            data = f.read_bytes()
            assert not any(m in data for m in SYNTHETIC_MARKERS), f"package bytes in {f.name}"

    t, s = peers.index(row["teacher"]), peers.index(row["student"])
    teacher = wait_for(lambda: (st := fed.status(t))["taught"] == 1 and st, 20, "teacher status", everyone)
    student = wait_for(lambda: (st := fed.status(s))["outbox_size"] == 0 and st["learned"] == 1 and st,
                       20, "student status", everyone)
    assert student["peers"][row["teacher"]]["bytes_in"] > row["kb"] * 1024 * 0.9
    assert teacher["peers"][row["student"]]["bytes_out"] > 0
    assert student["last_feedback"]["directive"] == row["directive_id"] and student["last_feedback"]["ok"]
    received = daemons[s].events("exchange.package.received")
    assert received and daemons[t].events("exchange.package.sent")
    assert received[0]["protocol"] == EXCHANGE_PROTOCOL_1_1  # both daemons serve and offer 1.1.0
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    assert f'knexad_taught_total {float(t == 0)}' in metrics and "knexad_exchange_bytes" in metrics

    # SIGINT and SIGTERM: exit 0, checkpoint flushed, status "stopped"
    daemons[0].signal(signal.SIGINT)
    daemons[1].signal(signal.SIGTERM)
    assert [d.wait(60) for d in daemons] == [0, 0]
    for i in range(2):
        st = fed.status(i)
        assert st["status"] == "stopped" and st["alive"] is False
        assert (tmp_path / f"d{i}" / "checkpoint" / "synthetic_agent.json").exists()


def _stronger_index(seed: int) -> int:
    """Which agent the CPM's ``heuristic`` strategy makes the teacher (better pass@1)."""
    from knexad.synthetic import make_population

    from knexad.agents import SYNTHETIC_ALPHA

    p1 = [agent.profile()[8] for agent in make_population(2, alpha=SYNTHETIC_ALPHA, seed=seed)]
    assert p1[0] != p1[1]
    return 0 if p1[0] > p1[1] else 1


def test_cpm_kill9_restart_delivers_queued_feedback_exactly_once(tmp_path: Path, spawn) -> None:
    seed = 0
    fed = Federation(tmp_path, spawn, seed=seed)
    fed.init_cpm("--open", "--max-rounds", "1", "--strategy", "heuristic")
    addr = fed.start_cpm()
    port = addr.split("/tcp/")[1].split("/")[0]
    t_idx = _stronger_index(seed)
    s_idx = 1 - t_idx
    t_peer = fed.init_daemon(t_idx)[1]
    s_home, s_peer = fed.init_daemon(s_idx)

    # the teacher profiles first, then freezes (SIGSTOP): the student will be matched
    # with it, find it unresponsive, and have to report a failure …
    teacher = fed.start_daemon(t_idx)
    wait_for(lambda: teacher.events("cpm.profile.accepted"), 60, "teacher profile", (fed.cpm, teacher))
    time.sleep(0.5)  # its DirectiveRequest long-poll is now parked at the CPM
    teacher.signal(signal.SIGSTOP)
    student = fed.start_daemon(s_idx)
    everyone = (fed.cpm, teacher, student)
    directive = wait_for(lambda: student.events("cpm.directive.received"), 60, "student directive", everyone)[0]
    assert (directive["teacher"], directive["student"]) == (t_peer, s_peer)

    # … while the CPM is dead (kill -9): the Feedback must wait in the durable outbox
    fed.cpm.signal(signal.SIGKILL)
    fed.cpm.wait(30)
    wait_for(lambda: student.events("cpm.feedback.retry"), 60, "feedback send failing", everyone)
    assert list((s_home / "outbox").glob("*.fb")), "feedback was not queued on disk"
    assert student.events("exchange.failed")[0]["error"] == "peer_unavailable"

    teacher.signal(signal.SIGCONT)
    fed.start_cpm(listen=f"/ip4/127.0.0.1/tcp/{port}", name="cpm2")
    everyone = (fed.cpm, teacher, student)
    rows = wait_for(lambda: [r for r in fed.pairs() if r["ok"] is not None], 90, "feedback after restart", everyone)
    assert len(rows) == 1 and rows[0]["directive_id"] == directive["directive"]
    assert rows[0]["ok"] is False and rows[0]["state"] == "failed"
    wait_for(lambda: not list((s_home / "outbox").glob("*.fb")), 30, "outbox drained", everyone)

    acked = [e for e in student.events("cpm.feedback.acked") if e["directive"] == directive["directive"]]
    recorded = [e for e in fed.cpm.events("cpm.feedback.recorded") if e["directive"] == directive["directive"]]
    assert len(acked) == 1 and len(recorded) == 1
    # acted on once: a CPM that restarts before it has the Feedback re-serves the open
    # directive, and the student must not fetch and learn from it a second time
    did = directive["directive"]
    assert len([e for e in student.events("exchange.failed") if e["directive"] == did]) == 1
    assert not [e for e in student.events("agent.learned") if e["directive"] == did]
    # both daemons reconnected to the restarted CPM on their own
    wait_for(lambda: len(teacher.events("cpm.registered")) >= 2 and len(student.events("cpm.registered")) >= 2,
             60, "daemons re-registered", everyone)
    for d in (teacher, student):
        d.signal(signal.SIGTERM)
        assert d.wait(60) == 0


def test_unadmitted_daemon_exits_5_with_admit_hint(tmp_path: Path, spawn) -> None:
    fed = Federation(tmp_path, spawn)
    fed.init_cpm()  # closed admission
    fed.start_cpm()
    _, peer = fed.init_daemon(0)
    daemon = fed.start_daemon(0)
    assert daemon.wait(60) == 5
    lines = daemon.events("cpm.unauthorized")
    assert lines and f"knexa-cpm admit {peer}" in lines[0]["hint"]
    assert "knexa-cpm admit" in fed.status(0)["last_error"]


def test_unreachable_cpm_exits_4_after_give_up(tmp_path: Path, spawn) -> None:
    from protocol.envelope import Identity

    port = free_port()  # nothing listens there any more
    fed = Federation(tmp_path, spawn)
    fed.cpm_addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{Identity.generate().peer_id}"
    fed.init_daemon(0)
    daemon = fed.start_daemon(0, {"KNEXA_TIMEOUTS_GIVE_UP_S": "1"})
    assert daemon.wait(60) == 4
    assert daemon.events("cpm.give_up")
    assert fed.status(0)["status"] == "stopped"


def test_transfer_set_mismatch_exits_3(tmp_path: Path, spawn) -> None:
    fed = Federation(tmp_path, spawn)
    fed.init_cpm("--open", thash="0" * 64)
    fed.start_cpm()
    fed.init_daemon(0)
    daemon = fed.start_daemon(0)
    assert daemon.wait(60) == 3
    assert daemon.events("cpm.transfer_hash_mismatch")


def test_every_round_counts_for_an_idle_daemon_the_last_one_too(tmp_path: Path, spawn) -> None:
    """LocalOnly pairs nobody: each round closes at once, and the last one is already
    over ("finished") when a daemon asks for its directive. It must still count as a
    round done — an idle ML agent trains for it before its next Profile (equal compute) —
    not be skipped."""
    fed = Federation(tmp_path, spawn)
    fed.init_cpm("--open", "--max-rounds", "2", "--strategy", "local-only")
    fed.start_cpm()
    for i in range(2):
        fed.init_daemon(i)
    daemons = [fed.start_daemon(i) for i in range(2)]
    everyone = (fed.cpm, *daemons)
    from knexad.state import read_state

    states = lambda: [read_state(tmp_path / f"d{i}") for i in range(2)]  # noqa: E731
    wait_for(lambda: all(st is not None and st.role == "finished" for st in states()), 90, "both finished", everyone)
    for d in daemons:  # the last round is done for it, as every other: it then profiles on (and trains)
        assert 2 in {e["round"] for e in d.events("daemon.round.done")}, d.events("daemon.round.done")
        d.signal(signal.SIGTERM)
        assert d.wait(60) == 0
