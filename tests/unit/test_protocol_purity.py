"""protocol/ is sans-IO: importing it pulls in no networking, async or ML stack."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("torch", "trio", "libp2p", "numpy", "multiaddr", "transformers", "structlog", "socket_server")


def test_protocol_imports_only_stdlib_msgpack_nacl() -> None:
    code = (
        "import sys, json\n"
        "import protocol, protocol.knowledge, protocol.directives, protocol.ids\n"
        "print(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    assert not loaded & set(FORBIDDEN), loaded & set(FORBIDDEN)
    third_party = {m for m in loaded if m not in sys.stdlib_module_names and not m.startswith("_")}
    assert third_party <= {"protocol", "msgpack", "nacl", "cffi", "cython_runtime"}, third_party
