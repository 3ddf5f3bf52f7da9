"""Envelopes, peer IDs, replay guard, directives and the E2E box."""

from __future__ import annotations

import pytest

from protocol import (
    BadSignature,
    DecryptionFailed,
    Directive,
    E2EBox,
    Expired,
    Feedback,
    Identity,
    MalformedFrame,
    Profile,
    Replay,
    ReplayGuard,
    Unauthorized,
    UnknownMessage,
    UnsupportedVersion,
    open_envelope,
    parse_envelope,
    peer_id_from_public_key,
    public_key_from_peer_id,
    seal,
    verify_directive,
)
from protocol.codec import pack, unpack_strict
from protocol.envelope import Envelope

SEED_A = bytes(range(32))
SEED_B = bytes(range(1, 33))


def _profile() -> Profile:
    return Profile(round=3, vector=tuple(float(i) / 32 for i in range(32)), transfer_hash="ab" * 32)


def test_peer_id_matches_libp2p() -> None:
    from libp2p.crypto.ed25519 import Ed25519PrivateKey
    from libp2p.peer.id import ID

    ident = Identity(SEED_A)
    lib_key = Ed25519PrivateKey.from_bytes(SEED_A)
    assert ID.from_pubkey(lib_key.get_public_key()).to_base58() == ident.peer_id
    assert public_key_from_peer_id(ident.peer_id) == ident.public_key
    # libp2p's signature with the same key verifies as ours (one key for both)
    assert lib_key.sign(b"x") == ident.sign(b"x")


def test_seal_and_open_round_trip() -> None:
    a = Identity(SEED_A)
    env, msg = open_envelope(seal(_profile(), a), expected_sender=a.peer_id)
    assert msg == _profile()
    assert env.sender == a.peer_id and env.v == 1 and len(env.nonce) == 16


def test_tampered_body_is_bad_signature() -> None:
    a = Identity(SEED_A)
    env = parse_envelope(seal(_profile(), a))
    forged = Envelope(env.v, env.type, env.sender, env.ts_ms, env.nonce, env.body[:-1] + b"\x01", env.sig)
    with pytest.raises(BadSignature):
        open_envelope(forged.to_bytes())


def test_tampered_signature_is_bad_signature() -> None:
    a = Identity(SEED_A)
    env = parse_envelope(seal(_profile(), a))
    bad_sig = bytes([env.sig[0] ^ 1]) + env.sig[1:]
    forged = Envelope(env.v, env.type, env.sender, env.ts_ms, env.nonce, env.body, bad_sig)
    with pytest.raises(BadSignature):
        open_envelope(forged.to_bytes())


def test_signed_by_other_key_than_claimed_sender() -> None:
    a, b = Identity(SEED_A), Identity(SEED_B)
    env = parse_envelope(seal(_profile(), b))
    claimed = Envelope(env.v, env.type, a.peer_id, env.ts_ms, env.nonce, env.body, env.sig)
    with pytest.raises(BadSignature):
        open_envelope(claimed.to_bytes())


def test_valid_envelope_from_wrong_noise_peer_rejected() -> None:
    a, b = Identity(SEED_A), Identity(SEED_B)
    with pytest.raises(BadSignature, match="authenticated"):
        open_envelope(seal(_profile(), b), expected_sender=a.peer_id)


def test_type_not_allowed_on_protocol() -> None:
    a = Identity(SEED_A)
    with pytest.raises(UnknownMessage):
        open_envelope(seal(_profile(), a), allowed=(Feedback,))


def test_unknown_major_version() -> None:
    a = Identity(SEED_A)
    raw = unpack_strict(seal(_profile(), a))
    raw["v"] = 2
    with pytest.raises(UnsupportedVersion):
        parse_envelope(pack(raw))


def test_envelope_structure_errors() -> None:
    a = Identity(SEED_A)
    raw = unpack_strict(seal(_profile(), a))
    for mutate in (
        lambda r: r.pop("sig"),
        lambda r: r.__setitem__("extra", 1),
        lambda r: r.__setitem__("nonce", b"short"),
        lambda r: r.__setitem__("ts", "now"),
    ):
        copy = dict(raw)
        mutate(copy)
        with pytest.raises(MalformedFrame):
            parse_envelope(pack(copy))
    with pytest.raises(MalformedFrame):
        parse_envelope(pack([1, 2, 3]))


def test_non_ed25519_peer_id_rejected() -> None:
    with pytest.raises(BadSignature):
        public_key_from_peer_id("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N")
    with pytest.raises(BadSignature):
        public_key_from_peer_id("not-base58-0OIl")


def test_replay_guard() -> None:
    a = Identity(SEED_A)
    guard = ReplayGuard(window_ms=120_000)
    env = parse_envelope(seal(_profile(), a, ts_ms=1_000_000))
    guard.check(env, now_ms=1_000_500)
    with pytest.raises(Replay):
        guard.check(env, now_ms=1_000_600)
    stale = parse_envelope(seal(_profile(), a, ts_ms=1_000_000))
    with pytest.raises(Expired):
        guard.check(stale, now_ms=1_000_000 + 120_001)
    future = parse_envelope(seal(_profile(), a, ts_ms=2_000_000))
    with pytest.raises(Expired):
        guard.check(future, now_ms=1_000_000)


def test_replay_guard_memory_is_bounded() -> None:
    a = Identity(SEED_A)
    guard = ReplayGuard(window_ms=1000)
    for i in range(50):
        guard.check(parse_envelope(seal(_profile(), a, ts_ms=i * 10_000)), now_ms=i * 10_000)
    assert len(guard) <= 2  # old nonces evicted once they could only be stale


def _directive(cpm: Identity, teacher: str, student: str, expires: int = 10_000) -> bytes:
    d = Directive(
        directive_id="r1-0",
        round=1,
        teacher=teacher,
        student=student,
        arm=0,
        alpha=0.4,
        temperature=2.0,
        n_samples=1,
        transfer_ids=(1, 2, 3),
        transfer_hash="h",
        issued_at_ms=0,
        expires_at_ms=expires,
    )
    return seal(d, cpm, ts_ms=0)


def test_verify_directive() -> None:
    cpm, t, s = Identity(bytes(32)), Identity(SEED_A), Identity(SEED_B)
    blob = _directive(cpm, t.peer_id, s.peer_id)
    _, d = verify_directive(blob, cpm_peer_id=cpm.peer_id, now_ms=5, teacher=t.peer_id, student=s.peer_id, transfer_hash="h")
    assert d.transfer_ids == (1, 2, 3)
    with pytest.raises(Expired):
        verify_directive(blob, cpm_peer_id=cpm.peer_id, now_ms=10_001)
    with pytest.raises(Unauthorized):
        verify_directive(blob, cpm_peer_id=cpm.peer_id, now_ms=5, student=t.peer_id)
    with pytest.raises(Unauthorized):
        verify_directive(blob, cpm_peer_id=cpm.peer_id, now_ms=5, transfer_hash="other")
    forged = _directive(t, t.peer_id, s.peer_id)  # signed by the teacher, not the CPM
    with pytest.raises(BadSignature):
        verify_directive(forged, cpm_peer_id=cpm.peer_id, now_ms=5)


def test_e2e_box_binds_directive_and_index() -> None:
    t, s, eve = Identity(SEED_A), Identity(SEED_B), Identity(bytes(32))
    sealed = E2EBox(t, s.peer_id).seal_chunk("d1", 0, b"secret knowledge")
    assert b"secret knowledge" not in sealed
    assert E2EBox(s, t.peer_id).open_chunk("d1", 0, sealed) == b"secret knowledge"
    with pytest.raises(DecryptionFailed):
        E2EBox(s, t.peer_id).open_chunk("d1", 1, sealed)
    with pytest.raises(DecryptionFailed):
        E2EBox(s, t.peer_id).open_chunk("d2", 0, sealed)
    with pytest.raises(DecryptionFailed):
        E2EBox(eve, t.peer_id).open_chunk("d1", 0, sealed)
    with pytest.raises(DecryptionFailed):
        E2EBox(s, t.peer_id).open_chunk("d1", 0, sealed[:-1] + bytes([sealed[-1] ^ 1]))


def test_identity_repr_hides_key() -> None:
    ident = Identity(SEED_A)
    assert SEED_A.hex() not in repr(ident)
    assert peer_id_from_public_key(ident.public_key) == ident.peer_id
