"""Write tests/vectors/<Type>.msgpack (signed envelope bytes) and <Type>.json (decoded)."""

from __future__ import annotations

import json
from pathlib import Path

from protocol import Identity, seal

from .samples import NONCE, SIGNER_SEED, TS_MS, sample_messages
from .to_json import envelope_json

HERE = Path(__file__).parent


def main() -> None:
    ident = Identity(SIGNER_SEED)
    for name, msg in sample_messages().items():
        blob = seal(msg, ident, ts_ms=TS_MS, nonce=NONCE)
        (HERE / f"{name}.msgpack").write_bytes(blob)
        (HERE / f"{name}.json").write_text(json.dumps(envelope_json(blob), indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
