"""Typed errors. Each says whose fault it is and carries a stable wire ``code``.

``ProtocolError`` and its subclasses mean the *remote* sent something we refuse
(garbage, forgery, replay); callers answer with an ``Error{code}`` frame and reset
the stream. ``ConfigError`` is the local operator's fault; ``PeerUnavailable`` is the
network's.
"""

from __future__ import annotations


class KnexaError(Exception):
    """Root of every error KNEXA raises on purpose."""

    code = "internal"


class ProtocolError(KnexaError):
    """The remote violated the wire protocol (docs/protocol.md)."""

    code = "protocol"


class MalformedFrame(ProtocolError):
    """Bytes that do not decode to a valid message (bad msgpack, bad fields, truncated)."""

    code = "malformed"


class TruncatedFrame(MalformedFrame):
    """The stream ended inside a frame. On libp2p a killed peer looks exactly like this,
    so a reader may treat it as the peer being gone rather than as garbage. Same wire
    code as ``MalformedFrame``: it never travels, the receiver classifies it by type."""


class FrameTooLarge(ProtocolError):
    """Declared frame length exceeds the limit; refused before allocating."""

    code = "too_large"


class UnknownMessage(ProtocolError):
    """A message type we do not know, or one not allowed on this protocol."""

    code = "unknown_message"


class UnsupportedVersion(ProtocolError):
    """Envelope major version we do not speak."""

    code = "unsupported_version"


class BadSignature(ProtocolError):
    """Signature invalid, or signed by a key other than the claimed/authenticated peer."""

    code = "bad_signature"


class Replay(ProtocolError):
    """(sender, nonce) already seen inside the replay window, or a directive reused."""

    code = "replay"


class Expired(ProtocolError):
    """Timestamp outside the accepted window, or a directive past ``expires_at``."""

    code = "expired"


class DecryptionFailed(ProtocolError):
    """E2E box did not open, or its bound directive id / chunk index do not match."""

    code = "decryption_failed"


class Unauthorized(KnexaError):
    """Peer is not admitted (or revoked), or not named in the directive it presents."""

    code = "unauthorized"


class PeerUnavailable(KnexaError):
    """A peer could not be reached, or vanished / timed out mid-exchange."""

    code = "peer_unavailable"


class RateLimited(PeerUnavailable):
    """The peer sends requests faster than its per-peer budget (``p2p.ratelimit``).

    A ``PeerUnavailable`` on purpose: it is transient and nobody's data is wrong, so
    every client already does the right thing with it — back off and retry, keeping a
    queued Feedback in the durable outbox instead of discarding it.
    """

    code = "rate_limited"


class Unavailable(PeerUnavailable):
    """The remote is up but cannot serve the request now, and applied nothing of it:
    the CPM's store is locked past its timeout by another writer (a replica, the admin
    CLI), unreachable, or a commit failed. Transient, like ``RateLimited``: back off,
    send it again, keep queued feedback. Why its own code: a plain ``internal`` says
    "something broke", and a client cannot know that retrying is safe."""

    code = "unavailable"


class NotQuarantined(KnexaError):
    """Admin protocol: ``AdminRelease`` for a peer that is not a quarantined teacher
    (unknown, never quarantined, or already released); nothing changed. Neither a
    protocol violation nor transient: the operator named the wrong peer."""

    code = "not_quarantined"


class ConfigError(KnexaError):
    """Invalid local configuration; ``key`` names the offending setting."""

    code = "config"

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


ERROR_CODES: dict[str, type[KnexaError]] = {
    cls.code: cls
    for cls in (
        ProtocolError,
        MalformedFrame,
        FrameTooLarge,
        UnknownMessage,
        UnsupportedVersion,
        BadSignature,
        Replay,
        Expired,
        DecryptionFailed,
        Unauthorized,
        PeerUnavailable,
        RateLimited,
        Unavailable,
        NotQuarantined,
    )
}
ERROR_CODES["internal"] = KnexaError


def error_from_code(code: str, message: str) -> KnexaError:
    """Rebuild the typed error a remote reported in an ``Error`` frame."""
    cls = ERROR_CODES.get(code, KnexaError)
    return cls(message)
