"""Signed envelopes: every message on every KNEXA protocol travels inside one.

Wire form (a msgpack map, exactly these keys)::

    {"v": 1, "type": str, "sender": peer_id, "ts": int ms, "nonce": 16 bytes,
     "body": bytes (msgpack of the message), "sig": 64 bytes}

``sig`` is Ed25519 over ``pack(["knexa/envelope", v, type, sender, ts, nonce,
sha256(body)])``: the exact body bytes received are what is verified (through their
digest), so no re-canonicalisation can make two parties disagree. Signing the SHA-256
digest rather than the body keeps 1 MiB knowledge chunks cheap: Ed25519 would hash the
whole message twice with SHA-512, which cost more than the stream itself (see
docs/performance.md). The verifying key is recovered from ``sender`` (an inlined
Ed25519 peer ID), and callers pass ``expected_sender`` = the Noise-authenticated remote
peer, so a valid envelope is bound to the connection it arrived on.
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from dataclasses import dataclass
from typing import Any

import nacl.bindings
import nacl.exceptions
import nacl.signing

from .codec import decode_body, encode_body, message_type, pack, unpack_strict
from .errors import BadSignature, MalformedFrame, UnknownMessage, UnsupportedVersion
from .peerid import peer_id_from_public_key, public_key_from_peer_id

PROTOCOL_VERSION = 1
NONCE_BYTES = 16
_DOMAIN = "knexa/envelope"
_KEYS = frozenset({"v", "type", "sender", "ts", "nonce", "body", "sig"})


def now_ms() -> int:
    return int(time.time() * 1000)


class Identity:
    """An Ed25519 identity: the libp2p host key *is* the envelope signing key.

    ``seed`` is the 32-byte private key as libp2p's ``Ed25519PrivateKey.to_bytes()``
    returns it, so ``SigningKey(seed)`` signs exactly as the libp2p key would.
    """

    __slots__ = ("_signing", "_secret", "public_key", "peer_id")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise ValueError("Ed25519 seed must be 32 bytes")
        self._signing = nacl.signing.SigningKey(seed)
        self.public_key = bytes(self._signing.verify_key)
        self.peer_id = peer_id_from_public_key(self.public_key)
        # libsodium's 64-byte secret key (seed || public key), for ``sign``'s direct call
        self._secret = seed + self.public_key

    @classmethod
    def generate(cls) -> Identity:
        return cls(os.urandom(32))

    @property
    def seed(self) -> bytes:
        return bytes(self._signing)

    def sign(self, data: bytes) -> bytes:
        """The detached Ed25519 signature (the same bytes ``SigningKey.sign`` gives);
        libsodium directly, because PyNaCl's wrapper objects cost ~40 % of a small
        signature and the CPM signs every Ack (docs/performance.md "Ingest profile")."""
        return nacl.bindings.crypto_sign(data, self._secret)[: nacl.bindings.crypto_sign_BYTES]

    def curve25519_private(self) -> bytes:
        return bytes(self._signing.to_curve25519_private_key())

    def __repr__(self) -> str:  # never print key material
        return f"Identity({self.peer_id})"


def signed_bytes(v: int, type_name: str, sender: str, ts_ms: int, nonce: bytes, body_digest: bytes) -> bytes:
    """The exact bytes an envelope signature covers (docs/protocol.md §4): the domain tag,
    the header fields and sha256(body). Public so a streaming encoder that hashes the body
    piecewise (``protocol.knowledge``) signs the same bytes as ``Envelope``."""
    return pack([_DOMAIN, v, type_name, sender, ts_ms, nonce, body_digest])


@dataclass(frozen=True, slots=True)
class Envelope:
    v: int
    type: str
    sender: str
    ts_ms: int
    nonce: bytes
    body: bytes
    sig: bytes

    def signed_bytes(self) -> bytes:
        return signed_bytes(self.v, self.type, self.sender, self.ts_ms, self.nonce,
                            hashlib.sha256(self.body).digest())

    def to_bytes(self) -> bytes:
        return pack(
            {
                "v": self.v,
                "type": self.type,
                "sender": self.sender,
                "ts": self.ts_ms,
                "nonce": self.nonce,
                "body": self.body,
                "sig": self.sig,
            }
        )


def seal(
    message: Any, identity: Identity, *, ts_ms: int | None = None, nonce: bytes | None = None
) -> bytes:
    """Sign ``message`` as ``identity`` and return the envelope's wire bytes."""
    type_name = message_type(message)
    ts = now_ms() if ts_ms is None else ts_ms
    nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
    body = encode_body(message)
    # one Envelope, signed over the same bytes as Envelope.signed_bytes (hot path: every Ack)
    sig = identity.sign(signed_bytes(PROTOCOL_VERSION, type_name, identity.peer_id, ts, nonce,
                                     hashlib.sha256(body).digest()))
    return Envelope(PROTOCOL_VERSION, type_name, identity.peer_id, ts, nonce, body, sig).to_bytes()


def parse_envelope(data: bytes) -> Envelope:
    """Structural decode only (no signature check)."""
    raw = unpack_strict(data)
    if not isinstance(raw, dict):
        raise MalformedFrame("envelope must be a map")
    if "v" in raw and isinstance(raw["v"], int) and not isinstance(raw["v"], bool):
        if raw["v"] != PROTOCOL_VERSION:
            raise UnsupportedVersion(f"envelope version {raw['v']} (we speak {PROTOCOL_VERSION})")
    if set(raw) != _KEYS:
        raise MalformedFrame(f"envelope keys mismatch: {sorted(map(str, raw))}")
    checks = (
        ("v", int),
        ("type", str),
        ("sender", str),
        ("ts", int),
        ("nonce", bytes),
        ("body", bytes),
        ("sig", bytes),
    )
    for key, tp in checks:
        if not isinstance(raw[key], tp) or isinstance(raw[key], bool):
            raise MalformedFrame(f"envelope field {key} must be {tp.__name__}")
    if len(raw["nonce"]) != NONCE_BYTES:
        raise MalformedFrame("envelope nonce must be 16 bytes")
    if len(raw["sig"]) != 64:
        raise BadSignature("signature must be 64 bytes")
    return Envelope(raw["v"], raw["type"], raw["sender"], raw["ts"], raw["nonce"], raw["body"], raw["sig"])


@functools.lru_cache(maxsize=4096)
def _public_key(sender: str) -> bytes:
    """``public_key_from_peer_id``, remembered: a node hears the same few senders again
    and again (base58 decoding was ~5 % of the CPM's CPU per profile). Bounded, and a
    sender that is not an Ed25519 peer ID raises, which is never cached."""
    return public_key_from_peer_id(sender)


def open_envelope(
    data: bytes,
    *,
    expected_sender: str | None = None,
    allowed: tuple[type, ...] | None = None,
) -> tuple[Envelope, Any]:
    """Decode, verify the signature against ``sender``'s key, decode the body.

    ``expected_sender``: the Noise-authenticated remote peer ID (or the CPM's ID for a
    directive); a mismatch is a ``BadSignature`` even if the signature itself is valid.
    ``allowed``: message classes acceptable here; others are ``UnknownMessage``.
    """
    env = parse_envelope(data)
    if expected_sender is not None and env.sender != expected_sender:
        raise BadSignature(f"envelope sender {env.sender} is not the authenticated peer")
    public_key = _public_key(env.sender)
    try:  # libsodium directly: what VerifyKey.verify does, minus its per-call wrapper objects
        nacl.bindings.crypto_sign_open(env.sig + env.signed_bytes(), public_key)
    except nacl.exceptions.BadSignatureError:
        raise BadSignature("envelope signature does not verify") from None
    message = decode_body(env.type, env.body)
    if allowed is not None and not isinstance(message, allowed):
        raise UnknownMessage(f"{env.type} is not allowed on this protocol")
    return env, message
