"""Envelope bytes → JSON-able dict (bytes as hex), used for the golden ``.json`` files."""

from __future__ import annotations

import dataclasses
from typing import Any

from protocol import open_envelope


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"hex": value.hex()}
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def envelope_json(blob: bytes) -> dict[str, Any]:
    env, msg = open_envelope(blob)
    return {
        "v": env.v,
        "type": env.type,
        "sender": env.sender,
        "ts": env.ts_ms,
        "nonce": env.nonce.hex(),
        "sig": env.sig.hex(),
        "body": {f.name: _jsonable(getattr(msg, f.name)) for f in dataclasses.fields(msg)},
    }


def record_json(blob: bytes) -> dict[str, Any]:
    """An unsigned record (exchange 1.1.0) → its fields; no envelope around it."""
    from protocol.boxes import decode_record

    record = decode_record(blob)
    return {"type": type(record).__name__,
            **{f.name: _jsonable(getattr(record, f.name)) for f in dataclasses.fields(record)}}
