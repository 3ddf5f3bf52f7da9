"""Shared helpers for e2e tests: real ``knexa-cpm`` / ``knexad`` subprocesses on loopback.

Stable API (other e2e test files rely on these names — extend, do not rename):

``bin_path(name) -> str``
    Absolute path of a console script of this venv (``knexa-cpm``, ``knexad``, …).
``e2e_env(**extra) -> dict``
    Environment for children: unbuffered, single-threaded math, offline HF, + ``extra``.
``run_cli(args, *, env=None, timeout=120, cwd=None) -> subprocess.CompletedProcess``
    Run a console command to completion (``args[0]`` is a script name or a path);
    text stdout/stderr captured. Never leaves a process behind (own process group,
    killed on timeout).
``ManagedProcess``
    A long-running child in its **own process group** (``start_new_session``), stdout
    and stderr redirected to files under the test's tmp dir (no pipe can fill up).
    ``.pid``, ``.proc``, ``.ready`` (parsed ready-file JSON or None), ``.alive``,
    ``.wait_ready(timeout=60)`` (blocking) / ``await .wait_ready_async(timeout=60)``
    (trio) — poll the ready file, raise ``RuntimeError`` with the child's stderr tail
    if it exits first; ``.terminate(timeout=15) -> rc`` (SIGTERM to the group, SIGKILL
    fallback); ``.send_signal(sig, timeout=15) -> rc``; ``.kill9() -> rc`` (SIGKILL the
    group); ``.stdout()`` / ``.stderr()``
    (text so far); ``.returncode``.
``ProcessManager``
    ``.start(args, *, name, ready_file=None, env=None, cwd=None) -> ManagedProcess``
    (does not wait; call ``wait_ready``), ``.cleanup()`` kills every group it started.
fixture ``procs`` -> ProcessManager
    Everything started through it is killed (SIGKILL to the group) at teardown.
``cpm_init(home, *extra_args, env=None) -> str``
    ``knexa-cpm init --home HOME …``; returns the CPM peer ID.
``start_cpm(procs, home, *extra_args, name="cpm", timeout=60) -> ManagedProcess``
    ``knexa-cpm serve --home HOME --ready-file HOME/ready.json …``, waited until ready.
    ``proc.ready`` = ``{"peer_id", "addrs": [full multiaddrs], "pid", "metrics_port"}``;
    ``proc.ready["addrs"][0]`` is the address daemons pass as ``--cpm``.

Ready files are written atomically (write + rename) by the binaries once listening.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

BIN_DIR = Path(sys.executable).parent


def bin_path(name: str) -> str:
    path = BIN_DIR / name
    return str(path) if path.exists() else name


def e2e_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    env.update(extra)
    return env


def _argv(args: Sequence[str]) -> list[str]:
    argv = [str(a) for a in args]
    if argv and os.sep not in argv[0]:
        argv[0] = bin_path(argv[0])
    return argv


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_cli(args: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 120,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen(_argv(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or e2e_env(), cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise
    finally:
        if proc.poll() is None:
            _killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


class ManagedProcess:
    def __init__(self, name: str, args: list[str], *, log_dir: Path, ready_file: Path | None,
                 env: dict[str, str] | None, cwd: str | Path | None) -> None:
        self.name = name
        self.args = args
        self.ready_file = Path(ready_file) if ready_file is not None else None
        self.ready: dict[str, Any] | None = None
        log_dir.mkdir(parents=True, exist_ok=True)
        stamp = f"{name}.{time.monotonic_ns()}"
        self.stdout_path = log_dir / f"{stamp}.stdout"
        self.stderr_path = log_dir / f"{stamp}.stderr"
        if self.ready_file is not None and self.ready_file.exists():
            self.ready_file.unlink()  # a stale file from a previous run must not count
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(args, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         env=env or e2e_env(), cwd=cwd, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def _check_ready(self) -> bool:
        assert self.ready_file is not None, f"{self.name} was started without a ready file"
        if self.ready_file.exists():
            self.ready = json.loads(self.ready_file.read_text())
            return True
        if not self.alive:
            raise RuntimeError(
                f"{self.name} exited with {self.returncode} before it was ready:\n{self.stderr()[-4000:]}"
            )
        return False

    def wait_ready(self, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not self._check_ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not ready after {timeout} s:\n{self.stderr()[-4000:]}")
            time.sleep(0.05)
        assert self.ready is not None
        return self.ready

    async def wait_ready_async(self, timeout: float = 60) -> dict[str, Any]:
        import trio

        with trio.fail_after(timeout):
            while not self._check_ready():
                await trio.sleep(0.05)
        assert self.ready is not None
        return self.ready

    def terminate(self, timeout: float = 15) -> int:
        """SIGTERM the group and wait; SIGKILL if it does not exit in ``timeout``."""
        if self.alive:
            _killpg(self.pid, signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        return self.kill9()

    def send_signal(self, sig: int, timeout: float = 15) -> int:
        """Send ``sig`` to the group and wait for the exit code (SIGKILL after ``timeout``)."""
        _killpg(self.pid, sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return self.kill9()

    def kill9(self) -> int:
        _killpg(self.pid, signal.SIGKILL)
        return self.proc.wait()


class ProcessManager:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[ManagedProcess] = []

    def start(self, args: Sequence[str], *, name: str, ready_file: Path | None = None,
              env: dict[str, str] | None = None, cwd: str | Path | None = None) -> ManagedProcess:
        proc = ManagedProcess(name, _argv(args), log_dir=self.log_dir, ready_file=ready_file, env=env, cwd=cwd)
        self.started.append(proc)
        return proc

    def cleanup(self) -> None:
        for proc in self.started:
            _killpg(proc.pid, signal.SIGKILL)
            try:
                proc.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture()
def procs(tmp_path: Path) -> Iterator[ProcessManager]:
    manager = ProcessManager(tmp_path / "logs")
    try:
        yield manager
    finally:
        manager.cleanup()


def cpm_init(home: Path, *extra_args: str, env: dict[str, str] | None = None) -> str:
    res = run_cli(["knexa-cpm", "init", "--home", str(home), *extra_args], env=env)
    if res.returncode != 0:
        raise RuntimeError(f"knexa-cpm init failed ({res.returncode}): {res.stderr}")
    return res.stdout.strip().splitlines()[-1]


def start_cpm(procs: ProcessManager, home: Path, *extra_args: str, name: str = "cpm",
              timeout: float = 60) -> ManagedProcess:
    ready = Path(home) / "ready.json"
    proc = procs.start(
        ["knexa-cpm", "serve", "--home", str(home), "--ready-file", str(ready), "--log-format", "json",
         *extra_args],
        name=name,
        ready_file=ready,
    )
    proc.wait_ready(timeout)
    return proc
