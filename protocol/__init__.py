"""KNEXA wire protocol — sans-IO: messages, codec, envelopes, replay guard, E2E, framing.

Imports only the standard library, msgpack and PyNaCl (tests/unit/test_protocol_purity.py
enforces it) so any implementation, test or fuzzer can use it without a network stack.
"""

from .codec import decode_body, encode_body
from .directives import verify_directive
from .e2e import E2EBox
from .envelope import PROTOCOL_VERSION, Envelope, Identity, now_ms, open_envelope, parse_envelope, seal
from .errors import (
    BadSignature,
    ConfigError,
    DecryptionFailed,
    Expired,
    FrameTooLarge,
    KnexaError,
    MalformedFrame,
    TruncatedFrame,
    PeerUnavailable,
    ProtocolError,
    Replay,
    Unauthorized,
    UnknownMessage,
    UnsupportedVersion,
)
from .framing import FrameDecoder, encode_frame, encode_varint
from .knowledge import KnowledgeItem, KnowledgePackage, decode_package, encode_package
from .messages import *  # noqa: F403  (the message classes are the public API)
from .messages import MESSAGE_TYPES
from .peerid import peer_id_from_public_key, public_key_from_peer_id
from .replay import ReplayGuard

__all__ = [
    "PROTOCOL_VERSION",
    "MESSAGE_TYPES",
    "BadSignature",
    "ConfigError",
    "DecryptionFailed",
    "E2EBox",
    "Envelope",
    "Expired",
    "FrameDecoder",
    "FrameTooLarge",
    "Identity",
    "KnexaError",
    "KnowledgeItem",
    "KnowledgePackage",
    "MalformedFrame",
    "TruncatedFrame",
    "PeerUnavailable",
    "ProtocolError",
    "Replay",
    "ReplayGuard",
    "Unauthorized",
    "UnknownMessage",
    "UnsupportedVersion",
    "decode_body",
    "decode_package",
    "encode_body",
    "encode_frame",
    "encode_package",
    "encode_varint",
    "now_ms",
    "open_envelope",
    "parse_envelope",
    "peer_id_from_public_key",
    "public_key_from_peer_id",
    "seal",
    "verify_directive",
    *MESSAGE_TYPES,
]
