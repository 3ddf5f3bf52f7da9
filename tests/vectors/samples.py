"""One concrete instance of every protocol message (golden vectors, fuzz seeds).

Regenerate the golden files with ``python -m tests.vectors.make_vectors`` — only as a
deliberate protocol change (docs/protocol.md §7).
"""

from __future__ import annotations

from protocol import messages as m

SIGNER_SEED = bytes(range(32))
TS_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
NONCE = bytes(range(100, 116))

PEER_A = "12D3KooWAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
PEER_B = "12D3KooWBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB"


def sample_messages() -> dict[str, object]:
    directive = m.Directive(
        directive_id="r7-3",
        round=7,
        teacher=PEER_A,
        student=PEER_B,
        arm=1,
        alpha=0.35,
        temperature=2.0,
        n_samples=2,
        transfer_ids=(0, 5, 17, 127),
        transfer_hash="9f" * 32,
        issued_at_ms=TS_MS,
        expires_at_ms=TS_MS + 120_000,
    )
    samples = [
        m.Register(org="acme", family="qwen2", listen_addrs=("/ip4/127.0.0.1/tcp/4001",), agent_version="0.1.0"),
        m.Registered(round=7, cpm_time_ms=TS_MS, transfer_hash="9f" * 32),
        m.Profile(round=7, vector=tuple(i / 32 for i in range(32)), transfer_hash="9f" * 32),
        m.DirectiveRequest(round=7, wait_ms=30_000),
        directive,
        m.NoDirective(round=7, reason="not_matched", retry_after_ms=1000),
        m.Feedback(
            directive_id="r7-3", round=7, teacher=PEER_A, student=PEER_B,
            loss_pre=1.25, loss_post=0.875, kb=12.5, ok=True, failure="",
        ),
        m.PeerLookup(peer_id=PEER_A),
        m.PeerAddrs(peer_id=PEER_A, addrs=("/ip4/127.0.0.1/tcp/4001",)),
        m.Ack(ref=NONCE),
        m.Error(code="unauthorized", message="peer is not admitted"),
        m.KnowledgeRequest(directive=b"\x81\xa1v\x01"),
        m.KnowledgeChunk(directive_id="r7-3", index=0, box=bytes(range(48))),
        m.KnowledgeEnd(directive_id="r7-3", chunks=1, total_bytes=8, sha256=bytes(32), items=4, dropped=1),
        m.KnowledgeTrailer(directive_id="r7-3", chunks=1, total_bytes=8, macs_sha256=bytes(range(32)), items=4,
                           dropped=1),
        m.AdminAdmit(peer_id=PEER_B, org="globex"),
        m.AdminRevoke(peer_id=PEER_B),
        m.AdminRelease(peer_id=PEER_A),
        m.AdminQuery(what="pairs", round=7),
        m.AdminResult(rows=((("peer_id", PEER_A), ("admitted", True), ("reward", 0.5), ("note", None)),)),
    ]
    return {type(s).__name__: s for s in samples}


def sample_records() -> dict[str, object]:
    """Unsigned records (exchange 1.1.0): their vectors are the record bytes, no envelope."""
    samples = [m.KnowledgeBox(index=0, box=bytes(range(48)))]
    return {type(s).__name__: s for s in samples}


# The exchange 1.1.0 stream vector (tests/vectors/exchange_1_1_0.*): what a teacher with
# SIGNER_SEED writes to the student with STUDENT_SEED for STREAM_PAYLOAD, chunked by
# STREAM_CHUNK, box i sealed with nonce bytes([200 + i]) * 24, the trailer with TS_MS/NONCE.
STUDENT_SEED = bytes(range(32, 64))
STREAM_DIRECTIVE = "r7-3"
STREAM_PAYLOAD = b"knexa exchange 1.1.0 stream vector, three boxes."
STREAM_CHUNK = 20
STREAM_ITEMS, STREAM_DROPPED = 1, 0


def stream_box_nonce(index: int) -> bytes:
    return bytes([200 + index]) * 24
