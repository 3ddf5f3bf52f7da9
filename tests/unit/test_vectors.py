"""Golden vectors: the committed bytes decode to the committed JSON, and re-encoding the
sample messages reproduces the committed bytes exactly (Ed25519 is deterministic)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from protocol import Identity, seal
from tests.vectors.samples import NONCE, SIGNER_SEED, TS_MS, sample_messages
from tests.vectors.to_json import envelope_json

VECTORS = Path(__file__).parent.parent / "vectors"
SAMPLES = sample_messages()


def test_every_message_type_has_a_vector() -> None:
    from protocol import MESSAGE_TYPES

    assert set(SAMPLES) == set(MESSAGE_TYPES)
    assert {p.stem for p in VECTORS.glob("*.msgpack")} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_bytes_decode_to_golden_json(name: str) -> None:
    blob = (VECTORS / f"{name}.msgpack").read_bytes()
    assert envelope_json(blob) == json.loads((VECTORS / f"{name}.json").read_text())


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_encoding_reproduces_golden_bytes(name: str) -> None:
    blob = seal(SAMPLES[name], Identity(SIGNER_SEED), ts_ms=TS_MS, nonce=NONCE)
    assert blob == (VECTORS / f"{name}.msgpack").read_bytes()
