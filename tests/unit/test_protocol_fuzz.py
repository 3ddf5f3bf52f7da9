"""≥ 10,000 random and mutated frames: the decoder raises only typed ProtocolErrors."""

from __future__ import annotations

import random

from collections import Counter

import msgpack
import pytest

from protocol import (
    MESSAGE_TYPES,
    FrameDecoder,
    Identity,
    MalformedFrame,
    ProtocolError,
    decode_package,
    encode_frame,
    open_envelope,
    parse_envelope,
    seal,
)
from protocol.codec import pack
from protocol import knowledge
from protocol.envelope import Envelope
from protocol.knowledge import KnowledgeItem, KnowledgePackage, encode_package

from tests.vectors.samples import TS_MS, sample_messages

MAX_FRAME = 64 * 1024


def _valid_frames(ident: Identity) -> list[bytes]:
    return [encode_frame(seal(msg, ident, ts_ms=TS_MS), MAX_FRAME) for msg in sample_messages().values()]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if op == 0 and buf:  # flip a bit
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # truncate
            del buf[rng.randrange(len(buf)) :]
        elif op == 2:  # insert random bytes
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op == 3 and buf:  # overwrite with a msgpack marker (ext, map, huge array)
            i = rng.randrange(len(buf))
            buf[i] = rng.choice([0xC7, 0xD4, 0xD8, 0xDF, 0xDD, 0xC6, 0xDB, 0xC1])
        elif op == 4 and len(buf) > 2:  # duplicate a slice
            i = rng.randrange(len(buf) - 1)
            buf[i:i] = buf[i : i + rng.randint(1, 16)]
        else:  # replace the length prefix
            buf[:1] = rng.randbytes(1)
    return bytes(buf)


def _decode_all(data: bytes) -> int:
    """Run the full receive pipeline; return number of messages accepted."""
    dec = FrameDecoder(MAX_FRAME)
    dec.feed(data)
    accepted = 0
    while (frame := dec.next_frame()) is not None:
        open_envelope(frame)
        accepted += 1
    dec.close()
    return accepted


def _resigned_with_mutated_body(rng: random.Random, ident: Identity, frame: bytes) -> bytes:
    """Valid signature over a hostile body: exercises the body decoder, not just the MAC."""
    dec = FrameDecoder(MAX_FRAME)
    dec.feed(frame)
    env = parse_envelope(dec.next_frame())
    body = _mutate(rng, env.body) if rng.random() < 0.8 else env.body
    kind = env.type if rng.random() < 0.8 else rng.choice(["Pickle", "", "profile", "Profile\x00", *MESSAGE_TYPES])
    unsigned = Envelope(env.v, kind, ident.peer_id, env.ts_ms, env.nonce, body, b"")
    signed = Envelope(env.v, kind, ident.peer_id, env.ts_ms, env.nonce, body, ident.sign(unsigned.signed_bytes()))
    return encode_frame(signed.to_bytes(), MAX_FRAME)


def test_ten_thousand_mutated_frames_only_raise_protocol_errors() -> None:
    rng = random.Random(1234)
    ident = Identity(bytes(range(32)))
    seeds = _valid_frames(ident)
    errors: Counter[str] = Counter()
    accepted = 0
    for n in range(12_000):
        mode = n % 4
        if mode == 0:
            data = rng.randbytes(rng.randint(0, 200))  # pure noise
        elif mode == 1:
            data = _mutate(rng, rng.choice(seeds))  # raw frame mutation (length prefix included)
        elif mode == 2:
            # mutate the envelope, keep a correct length prefix so msgpack/envelope code runs
            dec = FrameDecoder(MAX_FRAME)
            dec.feed(rng.choice(seeds))
            data = encode_frame(_mutate(rng, dec.next_frame()), MAX_FRAME)
        else:
            data = _resigned_with_mutated_body(rng, ident, rng.choice(seeds))
        try:
            accepted += _decode_all(data)
        except ProtocolError as exc:
            errors[type(exc).__name__] += 1
    # every layer was reached and refused with its own typed error
    for name in ("MalformedFrame", "BadSignature", "FrameTooLarge", "UnknownMessage"):
        assert errors[name] > 20, errors
    assert sum(errors.values()) > 10_000
    # a mutated body that still decodes is a legitimately signed message (mode 3 re-signs)
    assert accepted < 2_000


def test_package_decoder_fuzz() -> None:
    rng = random.Random(99)
    pkg = KnowledgePackage(
        "tiny-qwen2",
        tuple(KnowledgeItem(f"i{i}", "def f(x):", "    return x*2", i % 12, 0.5) for i in range(5)),
        {"round": 1},
    )
    good = encode_package(pkg)
    assert decode_package(good) == pkg
    for _ in range(3_000):
        data = _mutate(rng, good)
        try:
            decode_package(data)
        except ProtocolError:
            pass


@pytest.mark.parametrize("payload", [pack({"family": 1, "items": [], "meta": {}}), pack({"family": "x", "items": [{"id": 1}], "meta": {}}), b"\xc1"])
def test_package_malformed(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_package(payload)


_GOOD_ITEM = {"id": "i1", "p": "def f(x):", "c": "    return x", "cat": 3, "s": 0.5}


@pytest.mark.parametrize(
    "override",
    [{"id": 1}, {"p": b"p"}, {"c": None}, {"cat": "3"}, {"cat": True}, {"cat": 1.5},
     {"s": "x"}, {"s": True}, {"s": float("nan")}, {"s": float("inf")}],
)
def test_package_item_field_types_are_checked(override: dict) -> None:
    with pytest.raises(MalformedFrame):
        decode_package(pack({"family": "f", "items": [{**_GOOD_ITEM, **override}], "meta": {}}))


@pytest.mark.parametrize("meta", [[1], {"k": [1]}, {"k": True}, {"k": None}, {b"k": 1}])
def test_package_meta_must_map_str_to_scalars(meta) -> None:
    with pytest.raises(MalformedFrame):
        decode_package(pack({"family": "f", "items": [], "meta": meta}))


def test_package_item_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(knowledge, "MAX_ITEMS", 2)
    assert len(decode_package(pack({"family": "f", "items": [_GOOD_ITEM] * 2, "meta": {}})).items) == 2
    with pytest.raises(MalformedFrame, match="more than 2 items"):
        decode_package(pack({"family": "f", "items": [_GOOD_ITEM] * 3, "meta": {}}))
