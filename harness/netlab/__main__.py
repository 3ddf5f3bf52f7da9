"""``python -m harness.netlab check|sweep`` — for an operator after a crashed run.

``check`` prints whether this machine can build the testbed (and why not, exit 1);
``sweep`` removes the namespaces and processes of dead runs (``kx<hex>-…`` whose owner
is gone) and prints what it removed. A live run is never touched.
"""

from __future__ import annotations

import sys

from harness.netlab import netns_available, sweep


def main(argv: list[str]) -> int:
    if argv == ["check"]:
        ok, why = netns_available()
        print("ok: network namespaces available" if ok else f"unavailable: {why}")
        return 0 if ok else 1
    if argv == ["sweep"]:
        removed = sweep()
        print("\n".join(removed) if removed else "nothing to sweep")
        return 0
    print("usage: python -m harness.netlab check|sweep", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
