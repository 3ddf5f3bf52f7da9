"""Operator edges on real processes: one instance per home, a taken port, ``init --force``.

A second ``serve``/``run`` on one home used to bind the same port beside the first and
share its database or outbox; a daemon whose port was taken printed a 76-line traceback
after logging exit code 0; ``knexa-cpm init --force`` reset a pinned listen port.
"""

from __future__ import annotations

import signal
import socket
import tomllib
from pathlib import Path

from tests.e2e.procs import CPM, KNEXAD
from tests.e2e.test_daemon_round import Federation, read_ready, run_cli, spawn, wait_for  # noqa: F401 — fixture

ONE_LINE_ERROR = "already runs on"


def test_a_second_cpm_on_one_home_is_refused_until_the_first_dies(tmp_path: Path, spawn) -> None:  # noqa: F811
    fed = Federation(tmp_path, spawn)
    fed.init_cpm("--open")
    fed.start_cpm()
    first = fed.cpm
    second = run_cli([*CPM, "serve", "--home", str(fed.cpm_home)])
    assert second.returncode == 1, second.stderr
    assert f"(pid {first.popen.pid})" in second.stderr and ONE_LINE_ERROR in second.stderr
    assert "Traceback" not in second.stderr
    assert first.popen.poll() is None  # the running node is untouched
    # the kernel drops the lock with the process, however it dies: no stale lock to clean
    first.kill9()
    fed.start_cpm(name="cpm-after-crash")


def test_a_second_daemon_on_one_home_is_refused(tmp_path: Path, spawn) -> None:  # noqa: F811
    fed = Federation(tmp_path, spawn)
    fed.init_cpm("--open")
    fed.start_cpm()
    home, _ = fed.init_daemon(0)
    first = fed.start_daemon(0)
    wait_for(lambda: read_ready(tmp_path / "d0.ready"), 60, "d0 ready", (fed.cpm, first))
    second = run_cli([*KNEXAD, "run", "--home", str(home), "--log-format", "json"])
    assert second.returncode == 1, second.stderr
    assert f"(pid {first.popen.pid})" in second.stderr and ONE_LINE_ERROR in second.stderr
    assert "Traceback" not in second.stderr
    assert first.popen.poll() is None
    first.signal(signal.SIGTERM)
    assert first.wait(60) == 0


def test_a_taken_port_is_one_error_line_and_exit_1(tmp_path: Path, spawn) -> None:  # noqa: F811
    fed = Federation(tmp_path, spawn)
    fed.init_cpm("--open")
    fed.start_cpm()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        home = tmp_path / "d0"
        r = run_cli([*KNEXAD, "init", "--home", str(home), "--cpm", fed.cpm_addr,
                     "--listen", f"/ip4/127.0.0.1/tcp/{port}"])
        assert r.returncode == 0, r.stderr
        daemon = fed.start_daemon(0)
        assert daemon.wait(60) == 1
    assert "Traceback" not in daemon.err.read_text()
    failed = daemon.events("daemon.failed")
    assert len(failed) == 1 and f"tcp/{port}" in failed[0]["message"], failed
    assert [e["exit_code"] for e in daemon.events("daemon.stopped")] == [1]


def test_cpm_init_force_keeps_what_it_was_not_asked_to_change(tmp_path: Path) -> None:
    home = tmp_path / "cpm"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    listen = f"/ip4/127.0.0.1/tcp/{port}"
    r = run_cli([*CPM, "init", "--home", str(home), "--listen", listen, "--open", "--strategy", "heuristic"])
    assert r.returncode == 0, r.stderr
    peer = r.stdout.strip()
    r = run_cli([*CPM, "init", "--home", str(home), "--force", "--transfer-hash", "ab" * 32])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == peer  # the key is kept
    assert "restart it" in r.stderr  # a running node reads its config only at start
    cfg = tomllib.loads((home / "config.toml").read_text())
    assert cfg["listen"] == [listen] and cfg["strategy"] == "heuristic" and cfg["open_admission"] is True
    assert cfg["transfer_hash"] == "ab" * 32
    r = run_cli([*CPM, "init", "--home", str(home), "--force", "--closed"])
    assert tomllib.loads((home / "config.toml").read_text())["open_admission"] is False
