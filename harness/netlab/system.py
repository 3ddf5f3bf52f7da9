"""Thin wrappers over ``ip``, ``nft`` and ``/proc``: the only place the net lab shells out.

Why shell out instead of netlink bindings: iproute2 and nftables are what an operator
uses to inspect the result (``ip netns list``, ``nft list ruleset``), they are Debian
packages CI installs (``.ci/run``), and their error text is what a failing step should
show. Every call is bounded by a timeout and raises ``NetlabError`` with the command and
its stderr, so a failed bring-up says exactly which line failed.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Sequence

IP = "ip"
NFT = "nft"
_PR_SET_PDEATHSIG = 1
_CMD_TIMEOUT_S = 30.0


class NetlabError(RuntimeError):
    """A command that builds or inspects the testbed failed (argv and stderr included)."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str) -> None:
        super().__init__(f"{' '.join(argv)} exited {returncode}: {stderr.strip()[:2000]}")
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr


def sh(argv: Sequence[str], *, input: str | None = None, check: bool = True,
       timeout_s: float = _CMD_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run one command to completion (text in/out); ``NetlabError`` on failure or timeout."""
    try:
        res = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout_s,
                             stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise NetlabError(argv, None, f"timed out after {timeout_s:.0f}s: {exc.stderr or ''}") from None
    except FileNotFoundError as exc:
        raise NetlabError(argv, None, f"not found: {exc}") from None
    if check and res.returncode != 0:
        raise NetlabError(argv, res.returncode, res.stderr or res.stdout)
    return res


def ip_batch(lines: Sequence[str], ns: str | None = None) -> None:
    """Many ``ip`` commands in one process (``ip [-n NS] -batch -``); ``-n`` is per batch,
    because ``ip -batch`` does not accept global options on its lines."""
    if not lines:
        return
    argv = [IP, *(["-n", ns] if ns else []), "-batch", "-"]
    sh(argv, input="\n".join(lines) + "\n")


def ns_argv(ns: str, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside network namespace ``ns``. ``ip netns exec`` switches namespace
    and then *execs* the command (no fork outside batch mode), so the child's pid is the
    command's own pid: process groups, ``pdeathsig`` and ``ip netns pids`` all see it."""
    return [IP, "netns", "exec", ns, *[str(a) for a in argv]]


def ns_exec(ns: str, argv: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return sh(ns_argv(ns, argv), **kw)  # type: ignore[arg-type]


def list_namespaces() -> list[str]:
    """Names from ``ip netns list`` (lines look like ``name (id: 3)`` or ``name``)."""
    res = sh([IP, "netns", "list"], check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def ns_pids(ns: str) -> list[int]:
    """Processes whose network namespace is ``ns`` (``ip netns pids``)."""
    res = sh([IP, "netns", "pids", ns], check=False)
    return [int(p) for p in res.stdout.split() if p.isdigit()]


def ns_created_at(ns: str) -> float | None:
    """When the namespace's bind mount was made (``/run/netns/NAME``), None if gone."""
    try:
        return os.stat(f"/run/netns/{ns}").st_mtime
    except OSError:
        return None


def delete_namespace(ns: str) -> None:
    """Kill every process still inside, then unmount the namespace. A namespace with a
    live process survives ``ip netns del`` (anonymously, with its veths): kill first."""
    kill_pids(ns_pids(ns), signal.SIGKILL)
    sh([IP, "netns", "del", ns], check=False)


def kill_pids(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def process_start_ticks(pid: int) -> int | None:
    """Field 22 of ``/proc/PID/stat`` (start time in clock ticks since boot): with the pid
    it names one process for good — a recycled pid has a different start time."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def process_alive(pid: int, start_ticks: int | None = None) -> bool:
    ticks = process_start_ticks(pid)
    return ticks is not None and (start_ticks is None or ticks == start_ticks)


def set_pdeathsig() -> None:
    """Between fork and exec: the child gets SIGTERM when its parent thread dies, which
    covers the one exit no Python code sees (the owner SIGKILLed). Survives the exec of
    ``ip netns exec`` and of the command it execs (neither is set-uid)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except OSError:
        pass


def netns_available() -> tuple[bool, str]:
    """Can this process build the testbed? (root, ``ip``, ``nft``, and a namespace that
    can really be created and deleted). The reason is meant for ``pytest.skip``."""
    if not sys.platform.startswith("linux"):
        return False, f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return False, "network namespaces need root (euid is not 0)"
    for tool, pkg in ((IP, "iproute2"), (NFT, "nftables")):
        if shutil.which(tool) is None:
            return False, f"`{tool}` not on PATH (Debian package {pkg}; `make test` and .ci/run install it)"
    probe = f"kxprobe{uuid.uuid4().hex[:8]}"  # cleanup.sweep removes one left by a killed probe
    try:
        sh([IP, "netns", "add", probe], timeout_s=10)
    except NetlabError as exc:
        return False, f"cannot create a network namespace: {exc.stderr.strip() or exc}"
    try:
        ns_exec(probe, [NFT, "list", "ruleset"], timeout_s=10)
    except NetlabError as exc:
        return False, f"nftables does not work inside a namespace: {exc.stderr.strip() or exc}"
    finally:
        sh([IP, "netns", "del", probe], check=False, timeout_s=10)
    if probe in list_namespaces():
        return False, f"created namespace {probe} but could not delete it"
    return True, ""
