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

from collections.abc import Sequence
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

    def __init__(self, orgs: Sequence[str], uplink_mbit: float | None = None) -> None:
        from harness.netlab import NatTestbed

        # the harness turns SIGINT/SIGTERM into exceptions and closes us in `finally`
        self.testbed = NatTestbed(list(orgs), public_hosts=("cpm",), handle_signals=False)
        self.uplink_mbit = uplink_mbit

    def up(self) -> None:
        self.testbed.up()
        if self.uplink_mbit:
            for org in self.testbed.orgs:
                self.testbed.cap_uplink(org.index, self.uplink_mbit)
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
        return {"topology": self.name, "uplink_mbit": self.uplink_mbit, **self.testbed.describe()}


def topology_for(name: str, orgs: Sequence[str], uplink_mbit: float | None = None) -> Loopback:
    if name == "loopback":
        return Loopback()
    if name == "nat":
        return Nat(orgs, uplink_mbit)
    raise ValueError(f"unknown topology {name!r}; known: {', '.join(TOPOLOGIES)}")
