"""Write tests/vectors/<Type>.msgpack (signed envelope bytes; for an unsigned record, the
record bytes) and <Type>.json (decoded), and the exchange 1.1.0 stream vector
(exchange_1_1_0.bin: the frames a teacher writes; exchange_1_1_0.json: inputs and
intermediate values). Existing files must come out byte for byte the same
(``git diff --stat tests/vectors`` after a run shows only what was added on purpose)."""

from __future__ import annotations

import json
from pathlib import Path

from protocol import Identity, seal
from protocol.boxes import encode_record

from . import stream_vector
from .samples import NONCE, SIGNER_SEED, TS_MS, sample_messages, sample_records
from .to_json import envelope_json, record_json

HERE = Path(__file__).parent


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def main() -> None:
    ident = Identity(SIGNER_SEED)
    for name, msg in sample_messages().items():
        blob = seal(msg, ident, ts_ms=TS_MS, nonce=NONCE)
        (HERE / f"{name}.msgpack").write_bytes(blob)
        _write_json(HERE / f"{name}.json", envelope_json(blob))
    for name, record in sample_records().items():
        blob = encode_record(record)
        (HERE / f"{name}.msgpack").write_bytes(blob)
        _write_json(HERE / f"{name}.json", record_json(blob))
    frames, described = stream_vector.build()
    (HERE / "exchange_1_1_0.bin").write_bytes(b"".join(frames))
    _write_json(HERE / "exchange_1_1_0.json", described)


if __name__ == "__main__":
    main()
