"""libp2p peer IDs for Ed25519 keys, computed without libp2p (sans-IO).

A libp2p Ed25519 peer ID is the *identity* multihash of the protobuf-encoded public
key: ``0x00 0x24 | 08 01 12 20 | <32-byte key>`` rendered in base58btc. Because the
key is inlined, a verifier can recover the public key from the peer ID alone: that is
what binds an envelope signature to the peer the Noise session authenticated.
"""

from __future__ import annotations

from .errors import BadSignature

_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_INDEX = {c: i for i, c in enumerate(_ALPHABET)}
# identity multihash (0x00), length 36, protobuf PublicKey{Type=Ed25519(1), Data=32 bytes}
_ED25519_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])
MAX_PEER_ID_LEN = 128


def b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_ALPHABET[r])
    pad = len(data) - len(data.lstrip(b"\0"))
    return "1" * pad + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    if len(text) > MAX_PEER_ID_LEN:
        raise BadSignature("peer id too long")
    n = 0
    for ch in text:
        try:
            n = n * 58 + _INDEX[ch]
        except KeyError:
            raise BadSignature(f"invalid base58 character {ch!r} in peer id") from None
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    pad = len(text) - len(text.lstrip("1"))
    return b"\0" * pad + body


def peer_id_from_public_key(public_key: bytes) -> str:
    """Base58 peer ID of a 32-byte Ed25519 public key (same as libp2p's ``ID.from_pubkey``)."""
    if len(public_key) != 32:
        raise ValueError("Ed25519 public key must be 32 bytes")
    return b58encode(_ED25519_PREFIX + public_key)


def public_key_from_peer_id(peer_id: str) -> bytes:
    """Recover the Ed25519 public key inlined in a peer ID; other key types are refused."""
    raw = b58decode(peer_id)
    if len(raw) != len(_ED25519_PREFIX) + 32 or not raw.startswith(_ED25519_PREFIX):
        raise BadSignature("peer id is not an inlined Ed25519 key")
    return raw[len(_ED25519_PREFIX) :]
