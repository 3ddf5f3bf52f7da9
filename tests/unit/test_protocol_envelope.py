"""Envelopes, peer IDs, replay guard, directives and the E2E box."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

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
from protocol.peerid import b58decode, b58encode

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


def test_freshly_sealed_envelope_is_within_the_replay_window() -> None:
    """``seal`` stamps the wall clock in milliseconds: a receiver checking it right away
    must not see it as stale."""
    env = parse_envelope(seal(_profile(), Identity(SEED_A)))
    ReplayGuard().check(env, now_ms=int(time.time() * 1000))


def test_replay_guard_keys_on_sender_and_nonce() -> None:
    a, b = Identity(SEED_A), Identity(SEED_B)
    guard = ReplayGuard(window_ms=120_000)
    nonce = bytes(16)
    guard.check(parse_envelope(seal(_profile(), a, ts_ms=1_000_000, nonce=nonce)), now_ms=1_000_000)
    # the same nonce from another sender, and another nonce from the same sender, are new
    guard.check(parse_envelope(seal(_profile(), b, ts_ms=1_000_000, nonce=nonce)), now_ms=1_000_000)
    guard.check(parse_envelope(seal(_profile(), a, ts_ms=1_000_000)), now_ms=1_000_000)
    assert len(guard) == 3


def test_replay_guard_window_edges() -> None:
    """A timestamp exactly one window away is still fresh; a nonce first seen with the
    latest acceptable timestamp stays remembered for as long as that timestamp is fresh."""
    w = 1000
    guard = ReplayGuard(window_ms=w)
    env = parse_envelope(seal(_profile(), Identity(SEED_A), ts_ms=10_000 + w))
    guard.check(env, now_ms=10_000)
    with pytest.raises(Replay):
        guard.check(env, now_ms=10_000 + 2 * w)


def test_replay_guard_cap_forgets_the_oldest_first() -> None:
    a = Identity(SEED_A)
    guard = ReplayGuard(window_ms=120_000, max_entries=3)
    envs = [parse_envelope(seal(_profile(), a, ts_ms=1_000_000)) for _ in range(4)]
    for env in envs:
        guard.check(env, now_ms=1_000_000)
    assert len(guard) == 3
    for env in envs[1:]:  # the three newest are still refused
        with pytest.raises(Replay):
            guard.check(env, now_ms=1_000_000)


def test_directive_checks_the_teacher_and_expiry_instant() -> None:
    cpm, t, s = Identity(bytes(32)), Identity(SEED_A), Identity(SEED_B)
    blob = _directive(cpm, t.peer_id, s.peer_id, expires=10_000)
    verify_directive(blob, cpm_peer_id=cpm.peer_id, now_ms=10_000, teacher=t.peer_id)  # valid up to expiry
    with pytest.raises(Unauthorized):  # a student cannot spend it at another teacher
        verify_directive(blob, cpm_peer_id=cpm.peer_id, now_ms=5, teacher=s.peer_id, student=s.peer_id)


def test_cpm_signed_message_of_another_type_is_not_a_directive() -> None:
    cpm = Identity(bytes(32))
    with pytest.raises(UnknownMessage):
        verify_directive(seal(_profile(), cpm), cpm_peer_id=cpm.peer_id, now_ms=5)


def test_peer_id_must_inline_exactly_an_ed25519_key() -> None:
    key = Identity(SEED_A).public_key
    ed25519 = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])
    secp256k1 = bytes([0x00, 0x24, 0x08, 0x02, 0x12, 0x20])  # same length, other key type
    for raw in (secp256k1 + key, ed25519 + key[:31], ed25519 + key + b"\x00"):
        with pytest.raises(BadSignature):
            public_key_from_peer_id(b58encode(raw))


@given(st.binary(max_size=48))
def test_base58_round_trips(data: bytes) -> None:
    assert b58decode(b58encode(data)) == data


def test_generated_identities_are_distinct_and_usable() -> None:
    a, b = Identity.generate(), Identity.generate()
    assert a.peer_id != b.peer_id
    assert open_envelope(seal(_profile(), a), expected_sender=a.peer_id)[1] == _profile()
