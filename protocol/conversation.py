"""The conversation rules: which message may open a stream of each protocol, and which
messages may answer it (docs/protocol.md §6). Next to the messages, so both ends and
the fuzzers read one table.

Every protocol answers any request with ``Error`` too; ``open_reply`` turns that into
the typed error it names, so callers never inspect error text.
"""

from __future__ import annotations

from typing import Any

from .envelope import Envelope, open_envelope
from .errors import error_from_code
from .ids import ADMIN_PROTOCOL, CPM_PROTOCOL, EXCHANGE_PROTOCOL, EXCHANGE_PROTOCOL_1_1
from .messages import (
    Ack,
    AdminAdmit,
    AdminQuery,
    AdminRelease,
    AdminResult,
    AdminRevoke,
    Directive,
    DirectiveRequest,
    Error,
    Feedback,
    KnowledgeBox,
    KnowledgeChunk,
    KnowledgeEnd,
    KnowledgeRequest,
    KnowledgeTrailer,
    NoDirective,
    PeerAddrs,
    PeerLookup,
    Profile,
    Register,
    Registered,
)

# request type → the message types that may answer it (besides Error)
REPLIES: dict[type, tuple[type, ...]] = {
    Register: (Registered,),
    Profile: (Ack, NoDirective),
    DirectiveRequest: (Directive, NoDirective),
    PeerLookup: (PeerAddrs,),
    Feedback: (Ack,),
    AdminAdmit: (Ack,),
    AdminRevoke: (Ack,),
    AdminRelease: (Ack,),
    AdminQuery: (AdminResult,),
    # a stream of chunks, then the trailer; which ones depends on the exchange version
    # (EXCHANGE_REPLIES): this entry is their union
    KnowledgeRequest: (KnowledgeChunk, KnowledgeEnd, KnowledgeTrailer),
}

# protocol → the requests a server accepts on it
REQUESTS: dict[str, tuple[type, ...]] = {
    CPM_PROTOCOL: (Register, Profile, DirectiveRequest, PeerLookup, Feedback),
    ADMIN_PROTOCOL: (AdminAdmit, AdminRevoke, AdminRelease, AdminQuery),
    EXCHANGE_PROTOCOL: (KnowledgeRequest,),
    EXCHANGE_PROTOCOL_1_1: (KnowledgeRequest,),
}

# exchange protocol → the signed envelopes that answer a KnowledgeRequest on it
# (besides Error), and the unsigned records it carries (protocol.boxes). A message of
# the other version is refused (UnknownMessage / MalformedFrame), never mixed in.
EXCHANGE_REPLIES: dict[str, tuple[type, ...]] = {
    EXCHANGE_PROTOCOL: (KnowledgeChunk, KnowledgeEnd),
    EXCHANGE_PROTOCOL_1_1: (KnowledgeTrailer,),
}
EXCHANGE_RECORDS: dict[str, tuple[type, ...]] = {
    EXCHANGE_PROTOCOL: (),
    EXCHANGE_PROTOCOL_1_1: (KnowledgeBox,),
}


def replies_to(request_type: type) -> tuple[type, ...]:
    """What may answer a request of ``request_type``, ``Error`` included."""
    return (*REPLIES[request_type], Error)


def exchange_replies(protocol: str) -> tuple[type, ...]:
    """The envelopes that may answer a KnowledgeRequest on ``protocol``, ``Error`` included."""
    return (*EXCHANGE_REPLIES[protocol], Error)


def open_reply(raw: bytes, request: Any, *, expected_sender: str) -> tuple[Envelope, Any]:
    """Verify a reply envelope from ``expected_sender`` to ``request``; an ``Error`` reply
    is raised as its typed error (``protocol.errors.ERROR_CODES``)."""
    env, reply = open_envelope(raw, expected_sender=expected_sender, allowed=replies_to(type(request)))
    if isinstance(reply, Error):
        raise error_from_code(reply.code, reply.message)
    return env, reply
