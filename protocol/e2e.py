"""End-to-end encryption of knowledge between two peers, on top of Noise.

Noise protects the hop; this protects the payload itself so that it is readable only by
the student named in the directive, even if a future deployment relays it. Keys: both
peers' Ed25519 identity keys converted to X25519 (libsodium's
``crypto_sign_ed25519_*_to_curve25519``), NaCl ``Box`` (XSalsa20-Poly1305) with a
random 24-byte nonce per chunk. The plaintext binds ``directive_id`` and the chunk
``index``, so a chunk cannot be replayed into another transfer or reordered.
"""

from __future__ import annotations

import nacl.bindings
import nacl.exceptions
import nacl.public

from .codec import pack, unpack_strict
from .envelope import Identity
from .errors import BadSignature, DecryptionFailed, MalformedFrame
from .peerid import public_key_from_peer_id

_DOMAIN = "knexa/e2e/1"


class E2EBox:
    """Shared box between ``me`` and ``peer_id`` (symmetric: either side can open)."""

    def __init__(self, me: Identity, peer_id: str) -> None:
        try:
            peer_x = nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(public_key_from_peer_id(peer_id))
        except (ValueError, nacl.exceptions.RuntimeError) as exc:
            raise BadSignature(f"peer key cannot be converted for E2E: {exc}") from None
        self._box = nacl.public.Box(
            nacl.public.PrivateKey(me.curve25519_private()), nacl.public.PublicKey(peer_x)
        )

    def seal_chunk(self, directive_id: str, index: int, payload: bytes) -> bytes:
        return bytes(self._box.encrypt(pack([_DOMAIN, directive_id, index, payload])))

    def open_chunk(self, directive_id: str, index: int, box: bytes) -> bytes:
        try:
            plain = self._box.decrypt(box)
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            raise DecryptionFailed("chunk does not decrypt with this peer pair") from None
        try:
            domain, got_id, got_index, payload = unpack_strict(plain)
        except (MalformedFrame, ValueError, TypeError):
            raise DecryptionFailed("chunk plaintext malformed") from None
        if domain != _DOMAIN or got_id != directive_id or got_index != index:
            raise DecryptionFailed("chunk is bound to another directive or index")
        if not isinstance(payload, bytes):
            raise DecryptionFailed("chunk payload must be bytes")
        return payload
