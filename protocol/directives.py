"""Checking a CPM-signed directive — the capability a student presents to a teacher."""

from __future__ import annotations

from .envelope import Envelope, open_envelope
from .errors import Expired, Unauthorized
from .messages import Directive


def verify_directive(
    blob: bytes,
    *,
    cpm_peer_id: str,
    now_ms: int,
    teacher: str | None = None,
    student: str | None = None,
    transfer_hash: str | None = None,
) -> tuple[Envelope, Directive]:
    """Verify signature (by the CPM), expiry, and that it names the given peers.

    Raises ``BadSignature`` (not signed by this CPM), ``Expired``, ``Unauthorized``
    (names other peers or another transfer set). Single use is the teacher's job
    (it remembers ``directive_id``), since only it can see reuse.
    """
    env, directive = open_envelope(blob, expected_sender=cpm_peer_id, allowed=(Directive,))
    if now_ms > directive.expires_at_ms:
        raise Expired(f"directive {directive.directive_id} expired at {directive.expires_at_ms}")
    if teacher is not None and directive.teacher != teacher:
        raise Unauthorized(f"directive {directive.directive_id} names another teacher")
    if student is not None and directive.student != student:
        raise Unauthorized(f"directive {directive.directive_id} names another student")
    if transfer_hash is not None and directive.transfer_hash != transfer_hash:
        raise Unauthorized(f"directive {directive.directive_id} is for another transfer set")
    return env, directive
