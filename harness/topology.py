"""Where the processes of an ``up`` run live on the network: ``loopback`` or ``nat``.

``loopback`` (the default) changes nothing: every process listens on 127.0.0.1 port 0.
``nat`` builds a ``harness.netlab.NatTestbed`` with one organisation per daemon: the
CPM runs in the public namespace and listens on its public address, each daemon runs
in its organisation's LAN namespace behind its own NAT router and listens on its LAN
address (docs/harness.md §Topology nat). The supervisor still owns the processes
(``ip netns exec`` execs the command, so pids, groups and ``pids.json`` are the same);
the testbed is closed after the supervisor stopped them, and kills anything left.

The federation only asks two questions — how to wrap an argv, and which ``--listen``
to pass — so the wiring stays out of ``harness.federation``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import structlog

log = structlog.get_logger(__name__)

TOPOLOGIES = ("loopback", "nat")


class Loopback:
    """Everything on 127.0.0.1 (the binaries' own default listen address)."""

    name = "loopback"

    def up(self) -> None:
        return None

    def close(self) -> None:
        return None

    def cpm_argv(self, argv: Sequence[str]) -> list[str]:
        return list(argv)

    def cpm_listen(self) -> list[str]:
        return []

    def node_argv(self, index: int, argv: Sequence[str]) -> list[str]:
        return list(argv)

    def node_listen(self, index: int) -> list[str]:
        return []

    def describe(self) -> dict[str, Any]:
        return {"topology": self.name}


class Nat(Loopback):
    """CPM on the public segment; daemon i alone in org i's LAN, behind org i's NAT."""

    name = "nat"

    def __init__(self, orgs: Sequence[str], uplink_mbit: float | None = None,
                 uplink_caps: Mapping[str, float] | None = None, *, nat: str = "rfc5382") -> None:
        from harness.netlab import NatTestbed

        # the harness turns SIGINT/SIGTERM into exceptions and closes us in `finally`;
        # nat: how the routers behave (harness.netlab.testbed, docs/networking.md §Hole punching)
        self.testbed = NatTestbed(list(orgs), public_hosts=("cpm",), handle_signals=False, nat=nat)
        self.uplink_mbit = uplink_mbit
        self.caps = uplink_table(orgs, uplink_mbit, uplink_caps)

    def up(self) -> None:
        self.testbed.up()
        for org, mbit in self.caps.items():
            self.testbed.cap_uplink(org, mbit)
        log.info("harness.topology.up", **self.describe())

    def close(self) -> None:
        self.testbed.close()

    def cpm_argv(self, argv: Sequence[str]) -> list[str]:
        from harness.netlab import ns_argv

        return ns_argv(self.testbed.public_ns("cpm"), argv)

    def cpm_listen(self) -> list[str]:
        return ["--listen", f"/ip4/{self.testbed.public_addr('cpm')}/tcp/0"]

    def node_argv(self, index: int, argv: Sequence[str]) -> list[str]:
        from harness.netlab import ns_argv

        return ns_argv(self.testbed.lan_ns(index), argv)

    def node_listen(self, index: int) -> list[str]:
        return ["--listen", f"/ip4/{self.testbed.lan_addr(index)}/tcp/0"]

    def describe(self) -> dict[str, Any]:
        return {"topology": self.name, "uplink_mbit": self.uplink_mbit, "uplink_caps": dict(self.caps),
                **self.testbed.describe()}


def parse_uplinks(values: Sequence[str], nodes: Sequence[str], orgs: Sequence[str]) -> tuple[float | None, dict[str, float]]:
    """``--uplink-mbit`` values → (cap for every org, {org: cap}). A value is ``N``
    (every organisation) or ``NAME=N`` with NAME a node (``node-01``) or an organisation
    (``org-01``): one teacher's upload can be capped while the others run free.
    Raises ValueError (the CLI's usage error) on an unknown name or a rate ≤ 0."""
    every: float | None = None
    caps: dict[str, float] = {}
    for value in values:
        name, sep, rate = str(value).rpartition("=")
        try:
            mbit = float(rate)
        except ValueError:
            raise ValueError(f"--uplink-mbit {value!r}: expected N or NAME=N (N in Mbit/s)") from None
        if not (mbit > 0 and math.isfinite(mbit)):
            raise ValueError(f"--uplink-mbit {value!r}: the rate must be a number > 0")
        if not sep:
            every = mbit
            continue
        if name in nodes:
            caps[orgs[list(nodes).index(name)]] = mbit
        elif name in orgs:
            caps[name] = mbit
        else:
            raise ValueError(f"--uplink-mbit {value!r}: no node or organisation {name!r} "
                             f"(known: {', '.join([*nodes, *orgs])})")
    return every, caps


def uplink_table(orgs: Sequence[str], every: float | None, caps: Mapping[str, float] | None) -> dict[str, float]:
    """org → upload cap in Mbit/s: ``every`` for each org, a per-organisation cap wins."""
    table = {org: float(every) for org in orgs} if every else {}
    table.update({org: float(v) for org, v in (caps or {}).items()})
    return table


def topology_for(name: str, orgs: Sequence[str], uplink_mbit: float | None = None,
                 uplink_caps: Mapping[str, float] | None = None, nat: str = "rfc5382") -> Loopback:
    if name == "loopback":
        return Loopback()
    if name == "nat":
        return Nat(orgs, uplink_mbit, uplink_caps, nat=nat)
    raise ValueError(f"unknown topology {name!r}; known: {', '.join(TOPOLOGIES)}")
