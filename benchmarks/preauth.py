"""Pre-authentication memory: hostile multistream-select clients against a real CPM.

    python -m benchmarks.preauth [--connections 24] [--mib 64] [--json]

What runs: ``knexa-cpm init --open`` in a temporary home, then ``knexa-cpm serve`` as a
subprocess on 127.0.0.1 (port 0). ``--connections`` plain TCP clients (threads of this
process, no libp2p) each send the multistream-select header, announce a protocol name
of ``--announce`` bytes (1 GiB by default) and stream filler until the CPM closes the
connection, ``--mib`` MiB were sent, or ``--seconds`` passed. This is the attack of
py-libp2p advisory GHSA-hmjq-g7pp-rw3x (issue 14 §4): py-libp2p 0.8.1 buffers the
announced name before any authentication. Meanwhile the CPM's VmRSS is sampled from
/proc every 20 ms. Afterwards a fresh identity sends ``Register`` over a real
Noise + yamux connection (``cpm.admin.call``): the node must still answer.

Reported: RSS before, peak (sampled max and the kernel's VmHWM), after, the growth
(peak − before), whether the CPM is alive, whether the legitimate request got its
``Registered`` (and how long it took), how many hostile connections the CPM closed,
the bytes each could push before that (client side: includes what sat in kernel
buffers, so it is an upper bound on what the node read), and the CPM's
``p2p.preauth.refused`` log lines by reason (plus their ``suppressed`` counts: the node
logs one line per reason and address per 10 s, so this is a lower bound on refusals).

``tests/e2e/test_preauth_process.py`` drives the same functions with a hard bound.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file too (python benchmarks/preauth.py)
    sys.path.insert(0, str(REPO))

from p2p.logs import log_events  # noqa: E402
from protocol.framing import encode_varint  # noqa: E402 — the multistream length prefix is the same varint

MULTISTREAM_HEADER = b"/multistream/1.0.0\n"
CHUNK = 64 * 1024


def hostile_preamble(announce: int) -> bytes:
    """A well-formed multistream header, then a protocol name ``announce`` bytes long."""
    return encode_varint(len(MULTISTREAM_HEADER)) + MULTISTREAM_HEADER + encode_varint(announce)


@dataclass(slots=True)
class HostileResult:
    sent: int = 0
    closed_by_peer: bool = False
    error: str = ""


def hostile_connection(host: str, port: int, *, announce: int, limit_bytes: int, seconds: float) -> HostileResult:
    """Stream filler after an oversized name until the node closes, ``limit_bytes`` or ``seconds``."""
    res = HostileResult()
    deadline = time.monotonic() + seconds
    filler = b"\0" * CHUNK
    try:
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.settimeout(2.0)  # a node that stops reading without closing stalls sendall
            sock.sendall(hostile_preamble(announce))
            while res.sent < limit_bytes and time.monotonic() < deadline:
                sock.sendall(filler)
                res.sent += CHUNK
            # stopped sending: did the node close (EOF) or does it keep the socket?
            while time.monotonic() < deadline:
                try:
                    if not sock.recv(CHUNK):
                        res.closed_by_peer = True
                        break
                except TimeoutError:
                    continue
    except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
        res.closed_by_peer = True
    except TimeoutError as exc:
        res.error = f"timeout: {exc}"
    except OSError as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    return res


def hostile_burst(host: str, port: int, connections: int, *, announce: int = 1 << 30,
                  limit_bytes: int = 64 << 20, seconds: float = 20.0) -> list[HostileResult]:
    """``connections`` hostile clients at once (threads); returns when all have stopped."""
    results = [HostileResult() for _ in range(connections)]

    def one(i: int) -> None:
        results[i] = hostile_connection(host, port, announce=announce, limit_bytes=limit_bytes, seconds=seconds)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 15)
    return results


def vm_kib(pid: int, field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of ``pid`` in KiB (0 once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return 0


class RssSampler:
    """Samples a process's VmRSS on a thread; ``peak_kib`` is the largest value seen."""

    def __init__(self, pid: int, interval_s: float = 0.02) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak_kib = vm_kib(pid, "VmRSS")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, vm_kib(self.pid, "VmRSS"))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def legit_register(addr: str, timeout_s: float = 20.0) -> tuple[bool, float, str]:
    """One ``Register`` from a fresh identity over Noise + yamux: (answered, ms, detail)."""
    import multiaddr
    import trio

    from cpm.admin import call
    from p2p.host import build_host, parse_peer_addr
    from protocol.envelope import Identity
    from protocol.errors import KnexaError
    from protocol.ids import CPM_PROTOCOL, MAX_FRAME_CPM
    from protocol.messages import Register, Registered

    ident = Identity.generate()
    outcome: list[Any] = []

    async def main() -> None:
        host = build_host(ident.seed, dial_timeout_s=timeout_s)
        async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            try:
                _, reply = await call(host, parse_peer_addr(addr), ident,
                                      Register("org-bench", "gpt2", ("/ip4/127.0.0.1/tcp/1",), "bench"),
                                      protocol_id=CPM_PROTOCOL, max_frame=MAX_FRAME_CPM, timeout_s=timeout_s)
                outcome.append(reply)
            except KnexaError as exc:
                outcome.append(exc)

    t0 = time.monotonic()
    trio.run(main)
    ms = (time.monotonic() - t0) * 1000
    reply = outcome[0] if outcome else None
    return isinstance(reply, Registered), ms, type(reply).__name__


def refusals(stderr_text: str) -> dict[str, int]:
    """``p2p.preauth.refused`` events (JSON log lines) counted by reason, suppressed included."""
    counts: Counter[str] = Counter()
    for doc in log_events(stderr_text, "p2p.preauth.refused"):
        counts[str(doc.get("reason"))] += 1 + int(doc.get("suppressed", 0))
    return dict(counts)


def attack(pid: int, addr: str, connections: int, *, announce: int, limit_bytes: int,
           seconds: float) -> dict[str, Any]:
    """Run the burst against a CPM already listening at ``addr``; measure; ask once."""
    import multiaddr

    ma = multiaddr.Multiaddr(addr)
    host, port = ma.value_for_protocol("ip4"), int(ma.value_for_protocol("tcp"))
    before = vm_kib(pid, "VmRSS")
    t0 = time.monotonic()
    with RssSampler(pid) as sampler:
        results = hostile_burst(host, port, connections, announce=announce, limit_bytes=limit_bytes,
                                seconds=seconds)
        attack_s = time.monotonic() - t0
        time.sleep(0.5)  # let the node finish tearing the connections down
    after = vm_kib(pid, "VmRSS")
    hwm = vm_kib(pid, "VmHWM")
    alive = vm_kib(pid, "VmRSS") > 0
    ok, ms, detail = legit_register(addr) if alive else (False, 0.0, "node dead")
    sent = sorted(r.sent for r in results)
    return {
        "connections": connections,
        "announce_bytes": announce,
        "limit_mib_per_connection": limit_bytes / (1 << 20),
        "attack_s": round(attack_s, 2),
        "rss_before_mib": round(before / 1024, 1),
        "rss_peak_mib": round(sampler.peak_kib / 1024, 1),
        "vmhwm_mib": round(hwm / 1024, 1),
        "rss_after_mib": round(after / 1024, 1),
        "growth_mib": round((sampler.peak_kib - before) / 1024, 1),
        "alive": alive,
        "legit_answered": ok,
        "legit_reply": detail,
        "legit_ms": round(ms, 1),
        "closed_by_node": sum(r.closed_by_peer for r in results),
        "client_sent_mib_max": round(sent[-1] / (1 << 20), 2) if sent else 0.0,
        "client_sent_mib_median": round(sent[len(sent) // 2] / (1 << 20), 2) if sent else 0.0,
        "client_errors": sorted({r.error for r in results if r.error}),
        "results": [asdict(r) for r in results] if connections <= 4 else None,
    }


def start_cpm(home: Path, log: Path) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "cpm.cli"]
    subprocess.run([*cli, "init", "--home", str(home), "--open", "--listen", "/ip4/127.0.0.1/tcp/0"],
                   cwd=REPO, env=env, check=True, capture_output=True)
    ready = home / "ready.json"
    with log.open("wb") as err:
        proc = subprocess.Popen([*cli, "serve", "--home", str(home), "--ready-file", str(ready),
                                 "--log-format", "json"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise RuntimeError(f"CPM did not start:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=24)
    ap.add_argument("--mib", type=float, default=64.0, help="filler per connection at most (MiB)")
    ap.add_argument("--announce", type=int, default=1 << 30, help="announced protocol-name length (bytes)")
    ap.add_argument("--seconds", type=float, default=20.0, help="per-connection time limit")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="knexa-preauth-") as tmp:
        home, log = Path(tmp) / "cpm", Path(tmp) / "cpm.stderr"
        proc, ready = start_cpm(home, log)
        try:
            report = attack(proc.pid, ready["addrs"][0], args.connections, announce=args.announce,
                            limit_bytes=int(args.mib * (1 << 20)), seconds=args.seconds)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        report["refusals_logged"] = refusals(log.read_text(errors="replace"))
    from importlib.metadata import version

    report["libp2p"] = version("libp2p")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            if value is not None:
                print(f"{key:>26}: {value}")
    return 0 if report["alive"] and report["legit_answered"] else 1


if __name__ == "__main__":
    sys.exit(main())
