"""The NAT testbed (``harness.netlab``) behaves like organisations behind real NATs.

Every test builds its own namespaces (unique ``kx<hex>`` names, 198.18.0.0/16 public
segment, 192.168.x LANs) and removes them; nothing is connected to the machine's own
network. Where namespaces cannot be created (not root, no ``ip``/``nft``), every test
skips with the reason ``netns_available`` gives; CI runs as root and installs
iproute2 + nftables (.ci/run), so there they run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from harness.netlab import NatTestbed, netns_available, sweep
from harness.netlab.system import list_namespaces, process_alive
from harness.netlab.testbed import MAX_ORGS

REPO = Path(__file__).resolve().parents[2]
TOOLS = [sys.executable, "-m", "tests.e2e.netns_tools"]
log = structlog.get_logger(__name__)


@pytest.fixture(scope="module")
def netns_ok() -> None:
    ok, why = netns_available()
    if not ok:
        pytest.skip(f"network namespaces unavailable: {why}")


@pytest.fixture()
def tb(netns_ok: None) -> Iterator[NatTestbed]:
    with NatTestbed(orgs=2, hosts_per_org=2) as bed:
        yield bed


def _wait_file(path: Path, proc: subprocess.Popen | None = None, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited {proc.returncode} before writing {path.name}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path.name} not written after {timeout}s")
        time.sleep(0.05)
    return json.loads(path.read_text())


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _serve(tb: NatTestbed, ns: str, addr: str, tmp: Path, name: str) -> tuple[int, Path]:
    ready, seen = tmp / f"{name}.ready", tmp / f"{name}.log"
    proc = tb.run(ns, [*TOOLS, "tcp-serve", addr, str(ready), str(seen)], cwd=REPO)
    return _wait_file(ready, proc)["port"], seen


def _dial(tb: NatTestbed, ns: str, host: str, port: int, timeout_s: float = 3.0) -> dict:
    res = tb.exec(ns, [*TOOLS, "tcp-dial", host, str(port), "--timeout", str(timeout_s)], timeout_s=60)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _leftovers(tag: str) -> tuple[list[str], list[str]]:
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return [n for n in list_namespaces() if n.startswith(tag)], [line for line in links.splitlines() if tag in line]


def test_layout_and_bad_arguments_need_no_namespace() -> None:
    bed = NatTestbed(["acme", "globex"], hosts_per_org=2, public_hosts=("cpm", "relay"))
    assert bed.public_addr("relay") == "198.18.0.11" and bed.router_addr("globex") == "198.18.1.2"
    assert bed.lan_addr(1, host=1) == "192.168.2.11" and bed.org(1).lan_net == "192.168.2.0/24"
    assert all(ns.startswith(f"{bed.tag}-") for ns in bed.namespaces()) and len(bed.namespaces()) == 9
    with pytest.raises(RuntimeError):
        bed.run(bed.lan_ns(0), ["true"])  # not up
    bed.close()  # never built: nothing to do, no error
    for kw in ({"orgs": 0}, {"orgs": ["a", "a"]}, {"public_hosts": ("pub",)}, {"public_hosts": ("r1",)},
               {"hosts_per_org": 0}, {"orgs": MAX_ORGS + 1}):
        with pytest.raises(ValueError):
            NatTestbed(**kw)


def test_lan_host_reaches_public_server_through_masquerade(tb: NatTestbed, tmp_path: Path) -> None:
    port, seen = _serve(tb, tb.public_ns("cpm"), tb.public_addr("cpm"), tmp_path, "srv")
    out = _dial(tb, tb.lan_ns(0), tb.public_addr("cpm"), port)
    assert out == {"ok": True, "reply": "pong"}
    # the server saw the router's public address, never the private one: a real NAT
    assert [e["peer"][0] for e in _lines(seen)] == [tb.router_addr(0)]


def test_nobody_outside_can_open_a_connection_into_a_lan(tb: NatTestbed, tmp_path: Path) -> None:
    a_lan, a_router = tb.lan_addr(0), tb.router_addr(0)
    port, seen = _serve(tb, tb.lan_ns(0), a_lan, tmp_path, "lan-a")
    # control: the server is up and reachable from its own LAN
    assert _dial(tb, tb.lan_ns(0, host=1), a_lan, port)["ok"]
    # the public side: no route to a private LAN, and no port forwarding on the router
    assert not _dial(tb, tb.public_ns("cpm"), a_lan, port)["ok"]
    assert not _dial(tb, tb.public_ns("cpm"), a_router, port)["ok"]
    # worst case, a neighbour that routes org A's LAN via org A's router: the forward
    # policy still drops a new inbound connection
    tb.exec(tb.public_ns("cpm"), ["ip", "route", "add", tb.org(0).lan_net, "via", a_router])
    assert not _dial(tb, tb.public_ns("cpm"), a_lan, port)["ok"]
    # org B's LAN host, even with its router routing org A's LAN across the public segment
    assert not _dial(tb, tb.lan_ns(1), a_lan, port)["ok"]
    tb.exec(tb.router_ns(1), ["ip", "route", "add", tb.org(0).lan_net, "via", a_router])
    assert not _dial(tb, tb.lan_ns(1), a_lan, port)["ok"]
    # only the control connection ever reached the server
    assert [e["peer"][0] for e in _lines(seen)] == [tb.lan_addr(0, host=1)]


def test_libp2p_hosts_exchange_a_stream_across_the_nat(tb: NatTestbed, tmp_path: Path) -> None:
    ready, seen = tmp_path / "p2p.ready", tmp_path / "p2p.log"
    listener = tb.run(tb.public_ns("cpm"), [*TOOLS, "p2p-listen", tb.public_addr("cpm"), str(ready), str(seen)],
                      cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    maddr = _wait_file(ready, listener, timeout=120)["addrs"][0]
    assert maddr.startswith(f"/ip4/{tb.public_addr('cpm')}/tcp/")
    res = tb.exec(tb.lan_ns(0), [*TOOLS, "p2p-dial", maddr], timeout_s=120)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["reply"] == "through the nat"[::-1]
    (entry,) = _lines(seen)
    assert entry["peer"] == out["peer"]  # the Noise-authenticated dialer
    assert entry["remote"][0] == tb.router_addr(0)  # …arriving from org A's NAT address


def _tracked(tb: NatTestbed, port: int) -> list[str]:
    """Conntrack entries of org A's router towards ``port`` (conntrack CLI or procfs)."""
    ns = tb.router_ns(0)
    res = tb.exec(ns, ["conntrack", "-L"], check=False) if _has("conntrack") else None
    text = res.stdout if res is not None and res.returncode == 0 else \
        tb.exec(ns, ["cat", "/proc/net/nf_conntrack"], check=False).stdout
    return [line for line in text.splitlines() if f"dport={port} " in line]


def _has(tool: str) -> bool:
    import shutil

    return shutil.which(tool) is not None


def _flush_under_a_live_connection(tb: NatTestbed, tmp_path: Path) -> list[str]:
    """A LAN host holds a TCP connection to the public segment; the NAT's mappings are
    flushed; the public side then writes on it. Returns the writes' outcomes."""
    listable = _has("conntrack") or Path("/proc/net/nf_conntrack").exists()
    ready, held = tmp_path / "push.ready", tmp_path / "held.ready"
    server = tb.run(tb.public_ns("cpm"), [*TOOLS, "tcp-push", tb.public_addr("cpm"), str(ready)], cwd=REPO,
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    port = _wait_file(ready, server)["port"]
    client = tb.run(tb.lan_ns(0), [*TOOLS, "tcp-dial", tb.public_addr("cpm"), str(port), "--hold", str(held)],
                    cwd=REPO, stdout=subprocess.DEVNULL)
    _wait_file(held, client)
    if listable:
        before = _tracked(tb, port)
        assert len(before) == 1 and "ESTABLISHED" in before[0] and f"dst={tb.router_addr(0)} " in before[0]
    tb.flush_nat(0)
    if listable:
        assert _tracked(tb, port) == []
    assert client.poll() is None  # the endpoints did not notice: only the NAT forgot
    out, _ = server.communicate("go\n", timeout=60)
    return json.loads(out.strip().splitlines()[-1])


def test_flush_nat_drops_the_mapping_of_a_live_connection(tb: NatTestbed, tmp_path: Path) -> None:
    """Default NAT (``rfc5382``): the public side's writes on the forgotten mapping reach
    the router, which drops them silently — no reset comes back; the connection is dead
    without either end being told (what a daemon's keepalive and timeouts must catch)."""
    if not (_has("conntrack") or Path("/proc/net/nf_conntrack").exists()):
        pytest.skip("no conntrack listing (conntrack CLI or /proc/net/nf_conntrack): the mapping cannot be checked")
    outcomes = _flush_under_a_live_connection(tb, tmp_path)
    assert outcomes and set(outcomes) == {"ok"}, outcomes


def test_flush_nat_of_a_resetting_router_resets_the_public_side(netns_ok: None, tmp_path: Path) -> None:
    """``nat="reset"`` (a bare Linux router): the same writes reach the router's own TCP
    stack, which answers RST."""
    with NatTestbed(orgs=1, nat="reset") as bed:
        outcomes = _flush_under_a_live_connection(bed, tmp_path)
    assert outcomes[-1] in ("ConnectionResetError", "BrokenPipeError"), outcomes


@pytest.mark.parametrize("qdisc,mbit", [("tbf", 16), ("htb", 4.5)])
def test_cap_uplink_installs_the_requested_rate(tb: NatTestbed, tmp_path: Path, qdisc: str, mbit: float) -> None:
    assert tb.uplink_shaping(0) is None
    tb.cap_uplink(0, mbit, qdisc=qdisc)
    assert tb.uplink_shaping(0) == (qdisc, int(mbit * 1_000_000))
    assert tb.uplink_shaping(1) is None  # per organisation
    shown = tb.exec(tb.router_ns(0), ["tc", "qdisc", "show", "dev", f"{tb.tag}-up"]).stdout
    assert f"qdisc {qdisc} " in shown
    # throughput, for the log only (never asserted: the machine is shared)
    ready = tmp_path / "sink.ready"
    sink = tb.run(tb.public_ns("cpm"), [*TOOLS, "tcp-sink", tb.public_addr("cpm"), str(ready)], cwd=REPO)
    port = _wait_file(ready, sink)["port"]
    res = tb.exec(tb.lan_ns(0), [*TOOLS, "tcp-send", tb.public_addr("cpm"), str(port), str(1 << 20)], timeout_s=120)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["bytes"] == 1 << 20
    log.info("netlab.test.throughput", qdisc=qdisc, cap_mbit=mbit,
             measured_mbit=round(out["bytes"] * 8 / max(out["seconds"], 1e-6) / 1e6, 2))
    tb.uncap_uplink(0)
    assert tb.uplink_shaping(0) is None


def test_close_leaves_no_namespace_link_or_process(netns_ok: None, tmp_path: Path) -> None:
    bed = NatTestbed(orgs=2, public_hosts=("cpm", "relay")).up()
    try:
        procs = [bed.run(ns, ["sleep", "3600"]) for ns in (bed.lan_ns(1), bed.router_ns(0), bed.public_ns("relay"))]
        # a process someone else started inside (e.g. the harness supervisor) is stopped too
        other = subprocess.Popen(["ip", "netns", "exec", bed.lan_ns(0), "sleep", "3600"], start_new_session=True)
        # 2 LAN hosts + 2 routers + cpm + relay + the public bridge
        assert len(_leftovers(bed.tag)[0]) == len(bed.namespaces()) == 7
    finally:
        bed.close()
    bed.close()  # idempotent
    assert _leftovers(bed.tag) == ([], [])
    other.wait(timeout=10)
    assert [p.poll() for p in procs] == [-signal.SIGTERM] * 3
    assert not any(process_alive(p.pid) for p in [*procs, other])


def test_sweep_spares_a_live_testbed(tb: NatTestbed) -> None:
    assert not any(ns.startswith(tb.tag) for ns in sweep())
    assert len(_leftovers(tb.tag)[0]) == len(tb.namespaces())


def _owner(tmp_path: Path) -> tuple[subprocess.Popen, dict]:
    ready = tmp_path / "owner.ready"
    owner = subprocess.Popen([*TOOLS, "own-testbed", str(ready)], cwd=REPO, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=(tmp_path / "owner.err").open("wb"))
    return owner, _wait_file(ready, owner, timeout=120)


def test_sigkilled_owner_is_cleaned_by_sweep(netns_ok: None, tmp_path: Path) -> None:
    owner, info = _owner(tmp_path)
    owner.send_signal(signal.SIGKILL)
    owner.wait(timeout=30)
    # the crash left everything behind; the sleeper without PDEATHSIG is still running
    assert sorted(_leftovers(info["tag"])[0]) == sorted(info["namespaces"])
    assert process_alive(info["pids"][1])
    # what an operator runs after a crash (the harness sweeps on its own at start)
    res = subprocess.run([sys.executable, "-m", "harness.netlab", "sweep"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert set(info["namespaces"]) <= set(res.stdout.split())
    assert _leftovers(info["tag"]) == ([], [])
    deadline = time.monotonic() + 10
    while any(process_alive(p) for p in info["pids"]) and time.monotonic() < deadline:
        time.sleep(0.05)  # killed processes are reaped by init, not by us
    assert not any(process_alive(p) for p in info["pids"])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_owner_tears_everything_down(netns_ok: None, tmp_path: Path, sig: int) -> None:
    owner, info = _owner(tmp_path)
    owner.send_signal(sig)  # to the owner only, as a terminal Ctrl-C reaches the foreground process
    rc = owner.wait(timeout=60)
    assert rc == (130 if sig == signal.SIGINT else -signal.SIGTERM), (tmp_path / "owner.err").read_text()
    assert _leftovers(info["tag"]) == ([], [])  # no sweep needed
    assert not any(process_alive(p) for p in info["pids"])


@pytest.mark.parametrize(("nat", "expected"), [("rfc5382", "holepunch"), ("reset", "relay"), ("symmetric", "relay")])
def test_hole_punch_through_the_nats_depends_on_how_they_behave(netns_ok: None, tmp_path: Path, nat: str,
                                                                expected: str) -> None:
    """Two peers, each behind its own NAT, a relay on the public segment; the student
    opens a stream as the daemon does (direct → relay → DCUtR) and both sides record
    the path of the connection the stream runs on. Through RFC 5382 NATs the punch
    succeeds (TCP simultaneous open from both listen ports); a router that answers an
    unsolicited SYN with RST, or maps each connection to a random port, leaves only the
    relay (docs/networking.md §Hole punching has the packet traces)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with NatTestbed(orgs=2, public_hosts=("relay",), nat=nat) as bed:
        relay_ready, log_path = tmp_path / "relay.ready", tmp_path / "paths.log"
        relay = bed.run(bed.public_ns("relay"), [*TOOLS, "p2p-relay", bed.public_addr("relay"), str(relay_ready)],
                        cwd=REPO, env=env)
        _wait_file(relay_ready, relay, timeout=120)
        teacher_ready, student_ready = tmp_path / "teacher.ready", tmp_path / "student.ready"
        teacher = bed.run(bed.lan_ns(1), [*TOOLS, "p2p-peer", bed.lan_addr(1), str(relay_ready), str(teacher_ready),
                                          str(log_path)], cwd=REPO, env=env)
        _wait_file(teacher_ready, teacher, timeout=120)
        student = bed.run(bed.lan_ns(0), [*TOOLS, "p2p-peer", bed.lan_addr(0), str(relay_ready), str(student_ready),
                                          str(log_path), str(teacher_ready)], cwd=REPO, env=env)
        assert student.wait(timeout=180) == 0
        seen = {e["side"]: e["path"] for e in _lines(log_path)}
    log.info("test.netns.holepunch", nat=nat, paths=seen)
    assert seen == {"student": expected, "teacher": expected}
