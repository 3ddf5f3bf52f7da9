"""Every message of the KNEXA wire protocol as a frozen, slotted dataclass.

The normative description (fields, meaning, limits) is docs/protocol.md; this module is
its executable form. Field types are restricted to what the codec validates: ``int``,
``float``, ``str``, ``bytes``, ``bool``, ``tuple[T, ...]`` of those, ``Row`` tuples
(admin listings) and ``X | None``. Sequences are tuples so messages stay hashable and
immutable.
"""

from __future__ import annotations

from dataclasses import dataclass

Scalar = int | float | str | bytes | bool | None
Row = tuple[tuple[str, Scalar], ...]  # an admin listing row: ordered (column, value) pairs


# --- /knexa/cpm/1.0.0 --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Register:
    """First message of a daemon on a CPM session: who it is and where it listens."""

    org: str
    family: str
    listen_addrs: tuple[str, ...]
    agent_version: str


@dataclass(frozen=True, slots=True)
class Registered:
    """CPM → daemon: admitted; the current round and the CPM clock (for skew checks)."""

    round: int
    cpm_time_ms: int
    transfer_hash: str


@dataclass(frozen=True, slots=True)
class Profile:
    """The 32-d abstract profile for a round (never data, never weights)."""

    round: int
    vector: tuple[float, ...]
    transfer_hash: str


@dataclass(frozen=True, slots=True)
class DirectiveRequest:
    """Long-poll: give me my directive for ``round`` or tell me there is none."""

    round: int
    wait_ms: int


@dataclass(frozen=True, slots=True)
class Directive:
    """Capability token signed by the CPM: ``student`` may ask ``teacher`` in ``round``."""

    directive_id: str
    round: int
    teacher: str
    student: str
    arm: int
    alpha: float
    temperature: float
    n_samples: int
    transfer_ids: tuple[int, ...]
    transfer_hash: str
    issued_at_ms: int
    expires_at_ms: int


@dataclass(frozen=True, slots=True)
class NoDirective:
    """No pair for this agent in ``round`` (``reason``: idle, not_matched, round_pending)."""

    round: int
    reason: str
    retry_after_ms: int


@dataclass(frozen=True, slots=True)
class Feedback:
    """Student → CPM: the measured effect of a directive (Eq. 3 inputs) or its failure."""

    directive_id: str
    round: int
    teacher: str
    student: str
    loss_pre: float
    loss_post: float
    kb: float
    ok: bool
    failure: str


@dataclass(frozen=True, slots=True)
class PeerLookup:
    """Where does ``peer_id`` listen? Answered only for a peer named with the requester
    in a live directive (the CPM does not hand out the member list)."""

    peer_id: str


@dataclass(frozen=True, slots=True)
class PeerAddrs:
    peer_id: str
    addrs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Ack:
    """Receipt: the message with nonce ``ref`` is durably committed."""

    ref: bytes


@dataclass(frozen=True, slots=True)
class Error:
    """Typed refusal; ``code`` is one of protocol.errors.ERROR_CODES (or, on the admin
    protocol only, ``not_quarantined``: docs/protocol.md §5)."""

    code: str
    message: str


# --- /knexa/exchange/1.0.0 -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KnowledgeRequest:
    """Student → teacher; ``directive`` is the CPM-signed envelope, verbatim bytes."""

    directive: bytes


@dataclass(frozen=True, slots=True)
class KnowledgeChunk:
    """One E2E-encrypted slice of the packed KnowledgePackage (see protocol.e2e)."""

    directive_id: str
    index: int
    box: bytes


@dataclass(frozen=True, slots=True)
class KnowledgeEnd:
    """Teacher's trailer: how many chunks, the plaintext size and digest, guardrail drops."""

    directive_id: str
    chunks: int
    total_bytes: int
    sha256: bytes
    items: int
    dropped: int


# --- /knexa/exchange/1.1.0 -----------------------------------------------------------
# KnowledgeRequest and Error as in 1.0.0; the chunks become unsigned KnowledgeBox records
# and the trailer a KnowledgeTrailer (docs/protocol.md §6, "Exchange 1.1.0").


@dataclass(frozen=True, slots=True)
class KnowledgeBox:
    """One E2E box of the packed KnowledgePackage, as an unsigned record (not an
    envelope): the box's own Poly1305 tag authenticates it, its plaintext binds the
    directive and ``index`` (protocol.e2e), and the signed ``KnowledgeTrailer`` commits
    to every tag. Wire form: ``protocol.boxes``."""

    index: int
    box: bytes


@dataclass(frozen=True, slots=True)
class KnowledgeTrailer:
    """Teacher's signed trailer in 1.1.0: chunk count, plaintext size, the SHA-256 of
    the boxes' 16-byte Poly1305 tags concatenated in order, and guardrail drops."""

    directive_id: str
    chunks: int
    total_bytes: int
    macs_sha256: bytes
    items: int
    dropped: int


# --- /knexa/admin/1.0.0 --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AdminAdmit:
    peer_id: str
    org: str


@dataclass(frozen=True, slots=True)
class AdminRevoke:
    peer_id: str


@dataclass(frozen=True, slots=True)
class AdminRelease:
    """Lift the teacher quarantine of ``peer_id`` (an operator's decision the CPM cannot
    take itself: its rule only ever quarantines). ``Ack``, or ``Error{not_quarantined}``."""

    peer_id: str


@dataclass(frozen=True, slots=True)
class AdminQuery:
    """``what``: agents | rounds | pairs | stats | quarantine; ``round`` filters pairs (-1 = all)."""

    what: str
    round: int


@dataclass(frozen=True, slots=True)
class AdminResult:
    rows: tuple[Row, ...]


MESSAGE_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        Register,
        Registered,
        Profile,
        DirectiveRequest,
        Directive,
        NoDirective,
        Feedback,
        PeerLookup,
        PeerAddrs,
        Ack,
        Error,
        KnowledgeRequest,
        KnowledgeChunk,
        KnowledgeEnd,
        KnowledgeTrailer,
        AdminAdmit,
        AdminRevoke,
        AdminRelease,
        AdminQuery,
        AdminResult,
    )
}

# Unsigned records: frames that are not envelopes, each only where its protocol allows
# it (protocol.conversation.EXCHANGE_RECORDS). Never decodable as an envelope body.
RECORD_TYPES: dict[str, type] = {cls.__name__: cls for cls in (KnowledgeBox,)}
