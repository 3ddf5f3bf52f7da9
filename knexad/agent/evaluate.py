"""Sandboxed execution of generated programs and the unbiased pass@k estimator.

Why a sandbox at all: evaluation runs code written by models, our own and (through
knowledge exchange) other peers'. It is never executed in this process. Every batch goes
to one *runner* subprocess (``python -I -c <runner>``) that forks one child per program;
forking an already-started interpreter costs ~1 ms where a fresh ``python -I`` costs
~20-40 ms, which matters at hundreds of programs per round on two cores.

Each child, before it runs the untrusted code (all steps best effort, see
docs/evaluation.md and :func:`sandbox_capabilities`):

* new session/process group; stdin/stdout/stderr on /dev/null; inherited fds closed;
* cwd = a fresh per-program temp dir, removed afterwards;
* rlimits: address space (``memory_mb``), CPU seconds, 64 open files, 8 MiB file size,
  no core dumps, few processes (RLIMIT_NPROC; as uid 0 the kernel ignores it, so there a
  per-program pids cgroup is used when /sys/fs/cgroup allows it);
* Landlock (Linux >= 5.13): writes only below its temp dir, no execve, no TCP
  bind/connect (ABI >= 4), no signals/abstract sockets outside its domain (ABI >= 6);
* all capabilities dropped (matters when the daemon runs as root), parent-death signal;
* ``socket.socket`` and friends replaced by a function that raises.

The runner itself runs in fresh network + PID namespaces when ``unshare`` works (empty
network namespace: no interfaces at all; PID namespace: every leftover process dies with
the runner). Real isolation of hostile code still needs containers/VMs; this is a
defence-in-depth harness for model output, not a jail.

A program passes iff its code ran to the end without raising: the child writes a random
per-program token to a private pipe only after ``exec`` returned, and the runner requires
both exit status 0 and that token. So ``sys.exit(0)`` (any ``SystemExit``) or
``os._exit(0)`` before the asserts is a failure, as is a timeout, a signal, or exceeding
a limit.

If the runner dies or overruns its wall-clock budget, programs it had started but not
reported count as failed (one of them most likely caused it) and programs it never
started are retried in a fresh runner; a runner that starts nothing ends the batch with
the rest failed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import structlog

from knexad.agent.sandbox_runner import kill_cgroup

log = structlog.get_logger(__name__)

_FILE_SIZE_BYTES = 8 * 1024 * 1024
_MAX_OPEN_FILES = 64
_MAX_PROCS = 32
_RUNNER_SLACK_S = 10.0

# The runner program. It speaks a tiny line protocol on stdout:
#   "I <json>"      once: capabilities it found (landlock ABI, cgroup, ...)
#   "S <idx>"       program idx was forked
#   "R <idx> <0|1>" program idx finished: 1 = passed
# stdin: one JSON header line, then per program b"<nbytes>\n" + UTF-8 source.
_RUNNER = str(Path(__file__).with_name("sandbox_runner.py"))  # run as a file: python -I <path>


@dataclass(frozen=True, slots=True)
class SandboxCapabilities:
    """Which isolation layers this machine actually provides (they differ per host)."""

    namespaces: bool  # runner in fresh network + PID namespaces (unshare)
    landlock_abi: int  # 0: no Landlock, so no filesystem/exec/TCP restriction
    pids_cgroup: bool  # per-program pids cgroup (used when running as root)
    euid: int  # effective uid of the runner (0: RLIMIT_NPROC is not enforced)


@lru_cache(maxsize=1)
def _unshare_prefix() -> tuple[str, ...]:
    """``unshare`` flags that work here, probed once: () when namespaces are unavailable."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    flags = ["-n", "-p", "-f", "--kill-child"]
    if os.geteuid() != 0:
        flags.insert(0, "-r")  # unprivileged: a user namespace makes the rest possible
    cmd = (exe, *flags)
    try:
        done = subprocess.run([*cmd, "true"], capture_output=True, timeout=10, env={})
    except (OSError, subprocess.SubprocessError):
        return ()
    return cmd if done.returncode == 0 else ()


_capabilities: SandboxCapabilities | None = None


def sandbox_capabilities() -> SandboxCapabilities:
    """Probe (once) and report the isolation layers available on this host."""
    if _capabilities is None:
        check_programs(["pass"], timeout_s=5.0)
    if _capabilities is None:
        raise RuntimeError("the sandbox runner did not start; see evaluate.runner.failed")
    return _capabilities


def _encode_batch(programs: Sequence[str], header: dict[str, object]) -> bytes:
    parts = [json.dumps(header).encode(), b"\n"]
    for src in programs:
        body = src.encode("utf-8", "surrogatepass")
        parts += [str(len(body)).encode(), b"\n", body]
    return b"".join(parts)


def _run_runner(
    programs: Sequence[str], base: str, timeout_s: float, memory_mb: int, workers: int
) -> tuple[set[int], dict[int, bool], str]:
    """One runner process over ``programs``: (started, finished -> passed, stderr tail)."""
    global _capabilities
    header = {
        "timeout": timeout_s,
        "memory_mb": memory_mb,
        "workers": workers,
        "nofile": _MAX_OPEN_FILES,
        "fsize": _FILE_SIZE_BYTES,
        "nproc": _MAX_PROCS,
        "tag": uuid.uuid4().hex[:12],
    }
    workdir = tempfile.mkdtemp(prefix="run-", dir=base)
    prefix = _unshare_prefix()
    cmd = [*prefix, sys.executable, "-I", _RUNNER]
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "HOME": workdir}
    budget = _RUNNER_SLACK_S + math.ceil(len(programs) / workers) * (timeout_s + 0.5)
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=workdir,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(_encode_batch(programs, header), timeout=budget)
    except subprocess.TimeoutExpired:
        log.warning("evaluate.runner.overrun", budget_s=round(budget, 1), n=len(programs))
        _kill_group(proc)
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            _kill_group(proc)
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    started: set[int] = set()
    finished: dict[int, bool] = {}
    for line in out.decode("ascii", "replace").splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "S":
            started.add(int(rest))
        elif kind == "R":
            idx, ok = rest.split()
            finished[int(idx)] = ok == "1"
        elif kind == "I":
            info = json.loads(rest)
            if info["pids_cgroup"]:
                _remove_cgroups(str(info["pids_cgroup"]), f"knexa-{header['tag']}-")
        if kind == "I" and _capabilities is None:
            _capabilities = SandboxCapabilities(
                namespaces=bool(prefix) and bool(info["pid_namespace"]),
                landlock_abi=int(info["landlock_abi"]),
                pids_cgroup=bool(info["pids_cgroup"]),
                euid=int(info["euid"]),
            )
            log.info("evaluate.sandbox.capabilities", **_capabilities_dict(_capabilities))
    return started, finished, err.decode("utf-8", "replace")[-2000:]


def _capabilities_dict(caps: SandboxCapabilities) -> dict[str, object]:
    return {
        "namespaces": caps.namespaces,
        "landlock_abi": caps.landlock_abi,
        "pids_cgroup": caps.pids_cgroup,
        "euid": caps.euid,
    }


def _remove_cgroups(parent: str, prefix: str) -> None:
    """Kill and remove per-program cgroups a dead runner could not clean up itself."""
    try:
        names = [n for n in os.listdir(parent) if n.startswith(prefix)]
    except OSError:
        return
    for name in names:
        path = os.path.join(parent, name)
        if not kill_cgroup(path):
            log.warning("evaluate.cgroup.leftover", path=path)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def check_programs(
    programs: Sequence[str],
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    max_workers: int = 2,
) -> list[bool]:
    """Run each full Python program in the sandbox; True iff it completed without error.

    Results are in input order. ``max_workers`` programs run concurrently inside one
    runner process; ``timeout_s`` is wall-clock per program (CPU time is capped too).
    """
    if timeout_s <= 0 or memory_mb < 32 or max_workers < 1:
        raise ValueError("timeout_s must be > 0, memory_mb >= 32, max_workers >= 1")
    results = [False] * len(programs)
    remaining = list(range(len(programs)))
    t0 = time.monotonic()
    runs = 0
    with tempfile.TemporaryDirectory(prefix="knexa-eval-", ignore_cleanup_errors=True) as base:
        while remaining:
            runs += 1
            batch = [programs[i] for i in remaining]
            started, finished, err = _run_runner(batch, base, timeout_s, memory_mb, max_workers)
            for j, ok in finished.items():
                results[remaining[j]] = ok
            lost = started - finished.keys()
            unstarted = [remaining[j] for j in range(len(batch)) if j not in started]
            if lost or (unstarted and started):
                log.warning(
                    "evaluate.runner.restart", lost=len(lost), retry=len(unstarted), stderr=err[-300:]
                )
            if not started and unstarted:
                log.error("evaluate.runner.failed", n=len(unstarted), stderr=err[-500:])
                break
            remaining = unstarted
    log.debug(
        "evaluate.batch.done",
        n=len(programs),
        passed=sum(results),
        runners=runs,
        workers=max_workers,
        duration_ms=round((time.monotonic() - t0) * 1000, 1),
    )
    return results


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed (Chen et al. 2021).

    1 - C(n-c, k) / C(n, k), computed as a product so large n neither overflows nor
    loses precision.
    """
    if not (0 <= c <= n) or k < 1 or k > n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(results: Sequence[Sequence[bool]], k: int) -> float:
    """Mean pass@k over tasks; ``results[t]`` holds the per-sample outcomes of task t."""
    if not results:
        raise ValueError("mean_pass_at_k needs at least one task")
    return sum(pass_at_k(len(r), sum(bool(x) for x in r), k) for r in results) / len(results)
