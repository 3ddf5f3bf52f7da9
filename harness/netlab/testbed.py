"""``NatTestbed``: organisations behind real NATs and a public segment, on one machine.

Layout (docs/harness.md §Topology nat has the diagram): a *public* namespace holds a
bridge (the "internet"); every public host (the CPM, a relay …) has its own namespace
with one veth on that bridge; every organisation has a *router* namespace (uplink veth
on the bridge with a public address, a LAN bridge, ``ip_forward=1``, nftables
masquerade on the uplink and a forward policy that lets in only established/related
traffic — a real NAT: nobody outside can open a connection into the LAN) and one or
more *LAN host* namespaces behind it.

NAT behaviour (``nat=``, measured with DCUtR in docs/networking.md §Hole punching):

* ``rfc5382`` (default) — what RFC 5382 asks of a NAT and a home router does:
  masquerade keeps the source port when it is free (endpoint-independent mapping), and
  an unsolicited inbound packet to the router is *dropped* (REQ-4: "MUST NOT respond to
  an unsolicited inbound SYN"), which is what lets a TCP simultaneous open (hole punch)
  through;
* ``reset`` — the same mapping, but the router's own TCP stack answers an unsolicited
  SYN with a RST, as a bare Linux box with masquerade does. The RST reaches the peer
  through its NAT and kills its half-open punch: hole punching fails;
* ``symmetric`` — ``masquerade fully-random``: a fresh random port per connection
  (endpoint-dependent mapping), unsolicited packets dropped. The port a peer learnt
  from the relay is not the one a punch would use: hole punching cannot work.

Addresses: the public segment is 198.18.0.0/16 (RFC 2544's benchmarking range: never
routed on the internet, and *not* RFC 1918, so py-libp2p's NAT code
(``libp2p.relay.circuit_v2.nat.is_private_ip``) classifies it as public, as it would a
real public IP), LANs are 192.168.<i+1>.0/24 (private, as a home/office LAN). Nothing
in the testbed is connected to the host's own namespace, so no packet can leave it.

Lifetime: everything is named ``<tag>-…`` with ``tag = kx<6 hex>``; ``close()`` (also
from ``atexit``, SIGINT and SIGTERM) kills every process in the testbed's namespaces and
deletes them, and ``harness.netlab.cleanup.sweep`` removes what a SIGKILLed owner left.
The class knows nothing about KNEXA: it builds networks and starts processes.
"""

from __future__ import annotations

import atexit
import re
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from harness.netlab import conntrack
from harness.netlab.cleanup import PREFIX, remove_marker, sweep, write_marker
from harness.netlab.system import (
    NFT,
    NetlabError,
    delete_namespace,
    ip_batch,
    kill_group,
    kill_pids,
    list_namespaces,
    ns_argv,
    ns_exec,
    ns_pids,
    process_alive,
    set_pdeathsig,
)

log = structlog.get_logger(__name__)

PUBLIC_NET = "198.18.0.0/16"
MAX_ORGS = 250
MAX_HOSTS_PER_ORG = 200
_NAME = re.compile(r"^[a-z][a-z0-9]{0,11}$")
_RESERVED = re.compile(r"^(pub|r\d+|o\d+h\d+)$")
_RATE = re.compile(r"\brate (\d+(?:\.\d+)?)([KMG]?)bit\b")
_UNIT = {"": 1, "K": 1_000, "M": 1_000_000, "G": 1_000_000_000}
NAT_MODES = ("rfc5382", "reset", "symmetric")
# Forward between interfaces; and where br_netfilter is loaded (it is on this machine
# kind, and its sysctls are per namespace, default 1), keep LAN-internal *bridged*
# frames out of the IP forward hook, whose drop policy would cut LAN hosts off from
# each other. Absent br_netfilter the file does not exist: nothing to do.
_ROUTER_SYSCTL = ("echo 1 > /proc/sys/net/ipv4/ip_forward && "
                  "{ [ ! -e /proc/sys/net/bridge/bridge-nf-call-iptables ] || "
                  "echo 0 > /proc/sys/net/bridge/bridge-nf-call-iptables; }")


@dataclass(frozen=True, slots=True)
class PublicHost:
    name: str
    ns: str
    addr: str  # on the public segment


@dataclass(frozen=True, slots=True)
class LanHost:
    org: int
    index: int
    ns: str
    addr: str  # private, only reachable inside its LAN


@dataclass(frozen=True, slots=True)
class Org:
    index: int
    name: str
    router_ns: str
    public_addr: str  # the router's uplink address: what the outside sees (masquerade)
    gateway: str  # the router's LAN address
    lan_net: str
    hosts: tuple[LanHost, ...]


class NatTestbed:
    """Build with ``with NatTestbed(orgs=2) as tb:`` (or ``up()`` / ``close()``).

    Synchronous; from trio, call ``up``/``close`` through ``trio.to_thread.run_sync``
    and use ``run`` like ``subprocess.Popen``. ``handle_signals=False`` leaves SIGINT
    and SIGTERM to a caller that already turns them into exceptions and calls
    ``close()`` in a ``finally`` (the harness does).
    """

    def __init__(self, orgs: int | Sequence[str] = 2, *, hosts_per_org: int = 1,
                 public_hosts: Sequence[str] = ("cpm",), prefix: str = PREFIX, grace_s: float = 5.0,
                 handle_signals: bool = True, sweep_first: bool = True, nat: str = "rfc5382") -> None:
        if nat not in NAT_MODES:
            raise ValueError(f"nat must be one of {NAT_MODES}, got {nat!r}")
        self.nat = nat
        names = [f"org-{i:02d}" for i in range(orgs)] if isinstance(orgs, int) else list(orgs)
        if len(set(names)) != len(names):
            raise ValueError(f"organisation names must be unique: {names}")
        if not 1 <= len(names) <= MAX_ORGS:
            raise ValueError(f"1..{MAX_ORGS} organisations, got {len(names)}")
        if not 1 <= hosts_per_org <= MAX_HOSTS_PER_ORG:
            raise ValueError(f"1..{MAX_HOSTS_PER_ORG} hosts per organisation, got {hosts_per_org}")
        bad = [p for p in public_hosts if not _NAME.match(p) or _RESERVED.match(p)]
        if bad or len(set(public_hosts)) != len(public_hosts):
            raise ValueError(f"public host names must be unique [a-z][a-z0-9]{{0,11}}, not pub/rN/oNhM: {bad}")
        if len(public_hosts) > 200:
            raise ValueError("at most 200 public hosts")
        self.prefix = prefix
        self.tag = f"{prefix}{secrets.token_hex(3)}"
        self.grace_s = grace_s
        self._handle_signals = handle_signals
        self._sweep_first = sweep_first
        t = self.tag
        self.pub_ns = f"{t}-pub"
        self.public = {name: PublicHost(name, f"{t}-{name}", f"198.18.0.{10 + k}")
                       for k, name in enumerate(public_hosts)}
        self.orgs = tuple(
            Org(i, name, f"{t}-r{i}", f"198.18.1.{i + 1}", f"192.168.{i + 1}.1", f"192.168.{i + 1}.0/24",
                tuple(LanHost(i, j, f"{t}-o{i}h{j}", f"192.168.{i + 1}.{10 + j}") for j in range(hosts_per_org)))
            for i, name in enumerate(names))
        self._procs: list[subprocess.Popen[Any]] = []
        self._lock = threading.RLock()
        self._started = False
        self._closed = False
        self._old_handlers: dict[int, Any] = {}

    # -- names and addresses --------------------------------------------------------------
    def namespaces(self) -> list[str]:
        """Every namespace of this testbed (created or planned), public bridge last."""
        out = [h.ns for o in self.orgs for h in o.hosts] + [o.router_ns for o in self.orgs]
        return out + [h.ns for h in self.public.values()] + [self.pub_ns]

    def org(self, org: int | str) -> Org:
        if isinstance(org, int):
            return self.orgs[org]
        for o in self.orgs:
            if o.name == org:
                return o
        raise KeyError(f"no organisation {org!r}")

    def public_ns(self, name: str = "cpm") -> str:
        return self.public[name].ns

    def public_addr(self, name: str = "cpm") -> str:
        """Address of public host ``name`` (e.g. the CPM) on the public segment."""
        return self.public[name].addr

    def router_ns(self, org: int | str) -> str:
        return self.org(org).router_ns

    def router_addr(self, org: int | str) -> str:
        """The organisation's public (NAT) address: what a public host sees as source."""
        return self.org(org).public_addr

    def lan_ns(self, org: int | str, host: int = 0) -> str:
        return self.org(org).hosts[host].ns

    def lan_addr(self, org: int | str, host: int = 0) -> str:
        return self.org(org).hosts[host].addr

    def describe(self) -> dict[str, Any]:
        """The layout as plain data (for logs and results files)."""
        return {
            "tag": self.tag, "public_net": PUBLIC_NET, "bridge_ns": self.pub_ns, "nat": self.nat,
            "public": {h.name: {"ns": h.ns, "addr": h.addr} for h in self.public.values()},
            "orgs": [{"name": o.name, "router_ns": o.router_ns, "public_addr": o.public_addr, "lan_net": o.lan_net,
                      "hosts": [{"ns": h.ns, "addr": h.addr} for h in o.hosts]} for o in self.orgs],
        }

    # -- lifecycle -------------------------------------------------------------------
    def __enter__(self) -> NatTestbed:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def up(self) -> NatTestbed:
        """Build everything; on any failure tear down what exists and re-raise."""
        with self._lock:
            if self._started:
                return self
            self._started = True
            if self._sweep_first:
                sweep(self.prefix)
            write_marker(self.tag)  # before the first namespace: a crash from here on is sweepable
            atexit.register(self.close)
            self._install_signal_handlers()
        t0 = time.monotonic()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        log.info("netlab.up", tag=self.tag, orgs=len(self.orgs), public=sorted(self.public),
                 namespaces=len(self.namespaces()), duration_ms=round((time.monotonic() - t0) * 1000))
        return self

    def _build(self) -> None:
        t = self.tag
        root = [f"netns add {ns}" for ns in self.namespaces()]
        for k, h in enumerate(self.public.values()):
            root.append(f"link add {t}-eth netns {h.ns} type veth peer name {t}-P{k} netns {self.pub_ns}")
        for o in self.orgs:
            root.append(f"link add {t}-up netns {o.router_ns} type veth peer name {t}-U{o.index} netns {self.pub_ns}")
            for h in o.hosts:
                root.append(f"link add {t}-eth netns {h.ns} type veth peer name {t}-L{h.index} netns {o.router_ns}")
        ip_batch(root)
        pub = ["link set lo up", f"link add {t}-br type bridge", f"link set {t}-br up"]
        pub += [f"link set {t}-P{k} master {t}-br up" for k in range(len(self.public))]
        pub += [f"link set {t}-U{o.index} master {t}-br up" for o in self.orgs]
        ip_batch(pub, self.pub_ns)
        for h in self.public.values():
            ip_batch(["link set lo up", f"addr add {h.addr}/16 dev {t}-eth", f"link set {t}-eth up"], h.ns)
        for o in self.orgs:
            router = ["link set lo up", f"addr add {o.public_addr}/16 dev {t}-up", f"link set {t}-up up",
                      f"link add {t}-lan type bridge", f"addr add {o.gateway}/24 dev {t}-lan", f"link set {t}-lan up"]
            router += [f"link set {t}-L{h.index} master {t}-lan up" for h in o.hosts]
            ip_batch(router, o.router_ns)
            for h in o.hosts:
                ip_batch(["link set lo up", f"addr add {h.addr}/24 dev {t}-eth", f"link set {t}-eth up",
                          f"route add default via {o.gateway}"], h.ns)
            ns_exec(o.router_ns, ["sh", "-c", _ROUTER_SYSCTL])
            ns_exec(o.router_ns, [NFT, "-f", "-"], input=self.nat_ruleset())

    def nat_ruleset(self) -> str:
        """The router's nftables program: masquerade out of the uplink; forward only
        LAN → uplink and replies (established/related). Everything else is dropped, so
        even a neighbour on the public segment that routes 192.168.x via this router
        cannot open a connection into the LAN. ``nat`` (module doc) picks the port
        mapping and whether the router itself drops (``rfc5382``, ``symmetric``) or
        answers (``reset``: its TCP stack sends RST) an unsolicited inbound packet."""
        t = self.tag
        masq = "masquerade fully-random" if self.nat == "symmetric" else "masquerade"
        silent = "" if self.nat == "reset" else (
            "  chain filter_in { type filter hook input priority filter; policy accept;\n"
            f'    iifname "{t}-up" ct state established,related accept\n'
            f'    iifname "{t}-up" drop\n'
            "  }\n")
        return (
            "table ip knexa_nat {\n"
            f'  chain nat_post {{ type nat hook postrouting priority srcnat; policy accept; oifname "{t}-up" {masq}; }}\n'
            "  chain filter_fwd { type filter hook forward priority filter; policy drop;\n"
            "    ct state established,related accept\n"
            f'    iifname "{t}-lan" oifname "{t}-up" accept\n'
            "  }\n"
            f"{silent}"
            "}\n"
        )

    def close(self) -> None:
        """Stop every process in the testbed's namespaces and delete them. Idempotent;
        safe from ``atexit`` and signal handlers."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self._started:
                return  # nothing was built, no handler installed
        try:
            self._stop_processes()
            mine = set(self.namespaces())
            for ns in [n for n in list_namespaces() if n in mine]:
                delete_namespace(ns)
            remove_marker(self.tag)
            log.info("netlab.closed", tag=self.tag)
        finally:
            self._restore_signal_handlers()
            atexit.unregister(self.close)

    def _stop_processes(self) -> None:
        """Our own children first (SIGTERM to their groups, ``grace_s``, SIGKILL), then
        anything else still inside our namespaces (e.g. started by a supervisor)."""
        live = [p for p in self._procs if p.poll() is None]
        present = set(list_namespaces())
        others = [pid for ns in self.namespaces() if ns in present for pid in ns_pids(ns)]
        for p in live:
            kill_group(p.pid, signal.SIGTERM)
        kill_pids(others, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline and (any(p.poll() is None for p in live)
                                               or any(process_alive(pid) for pid in others)):
            time.sleep(0.05)
        for p in self._procs:
            kill_group(p.pid, signal.SIGKILL)  # also the grandchildren left in the group
        for p in live:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.error("netlab.proc.unreaped", pid=p.pid)

    def _install_signal_handlers(self) -> None:
        if not self._handle_signals or threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, old in self._old_handlers.items():
            if signal.getsignal(sig) == self._on_signal:
                signal.signal(sig, old)
        self._old_handlers.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        """Tear down, then behave as the handler we replaced would (SIGINT: raise
        KeyboardInterrupt; SIGTERM with the default action: die by that signal)."""
        prev = self._old_handlers.get(signum, signal.SIG_DFL)
        log.warning("netlab.signal", tag=self.tag, signal=signal.Signals(signum).name)
        self.close()
        if callable(prev):
            prev(signum, frame)
        elif prev != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    # -- processes -------------------------------------------------------------------
    def _check_ns(self, ns: str) -> None:
        if ns not in self.namespaces():
            raise ValueError(f"{ns!r} is not a namespace of testbed {self.tag}")
        if self._closed or not self._started:
            raise RuntimeError(f"testbed {self.tag} is not up")

    def run(self, ns: str, argv: Sequence[str], **popen_kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``ns`` in its own process group (stdin closed unless
        given); ``close()`` stops it. From the main thread the child also gets
        ``PDEATHSIG=SIGTERM`` (dies with us if we are SIGKILLed)."""
        self._check_ns(ns)
        kw: dict[str, Any] = {"stdin": subprocess.DEVNULL, "start_new_session": True, "close_fds": True}
        if threading.current_thread() is threading.main_thread():
            kw["preexec_fn"] = set_pdeathsig
        kw.update(popen_kw)
        with self._lock:
            proc = subprocess.Popen(ns_argv(ns, argv), **kw)
            self._procs.append(proc)
        log.info("netlab.proc.started", ns=ns, pid=proc.pid, argv0=str(argv[0]))
        return proc

    def exec(self, ns: str, argv: Sequence[str], *, check: bool = True, timeout_s: float = 30.0,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a short command inside ``ns`` to completion (``NetlabError`` if ``check``)."""
        self._check_ns(ns)
        return ns_exec(ns, argv, check=check, timeout_s=timeout_s, input=input)

    # -- NAT and links ---------------------------------------------------------------
    def flush_nat(self, org: int | str) -> None:
        """Drop every NAT mapping of ``org``'s router (its conntrack table), as a NAT
        reboot or mapping timeout would: established connections through it break."""
        o = self.org(org)
        self._check_ns(o.router_ns)
        conntrack.flush(o.router_ns)
        log.info("netlab.nat.flushed", tag=self.tag, org=o.name)

    def cap_uplink(self, org: int | str, mbit: float, *, qdisc: str = "tbf") -> None:
        """Limit ``org``'s upload (router → public segment) to ``mbit`` Mbit/s with a
        token bucket (``tbf``) or a single ``htb`` class. Replaces an earlier cap."""
        o = self.org(org)
        if qdisc not in ("tbf", "htb"):
            raise ValueError(f"qdisc must be tbf or htb, got {qdisc!r}")
        if not mbit > 0:
            raise ValueError(f"mbit must be > 0, got {mbit!r}")
        dev, kbit = f"{self.tag}-up", max(1, round(mbit * 1000))
        self.uncap_uplink(org)
        if qdisc == "tbf":
            burst = max(32 * 1024, kbit * 1000 // 8 // 50)  # ≥ 20 ms of traffic: tbf needs burst ≥ rate/HZ
            self.exec(o.router_ns, ["tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{kbit}kbit",
                                    "burst", str(burst), "latency", "200ms"])
        else:
            self.exec(o.router_ns, ["tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1"])
            self.exec(o.router_ns, ["tc", "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb",
                                    "rate", f"{kbit}kbit", "ceil", f"{kbit}kbit"])
        log.info("netlab.uplink.capped", tag=self.tag, org=o.name, qdisc=qdisc, kbit=kbit)

    def uncap_uplink(self, org: int | str) -> None:
        o = self.org(org)
        self.exec(o.router_ns, ["tc", "qdisc", "del", "dev", f"{self.tag}-up", "root"], check=False)

    def uplink_shaping(self, org: int | str) -> tuple[str, int] | None:
        """(qdisc kind, rate in bit/s) shaping ``org``'s uplink, read back from ``tc``;
        None when the uplink is unshaped."""
        o = self.org(org)
        dev = f"{self.tag}-up"
        qdiscs = self.exec(o.router_ns, ["tc", "qdisc", "show", "dev", dev]).stdout
        for kind, cmd in (("tbf", ["tc", "qdisc", "show", "dev", dev]), ("htb", ["tc", "class", "show", "dev", dev])):
            if re.search(rf"^qdisc {kind} ", qdiscs, re.M):
                text = qdiscs if kind == "tbf" else self.exec(o.router_ns, cmd).stdout
                m = _RATE.search(text)
                if m is None:
                    raise NetlabError(cmd, 0, f"no rate in: {text}")
                return kind, round(float(m.group(1)) * _UNIT[m.group(2)])
        return None

