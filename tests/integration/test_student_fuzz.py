"""A hostile teacher that mutates a valid chunk stream, in both exchange versions, over
real hosts: whatever it sends, the student either gets exactly the package the teacher
sealed or raises a typed ``KnexaError`` — never another exception, never a hang, and
never a different plaintext. 1.1.0's chunks carry no signature, so this is what
guards them: the box, the record parser and the signed trailer.

The default suite runs a few dozen mutations per version; ``make test-reliability``
runs ``tests/reliability/test_fuzz_services.py::test_fuzz_student_*`` with more.
"""

from __future__ import annotations

import random

import pytest

from protocol import KnexaError, encode_varint
from protocol.framing import decode_varint
from protocol.ids import EXCHANGE_PROTOCOL, EXCHANGE_PROTOCOL_1_1
from tests.integration.test_knowledge_stream import chunk, scripted, student_receives
from tests.integration.test_knowledge_stream import trailer as trailer_1_0
from tests.integration.test_knowledge_stream_v11 import good as good_1_1

PIECES = (b"a" * 100, b"b" * 100, b"c" * 37)
PLAIN = b"".join(PIECES)


def valid_stream(protocol: str) -> list[bytes]:
    """A correct stream of three chunks and the trailer, signed now (inside the ±120 s window)."""
    if protocol == EXCHANGE_PROTOCOL_1_1:
        return good_1_1(*PIECES)
    return [*(chunk(i, p) for i, p in enumerate(PIECES)), trailer_1_0(len(PIECES), PLAIN)]


def _flip(frame: bytes, rng: random.Random) -> bytes:
    """One payload byte changed; the varint length prefix stays valid. Half the flips
    land in the first 48 bytes, where the parsers decide (keys, types, index, nonce)."""
    length, used = decode_varint(frame)
    body = bytearray(frame[used:])
    span = len(body) if rng.random() < 0.5 else min(len(body), 48)
    body[rng.randrange(span)] ^= 1 << rng.randrange(8)
    return encode_varint(length) + bytes(body)


def mutate(frames: list[bytes], rng: random.Random) -> list[bytes]:
    frames = list(frames)
    kind = rng.choice(("flip", "flip", "drop", "duplicate", "swap", "truncate", "garbage"))
    i = rng.randrange(len(frames))
    if kind == "flip":
        frames[i] = _flip(frames[i], rng)
    elif kind == "drop":
        del frames[i]
    elif kind == "duplicate":
        frames.insert(i, frames[i])
    elif kind == "swap":
        j = rng.randrange(len(frames))
        frames[i], frames[j] = frames[j], frames[i]
    elif kind == "truncate":
        frames = frames[:i]
    else:
        length, used = decode_varint(frames[i])
        frames[i] = encode_varint(length) + rng.randbytes(length)
    return frames


async def run_campaign(protocol: str, n: int, seed: int) -> dict[str, int]:
    """``n`` mutated streams → how often each outcome happened (``accepted`` = exactly
    PLAIN came out: a mutation that changed nothing, e.g. swapping a frame with itself).
    Fails on anything but a typed error or the original plaintext."""
    rng = random.Random(seed)
    outcomes: dict[str, int] = {}
    for _ in range(n):
        frames = mutate(valid_stream(protocol), rng)
        try:
            got = await student_receives(scripted(*frames), protocol=protocol, step_s=2.0)
        except KnexaError as exc:
            outcome = type(exc).__name__
        else:
            assert got == PLAIN, "a mutated stream produced a different package"
            outcome = "accepted"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return outcomes


@pytest.mark.parametrize("protocol", [EXCHANGE_PROTOCOL, EXCHANGE_PROTOCOL_1_1], ids=["1.0", "1.1"])
async def test_mutated_streams_give_the_package_or_a_typed_error(protocol: str) -> None:
    outcomes = await run_campaign(protocol, n=30, seed=7)
    # the campaign must exercise refusals, not just pass through untouched streams
    assert sum(outcomes.values()) == 30 and outcomes.get("accepted", 0) < 10, outcomes
