"""knexa-harness end to end: real CPM + daemon subprocesses on 127.0.0.1.

What a user relies on: ``up`` completes R rounds and writes results with real pairs and
rewards; Ctrl-C (SIGINT) or a crashed node never leaves a process behind; the
supervisor's process-group kill also takes grandchildren; usage errors exit 2.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import main as harness_main
from harness.procs import ChildFailed, Supervisor, process_alive
from tests.e2e.conftest import e2e_env

REPO = Path(__file__).resolve().parents[2]
HARNESS = [sys.executable, "-m", "harness.cli"]


def _start(procs, args: list[str], name: str = "harness"):
    """The harness under the shared ``procs`` fixture (own process group, killed at teardown)."""
    return procs.start([*HARNESS, *args], name=name, env=e2e_env(), cwd=REPO)


def _finish(mp, timeout: float) -> str:
    mp.proc.wait(timeout=timeout)
    return mp.stdout() + mp.stderr()


def _children(out: Path) -> list[dict]:
    return json.loads((out / "pids.json").read_text())["children"]


def _assert_no_survivors(out: Path) -> None:
    doc = json.loads((out / "pids.json").read_text())
    assert doc["children"], "the harness recorded no children"
    alive = [c for c in doc["children"] if process_alive(c["pid"])]
    assert alive == [], f"children survived the harness: {alive}"


def _wait_for(pred, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _rounds_started(out: Path) -> bool:
    log = out / "logs" / "cpm.log"
    return log.exists() and "cpm.round.matched" in log.read_text(errors="replace")


def test_up_three_synthetic_nodes_two_rounds(tmp_path, procs) -> None:
    out = tmp_path / "run"
    p = _start(procs, ["up", "--agent", "synthetic", "--nodes", "3", "--rounds", "2", "--out", str(out),
                       "--no-progress", "--grace", "5"])
    text = _finish(p, 240)
    assert p.returncode == 0, text

    doc = json.loads((out / "results.json").read_text())
    assert doc["status"] == "ok"
    assert doc["rounds_completed"] == 2
    assert [r["round"] for r in doc["rounds"]] == [1, 2]
    assert all(r["pairs"] >= 1 for r in doc["rounds"])
    assert doc["pairs"], "no pairs recorded"
    peers = {a["peer"] for a in doc["agents"]}
    assert len(peers) == 3
    for pair in doc["pairs"]:
        assert pair["teacher"] in peers and pair["student"] in peers and pair["teacher"] != pair["student"]
        assert pair["ok"] is True, pair
        assert isinstance(pair["raw_reward"], float) and math.isfinite(pair["raw_reward"])
        assert isinstance(pair["reward"], float) and math.isfinite(pair["reward"])
    for agent in doc["agents"]:
        assert 0.0 <= agent["pass1_final"] <= 1.0
    assert doc["summary"]["pairs"] == len(doc["pairs"])
    assert (out / "rounds.csv").read_text().count("\n") == 3  # header + 2 rounds
    for png in ("rounds.png", "pairs_heatmap.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert (out / "cpm-export.json").exists()
    assert "round 2/2" in text and "results:" in text
    roles = [c["role"] for c in _children(out)]
    assert roles.count("daemon") == 3 and roles.count("cpm") == 1
    assert all("memory.malloc.tuned" in (out / "logs" / f"node-{i:02d}.log").read_text() for i in range(3))
    _assert_no_survivors(out)


def test_sigint_mid_run_stops_every_child(tmp_path, procs) -> None:
    out = tmp_path / "run"
    p = _start(procs, ["up", "--agent", "synthetic", "--nodes", "3", "--rounds", "500", "--out", str(out),
                       "--no-progress", "--grace", "5"])
    _wait_for(lambda: _rounds_started(out), 120, "the first matched round")
    assert len([c for c in _children(out) if c["role"] == "daemon"]) == 3
    os.kill(p.pid, signal.SIGINT)  # only the harness: children live in their own groups
    text = _finish(p, 90)
    assert p.returncode == 130, text
    _assert_no_survivors(out)
    doc = json.loads((out / "results.json").read_text())
    assert doc["status"] == "interrupted"
    assert doc["rounds_completed"] < 500


def test_crashed_node_is_reported_and_abort_stops_everything(tmp_path, procs) -> None:
    out = tmp_path / "run"
    p = _start(procs, ["up", "--agent", "synthetic", "--nodes", "3", "--rounds", "500", "--out", str(out),
                       "--no-progress", "--grace", "5", "--on-crash", "abort"])
    _wait_for(lambda: _rounds_started(out), 120, "the first matched round")
    victim = next(c for c in _children(out) if c["name"] == "node-01")
    os.killpg(victim["pgid"], signal.SIGKILL)
    text = _finish(p, 90)
    assert p.returncode == 1, text
    assert "node-01 crashed" in text
    doc = json.loads((out / "results.json").read_text())
    assert doc["status"] == "crashed"
    assert [c["name"] for c in doc["crashed"]] == ["node-01"]
    assert doc["crashed"][0]["returncode"] == -signal.SIGKILL
    _assert_no_survivors(out)


def test_per_process_packs_run_real_daemons(tmp_path, procs) -> None:
    out = tmp_path / "run"
    p = _start(procs, ["up", "--agent", "synthetic", "--nodes", "4", "--rounds", "1", "--per-process", "2",
                       "--out", str(out), "--no-progress", "--grace", "5", "--keep-homes"])
    text = _finish(p, 240)
    assert p.returncode == 0, text
    roles = [c["role"] for c in _children(out)]
    assert roles.count("pack") == 2 and roles.count("daemon") == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["rounds_completed"] == 1
    row = doc["rounds"][0]
    assert row["pairs"] >= 1 and row["feedback"] == row["pairs"] and row["failures"] == 0
    assert (out / "logs" / "pack-00.log").read_text().count("daemon.ready") == 2
    assert "memory.malloc.tuned" in (out / "logs" / "pack-00.log").read_text()
    # four distinct identities, each with its own listen address
    addrs = [json.loads((out / "homes" / f"node-{i:02d}" / "state.json").read_text())["addrs"][0] for i in range(4)]
    assert len({a.split("/p2p/")[1] for a in addrs}) == 4
    assert len({a.split("/tcp/")[1].split("/")[0] for a in addrs}) == 4
    _assert_no_survivors(out)
    matched = [json.loads(line) for line in (out / "logs" / "cpm.log").read_text().splitlines()
               if '"cpm.round.matched"' in line]
    assert matched and matched[0]["agents"] == 4  # all four pack-hosted daemons took part


def test_supervisor_kills_the_whole_group_including_grandchildren(tmp_path) -> None:
    grandchild_file = tmp_path / "grandchild.pid"
    script = (
        "import subprocess, sys, time, pathlib\n"
        "g = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'])\n"
        f"pathlib.Path({str(grandchild_file)!r}).write_text(str(g.pid))\n"
        "time.sleep(600)\n"
    )
    with Supervisor(tmp_path, grace_s=1.0) as sup:
        child = sup.spawn("parent", [sys.executable, "-c", script], role="daemon")
        _wait_for(lambda: grandchild_file.exists() and grandchild_file.read_text(), 30, "grandchild")
        grandchild = int(grandchild_file.read_text())
        assert process_alive(child.pid) and process_alive(grandchild)
        assert sup.new_crashes() == []
    _wait_for(lambda: not process_alive(grandchild), 10, "grandchild to die")
    assert not process_alive(child.pid)
    assert json.loads((tmp_path / "pids.json").read_text())["stopped"] is True


def test_supervisor_reports_a_child_that_dies_before_ready(tmp_path) -> None:
    with Supervisor(tmp_path, grace_s=1.0) as sup:
        child = sup.spawn("bad", [sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"],
                          ready_file=tmp_path / "never.ready")
        with pytest.raises(ChildFailed) as info:
            sup.wait_ready(child, timeout_s=30)
    assert info.value.returncode == 3
    assert "boom" in info.value.log_tail


def test_a_failure_tail_shows_only_this_runs_lines(tmp_path) -> None:
    """Logs are per run (a restart of the same child appends within the run)."""
    fail = [sys.executable, "-c", "import sys; print(sys.argv[1], file=sys.stderr); sys.exit(3)"]
    with Supervisor(tmp_path, grace_s=1.0) as sup:
        sup.run("cpm-admin", [*fail, "first-run"], check=False)
    with Supervisor(tmp_path, grace_s=1.0) as sup:
        sup.run("cpm-admin", [*fail, "second-run-a"], check=False)
        with pytest.raises(ChildFailed) as info:
            sup.run("cpm-admin", [*fail, "second-run-b"])
    assert "first-run" not in info.value.log_tail
    assert "second-run-a" in info.value.log_tail and "second-run-b" in info.value.log_tail


@pytest.mark.parametrize(
    "args",
    [
        ["up", "--nodes", "1", "--out", "x"],
        ["up", "--agent", "ml", "--model", "tiny-nope", "--out", "x"],
        ["compare", "--strategies", "linucb,bogus", "--out", "x"],
        ["compare", "--seeds", "1,a", "--out", "x"],
        ["up", "--rounds", "2"],
    ],
)
def test_usage_errors_exit_2(args, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(harness_main, args)
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "x").exists()
