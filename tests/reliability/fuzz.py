"""Frame fuzzer: mutate valid KNEXA frames and throw them at running services over libp2p.

Seeds are real, validly signed frames of every request type a protocol accepts. Each
mutation (deterministic from a seed) does one of: flip bits, overwrite/insert/delete
bytes, truncate, append junk, rewrite the varint length, splice two frames, replace a
msgpack value inside the envelope while keeping its signature, or send random bytes.
Each fuzz frame goes on its own fresh stream (the protocols are one request per stream),
the write side is half-closed, and the outcome is classified: an ``Error{code}`` frame,
a reset/close, or — the failure we hunt — a non-``Error`` answer to a mutated frame.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio

from protocol.codec import pack
from protocol.envelope import open_envelope
from protocol.framing import encode_varint
from protocol.messages import Error
from tests.reliability.netkit import raw_send


def frame(payload: bytes) -> bytes:
    return encode_varint(len(payload)) + payload


def _msgpack_value_swap(rng: random.Random, payload: bytes) -> bytes:
    """Decode the envelope map and replace one value with a hostile one (signature kept)."""
    try:
        env = msgpack.unpackb(payload, raw=False)
    except Exception:  # noqa: BLE001 — the seed might not be a map after earlier mutation
        return payload
    if not isinstance(env, dict) or not env:
        return payload
    key = rng.choice(sorted(env))
    hostile = rng.choice([
        None, True, -1, 2**63 - 1, 1.5, float("inf"), "", "x" * 300, b"", b"\x00" * 70, [], {}, [[[[]]]],
        {"a": 1}, msgpack.ExtType(rng.randrange(128), b"\x00" * 4), "Directive", "Register", 2,
    ])
    env[key] = hostile
    if rng.random() < 0.3 and isinstance(env.get("body"), bytes):
        try:
            body = msgpack.unpackb(env["body"], raw=False)
            if isinstance(body, dict) and body:
                body[rng.choice(sorted(body))] = rng.choice([None, -1, 1e308, "", [1.0] * 1000, {"x": []}])
                env["body"] = msgpack.packb(body, use_bin_type=True)
        except Exception:  # noqa: BLE001 — keep the mutated outer map
            pass
    try:
        return msgpack.packb(env, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return pack({"v": 1})


def mutate(rng: random.Random, payloads: list[bytes]) -> bytes:
    """One hostile frame (wire bytes including the length prefix) from valid payloads."""
    p = bytearray(rng.choice(payloads))
    op = rng.randrange(11)
    if op == 0:  # bit flips
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(p))
            p[i] ^= 1 << rng.randrange(8)
    elif op == 1:  # overwrite a run
        i = rng.randrange(len(p))
        for j in range(i, min(len(p), i + rng.randint(1, 16))):
            p[j] = rng.randrange(256)
    elif op == 2:  # insert bytes
        i = rng.randrange(len(p) + 1)
        p[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
    elif op == 3:  # delete a run
        i = rng.randrange(len(p))
        del p[i : i + rng.randint(1, 32)]
    elif op == 4:  # truncated frame: honest length prefix, body cut short
        cut = rng.randrange(len(p))
        return encode_varint(len(p)) + bytes(p[:cut])
    elif op == 5:  # lying length prefix (shorter, longer or huge)
        lie = rng.choice([0, 1, len(p) - 1, len(p) + 1, len(p) * 2, 2**20, 2**31, 2**62])
        return encode_varint(max(lie, 0)) + bytes(p)
    elif op == 6:  # two frames spliced into one
        q = rng.choice(payloads)
        i, j = rng.randrange(len(p)), rng.randrange(len(q))
        p = p[:i] + bytearray(q[j:])
    elif op == 7:  # msgpack-aware value swap (signature untouched)
        p = bytearray(_msgpack_value_swap(rng, bytes(p)))
    elif op == 8:  # random bytes of random length
        p = bytearray(rng.randbytes(rng.randint(0, 512)))
    elif op == 9:  # random msgpack document
        doc = rng.choice([[1, 2, 3], {"v": 1, "type": "Register"}, "hello", 42, None, {"": {"": [b"\xff"]}}])
        p = bytearray(msgpack.packb(doc, use_bin_type=True))
    else:  # two valid frames back to back inside one length (extra data)
        p = p + bytearray(rng.choice(payloads))
    return frame(bytes(p))


@dataclass
class FuzzReport:
    sent: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    accepted: list[bytes] = field(default_factory=list)  # non-Error answers to mutated frames

    @property
    def rejected(self) -> int:
        return self.sent - len(self.accepted)


async def fuzz(host: Any, info: Any, protocol: str, payloads: list[bytes], *, n: int, seed: int,
               signer: str, concurrency: int = 8) -> FuzzReport:
    """Send ``n`` mutated frames (``concurrency`` streams at a time) and classify replies."""
    rng = random.Random(seed)
    originals = {frame(p) for p in payloads}
    frames = []
    while len(frames) < n:
        f = mutate(rng, payloads)
        if f not in originals:
            frames.append(f)
    report = FuzzReport()
    send, recv = trio.open_memory_channel[bytes](concurrency * 2)

    async def worker(items: trio.MemoryReceiveChannel[bytes]) -> None:
        async with items:
            async for data in items:
                reply = await raw_send(host, info, protocol, data, timeout_s=30)
                report.sent += 1
                if reply.frame is None:
                    report.codes["reset" if reply.reset else "closed"] += 1
                    continue
                try:
                    _, msg = open_envelope(reply.frame, expected_sender=signer)
                except Exception as exc:  # noqa: BLE001 — a garbled answer is a finding too
                    report.codes[f"bad-answer:{type(exc).__name__}"] += 1
                    report.accepted.append(data)
                    continue
                if isinstance(msg, Error):
                    report.codes[msg.code] += 1
                else:
                    report.codes[f"ANSWERED:{type(msg).__name__}"] += 1
                    report.accepted.append(data)

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker, recv.clone())
        await recv.aclose()
        async with send:
            for data in frames:
                await send.send(data)
    return report
