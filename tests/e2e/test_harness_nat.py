"""``knexa-harness up --topology nat``: the CPM on a public segment, every daemon in its
own organisation's LAN behind a NAT (harness.netlab), and nothing left afterwards.

What a user relies on: every daemon registers and sends its profile through its NAT
(the rounds close), the processes really listen on their namespace addresses, and the
run — finished or interrupted — removes every namespace and process it created.
Skips with the reason where namespaces cannot be created.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import main as harness_main
from harness.netlab import netns_available
from harness.netlab.system import list_namespaces
from tests.e2e.conftest import e2e_env
from tests.e2e.test_harness import _assert_no_survivors, _finish, _rounds_started, _wait_for

REPO = Path(__file__).resolve().parents[2]
HARNESS = [sys.executable, "-m", "harness.cli"]


@pytest.fixture(scope="module")
def netns_ok() -> None:
    ok, why = netns_available()
    if not ok:
        pytest.skip(f"network namespaces unavailable: {why}")


def _topology(out: Path) -> dict:
    for line in (out / "logs" / "harness.log").read_text().splitlines():
        doc = json.loads(line)
        if doc.get("event") == "harness.topology.up":
            return doc
    raise AssertionError("no harness.topology.up in harness.log")


def _assert_torn_down(tag: str) -> None:
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert [n for n in list_namespaces() if n.startswith(tag)] == []
    assert tag not in links


def test_up_nat_every_daemon_registers_through_its_nat(netns_ok: None, tmp_path: Path, procs) -> None:
    out = tmp_path / "run"
    p = procs.start([*HARNESS, "up", "--topology", "nat", "--uplink-mbit", "50", "--agent", "synthetic",
                     "--nodes", "3", "--rounds", "1", "--out", str(out), "--keep-homes", "--no-progress",
                     "--grace", "5"], name="harness", env=e2e_env(), cwd=REPO)
    text = _finish(p, 300)
    assert p.returncode == 0, text
    doc = json.loads((out / "results.json").read_text())
    assert doc["status"] == "ok" and doc["rounds_completed"] == 1
    assert doc["config"]["topology"] == "nat" and doc["config"]["uplink_mbit"] == 50
    # every daemon's profile reached the CPM across its NAT
    assert len(doc["agents"]) == 3 and all(a["pass1_initial"] is not None for a in doc["agents"]), doc["agents"]
    topo = _topology(out)
    assert doc["config"]["cpm"].startswith(f"/ip4/{topo['public']['cpm']['addr']}/tcp/")
    for i, org in enumerate(topo["orgs"]):
        ready = (out / "homes" / f"node-{i:02d}" / "ready").read_text()
        assert f"/ip4/{org['hosts'][0]['addr']}/tcp/" in ready  # listens on its private LAN address
    _assert_torn_down(topo["tag"])
    _assert_no_survivors(out)


def test_sigint_mid_nat_run_removes_everything(netns_ok: None, tmp_path: Path, procs) -> None:
    out = tmp_path / "run"
    p = procs.start([*HARNESS, "up", "--topology", "nat", "--agent", "synthetic", "--nodes", "2", "--rounds", "500",
                     "--out", str(out), "--no-progress", "--grace", "5"], name="harness", env=e2e_env(), cwd=REPO)
    _wait_for(lambda: _rounds_started(out), 180, "the first matched round")
    tag = _topology(out)["tag"]
    assert len([n for n in list_namespaces() if n.startswith(tag)]) == 2 + 2 + 1 + 1  # hosts, routers, cpm, bridge
    os.kill(p.pid, signal.SIGINT)  # only the harness, as a terminal's Ctrl-C
    text = _finish(p, 120)
    assert p.returncode == 130, text
    _assert_torn_down(tag)
    _assert_no_survivors(out)


@pytest.mark.parametrize("args", [
    ["up", "--uplink-mbit", "5", "--out", "x"],
    ["up", "--topology", "nat", "--per-process", "2", "--out", "x"],
    ["up", "--topology", "mesh", "--out", "x"],
])
def test_topology_usage_errors_exit_2(args: list[str], tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(harness_main, args)
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "x").exists()
