"""A multi-host NAT testbed on one machine, from Linux network namespaces.

``NatTestbed`` builds a public segment (CPM, relay …) and organisations behind real
nftables NATs, starts processes inside, caps uplinks and drops NAT mappings;
``sweep`` removes leftovers of crashed runs; ``netns_available`` says whether this
machine can do it (and why not). It knows nothing about KNEXA — it builds networks
and starts processes — so any test or tool can use it. docs/harness.md §Topology nat.
"""

from harness.netlab.cleanup import PREFIX, sweep
from harness.netlab.system import NetlabError, netns_available, ns_argv
from harness.netlab.testbed import NAT_MODES, PUBLIC_NET, LanHost, NatTestbed, Org, PublicHost

__all__ = ["NAT_MODES", "PREFIX", "PUBLIC_NET", "LanHost", "NatTestbed", "NetlabError", "Org", "PublicHost",
           "netns_available", "ns_argv", "sweep"]
