"""End-to-end encryption of knowledge between two peers, on top of Noise.

Noise protects the hop; this protects the payload itself so that it is readable only by
the student named in the directive, even if a future deployment relays it. Keys: both
peers' Ed25519 identity keys converted to X25519 (libsodium's
``crypto_sign_ed25519_*_to_curve25519``), NaCl ``Box`` (XSalsa20-Poly1305) with a
random 24-byte nonce per chunk. The plaintext binds ``directive_id`` and the chunk
``index``, so a chunk cannot be replayed into another transfer or reordered.

Wire form of a box: ``nonce(24) ‖ crypto_box_easy_afternm(plaintext)`` — exactly what
``nacl.public.Box.encrypt`` returns. We call the ``*_easy_afternm`` bindings directly
because ``Box.encrypt`` copies a 1 MiB chunk three more times (``EncryptedMessage``), and
open the plaintext without unpacking the payload out of it when it has the canonical
layout. Sealing and opening run in worker threads beside the event loop
(``knexad.exchange``): the crypto releases the GIL, but every 1 MiB copy and allocation
holds it, and that time is taken from py-libp2p's loop (benchmarks/stream.py).
"""

from __future__ import annotations

import os

import nacl.bindings
import nacl.exceptions
import nacl.public

from .codec import pack, unpack_strict
from .envelope import Identity
from .errors import BadSignature, DecryptionFailed, MalformedFrame
from .peerid import public_key_from_peer_id

_DOMAIN = "knexa/e2e/1"
NONCE_BYTES = nacl.bindings.crypto_box_NONCEBYTES


def bin_header(length: int) -> bytes:
    """msgpack's header for a ``bin`` of ``length`` bytes, as ``pack`` writes it."""
    if length < 0x100:
        return b"\xc4" + length.to_bytes(1, "big")
    if length < 0x10000:
        return b"\xc5" + length.to_bytes(2, "big")
    return b"\xc6" + length.to_bytes(4, "big")


def _plain_head(directive_id: str, index: int) -> bytes:
    """Canonical msgpack of ``[domain, directive_id, index, payload]`` up to the payload's
    bin header."""
    return b"\x94" + pack(_DOMAIN) + pack(directive_id) + pack(index)


class E2EBox:
    """Shared box between ``me`` and ``peer_id`` (symmetric: either side can open)."""

    def __init__(self, me: Identity, peer_id: str) -> None:
        try:
            peer_x = nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(public_key_from_peer_id(peer_id))
        except (ValueError, nacl.exceptions.RuntimeError) as exc:
            raise BadSignature(f"peer key cannot be converted for E2E: {exc}") from None
        box = nacl.public.Box(nacl.public.PrivateKey(me.curve25519_private()), nacl.public.PublicKey(peer_x))
        self._key = box.shared_key()

    def seal_parts(self, directive_id: str, index: int, payload: bytes | memoryview) -> tuple[bytes, bytes]:
        """``(nonce, ciphertext)``: the box is their concatenation. Kept apart so a caller
        that frames the box can write both without joining them first."""
        nonce = os.urandom(NONCE_BYTES)
        plain = pack([_DOMAIN, directive_id, index, payload])
        return nonce, nacl.bindings.crypto_box_easy_afternm(plain, nonce, self._key)

    def seal_chunk(self, directive_id: str, index: int, payload: bytes | memoryview) -> bytes:
        nonce, cipher = self.seal_parts(directive_id, index, payload)
        return nonce + cipher

    def open_chunk_view(self, directive_id: str, index: int, box: bytes) -> memoryview:
        """The payload as a view into the decrypted plaintext (no copy of it).

        The canonical layout (what ``seal_chunk`` and any msgpack encoder using the
        smallest types produce) is checked by prefix; anything else goes through the
        strict unpacker, so both paths accept exactly the same plaintexts.
        """
        if len(box) < NONCE_BYTES:
            raise DecryptionFailed("chunk shorter than its nonce")
        try:
            plain = nacl.bindings.crypto_box_open_easy_afternm(box[NONCE_BYTES:], box[:NONCE_BYTES], self._key)
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            raise DecryptionFailed("chunk does not decrypt with this peer pair") from None
        head = _plain_head(directive_id, index)
        if plain.startswith(head):
            start = len(head)
            for header_len in (2, 3, 5):
                size = len(plain) - start - header_len
                if size >= 0 and plain[start : start + header_len] == bin_header(size):
                    return memoryview(plain)[start + header_len :]
        return memoryview(self._open_generic(directive_id, index, plain))

    def open_chunk(self, directive_id: str, index: int, box: bytes) -> bytes:
        return bytes(self.open_chunk_view(directive_id, index, box))

    @staticmethod
    def _open_generic(directive_id: str, index: int, plain: bytes) -> bytes:
        try:
            domain, got_id, got_index, payload = unpack_strict(plain)
        except (MalformedFrame, ValueError, TypeError):
            raise DecryptionFailed("chunk plaintext malformed") from None
        if domain != _DOMAIN or got_id != directive_id or got_index != index:
            raise DecryptionFailed("chunk is bound to another directive or index")
        if not isinstance(payload, bytes):
            raise DecryptionFailed("chunk payload must be bytes")
        return payload
