"""Building blocks of ``knexad doctor`` and ``knexa-cpm doctor``: one result per check.

Why a shared module: both binaries must report the same way (one line per check with
``ok``/``warn``/``fail``/``skip`` and a fix hint) and map the worst result to the same
exit-code table, and both need the same host-level probes (key file permissions, a
listen port that can be bound, disk and memory headroom). Only the stdlib is imported;
the accelerator check lives in ``knexad.doctor`` because only the ML agent may touch
torch (design §2).
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import shutil
import socket
import stat
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from p2p.process import ExitCode

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
EXIT_RUNTIME, EXIT_CONFIG, EXIT_UNREACHABLE, EXIT_UNAUTHORIZED = (
    ExitCode.RUNTIME, ExitCode.CONFIG, ExitCode.UNREACHABLE, ExitCode.UNAUTHORIZED)
GIB = 1024**3
MIB = 1024**2


@dataclass(frozen=True, slots=True)
class Check:
    """One diagnosis. ``code`` is the exit code a ``fail`` maps to (3 config, 4 cannot
    reach, 5 unauthorized, 1 anything else); ``hint`` says what to do about it."""

    name: str
    status: str
    detail: str
    hint: str = ""
    code: int = 0


def ok(name: str, detail: str) -> Check:
    return Check(name, OK, detail)


def warn(name: str, detail: str, hint: str = "") -> Check:
    return Check(name, WARN, detail, hint)


def fail(name: str, detail: str, hint: str = "", code: int = EXIT_RUNTIME) -> Check:
    return Check(name, FAIL, detail, hint, code)


def skip(name: str, detail: str) -> Check:
    return Check(name, SKIP, detail)


def exit_code(checks: Iterable[Check]) -> int:
    """The first failing check decides (checks run in dependency order: a bad config
    explains a failed dial, not the other way round); warnings exit 0."""
    for check in checks:
        if check.status == FAIL:
            return check.code or EXIT_RUNTIME
    return 0


def render(title: str, checks: Sequence[Check], echo: Callable[[str], None]) -> None:
    """Human output: one aligned line per check, the fix hint indented under it."""
    echo(title)
    width = max((len(c.name) for c in checks), default=0)
    for c in checks:
        label = {OK: "ok", WARN: "WARN", FAIL: "FAIL", SKIP: "skip"}[c.status]
        echo(f"  {label:<5} {c.name:<{width}}  {c.detail}")
        if c.hint:
            echo(f"  {'':<5} {'':<{width}}  fix: {c.hint}")
    fails = sum(c.status == FAIL for c in checks)
    warns = sum(c.status == WARN for c in checks)
    echo(f"result: {fails} fail, {warns} warn -> exit {exit_code(checks)}")


def to_json(checks: Sequence[Check]) -> str:
    return json.dumps({"checks": [asdict(c) for c in checks], "exit_code": exit_code(checks)}, indent=2)


# --- host-level probes ----------------------------------------------------------------


def check_home(home: Path, name: str = "home") -> Check:
    home = Path(home)
    if not home.is_dir():
        return fail(name, f"{home} does not exist", "run `init --home` first, or fix --home", EXIT_CONFIG)
    if not os.access(home, os.W_OK | os.X_OK):
        return fail(name, f"{home} is not writable by uid {os.getuid()}",
                    f"chown the directory to the service user, or chmod u+w {home}", EXIT_CONFIG)
    return ok(name, f"{home} exists and is writable")


def read_seed(path: Path) -> bytes | None:
    """The 32-byte seed regardless of its permissions (the key check reports those), so
    the network checks can still run and show every problem in one pass."""
    try:
        seed = Path(path).read_bytes()
    except OSError:
        return None
    return seed if len(seed) == 32 else None


def check_key_file(path: Path, peer_id_of: Callable[[bytes], str], name: str = "identity key") -> Check:
    """Exists, 32 bytes, mode 0600 (no group/other bits), owned by us."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        return fail(name, f"{path} not found", "run `init --home` (it creates the key)", EXIT_CONFIG)
    except OSError as exc:
        return fail(name, f"cannot stat {path}: {exc}", "check the directory permissions", EXIT_CONFIG)
    mode = stat.S_IMODE(st.st_mode)
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return fail(name, f"{path} is accessible by group/others (mode {mode:o})",
                    f"chmod 600 {path}   (then consider the key leaked: rotate it, docs/operations.md)",
                    EXIT_CONFIG)
    seed = read_seed(path)
    if seed is None:
        return fail(name, f"{path} is unreadable or not a 32-byte Ed25519 seed",
                    "restore the key from backup, or rotate it (docs/operations.md)", EXIT_CONFIG)
    if st.st_uid != os.getuid():
        return warn(name, f"{path} is owned by uid {st.st_uid}, not by this user ({os.getuid()})",
                    f"run as the service user, or chown it: chown $(id -u) {path}")
    return ok(name, f"{path} mode 600, peer {peer_id_of(seed)}")


def _tcp_endpoint(addr: str) -> tuple[int, str, int] | None:
    """``/ip4/H/tcp/P`` or ``/ip6/H/tcp/P`` → (family, host, port); None for other shapes."""
    parts = addr.strip("/").split("/")
    if len(parts) < 4 or parts[0] not in ("ip4", "ip6") or parts[2] != "tcp":
        return None
    try:
        ipaddress.ip_address(parts[1])
        port = int(parts[3])
    except ValueError:
        return None
    return (socket.AF_INET if parts[0] == "ip4" else socket.AF_INET6), parts[1], port


def check_bindable(addrs: Sequence[str], *, running_pid: int | None = None, name: str = "listen") -> list[Check]:
    """Can this host bind each listen address now? Port 0 always can (the OS picks)."""
    out = []
    for addr in addrs:
        ep = _tcp_endpoint(addr)
        if ep is None:
            out.append(warn(name, f"{addr}: not an /ip4|ip6/…/tcp/… address; only TCP on IP literals is tested",
                            "use /ip4/<address>/tcp/<port>"))
            continue
        family, host, port = ep
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the listener does
            try:
                sock.bind((host, port))
            except OSError as exc:
                if running_pid and exc.errno == errno.EADDRINUSE:
                    out.append(ok(name, f"{addr}: in use by the running process (pid {running_pid})"))
                elif exc.errno == errno.EADDRINUSE:
                    out.append(fail(name, f"{addr}: port {port} is already in use",
                                    f"find the owner (ss -ltnp 'sport = :{port}') or choose another port"))
                else:
                    out.append(fail(name, f"{addr}: cannot bind: {exc.strerror}",
                                    "use an address of this host (ip -brief addr), or 0.0.0.0", EXIT_CONFIG))
                continue
        scope = " (loopback only: peers on other hosts cannot dial it)" if ipaddress.ip_address(host).is_loopback else ""
        out.append(ok(name, f"{addr}: bindable{' (OS picks the port)' if port == 0 else ''}{scope}"))
    return out


def check_disk(path: Path, *, warn_below: int, fail_below: int, purpose: str, name: str = "disk") -> Check:
    try:
        usage = shutil.disk_usage(path)
    except OSError as exc:
        return warn(name, f"cannot stat the filesystem of {path}: {exc}")
    free = usage.free
    text = f"{free / GIB:.1f} GiB free on the filesystem of {path} ({purpose})"
    if free < fail_below:
        return fail(name, text, f"free space: need at least {fail_below / MIB:.0f} MiB", EXIT_RUNTIME)
    if free < warn_below:
        return warn(name, text, f"keep at least {warn_below / GIB:.1f} GiB free")
    return ok(name, text)


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), in bytes; None elsewhere."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory(*, warn_below: int, purpose: str, name: str = "memory") -> Check:
    avail = available_memory()
    if avail is None:
        return skip(name, "MemAvailable unknown on this OS")
    text = f"{avail / GIB:.1f} GiB available ({purpose})"
    if avail < warn_below:
        return warn(name, text, f"a {purpose} wants at least {warn_below / GIB:.1f} GiB free")
    return ok(name, text)


def check_metrics(port: int, *, running: bool, marker: str, flag: str) -> Check:
    """The Prometheus endpoint: free before start, serving ``marker`` while running."""
    name = "metrics"
    if port == 0:
        return skip(name, f"metrics_port = 0 (off); {flag} turns it on")
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 — loopback only
            body = resp.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError):
        binds = check_bindable([f"/ip4/127.0.0.1/tcp/{port}"], name=name)[0]
        if binds.status == OK and running:
            return warn(name, f"the process runs but nothing answers on {url}",
                        "was it started with another metrics port?")
        if binds.status == OK:
            return ok(name, f"127.0.0.1:{port} is free for the Prometheus endpoint")
        return binds
    if marker in body:
        return ok(name, f"{url} serves KNEXA metrics ({marker})")
    return fail(name, f"{url} answers, but not with KNEXA metrics", "choose another metrics_port")
