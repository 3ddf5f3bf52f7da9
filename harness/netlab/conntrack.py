"""Drop a router's NAT mappings: flush its connection-tracking table.

Masquerade keeps each mapping (LAN ip:port ↔ public port) in conntrack; flushing the
table is what a NAT reboot or a mapping timeout does to the peers: packets from outside
on an old mapping now hit the router itself and are answered with a reset, so a daemon
must notice and reconnect. ``conntrack -F`` (Debian package ``conntrack``) does this,
but it is one more package; the request it sends is a single ctnetlink message
(``IPCTNL_MSG_CT_DELETE`` with no attributes = delete all), so we send it ourselves
from a tiny stdlib-only program started inside the router's namespace.
"""

from __future__ import annotations

import sys

from harness.netlab.system import NetlabError, ns_exec

# Runs as ``python -I -c`` inside the namespace: stdlib only, prints the kernel's answer.
FLUSH_SOURCE = r"""
import socket, struct, sys
NETLINK_NETFILTER, NLM_F_REQUEST, NLM_F_ACK, NLMSG_ERROR = 12, 1, 4, 2
CT_DELETE = (1 << 8) | 2  # NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE
failed = 0
with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as s:
    s.bind((0, 0))
    s.settimeout(5)
    for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), 1):
        body = struct.pack("=BBH", family, 0, 0)  # nfgenmsg: family, version 0, res_id 0
        s.send(struct.pack("=IHHII", 16 + len(body), CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body)
        data = s.recv(65536)
        typ = struct.unpack("=H", data[4:6])[0]
        err = struct.unpack("=i", data[16:20])[0] if typ == NLMSG_ERROR else 0
        # ENOENT: nothing tracked for that family, which is a successful flush too
        if err not in (0, -2):
            print(f"family {family}: error {err}", file=sys.stderr)
            failed = 1
print("flushed")
sys.exit(failed)
"""


def flush(ns: str) -> None:
    """Delete every conntrack entry (IPv4 and IPv6) of namespace ``ns``."""
    res = ns_exec(ns, [sys.executable, "-I", "-c", FLUSH_SOURCE], check=False)
    if res.returncode != 0 or "flushed" not in res.stdout:
        raise NetlabError(["conntrack-flush", ns], res.returncode, res.stderr)
