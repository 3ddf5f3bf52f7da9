"""protocol.conversation: which replies may answer each request, and an Error reply
turned into the typed error it names (so callers never inspect error text)."""

from __future__ import annotations

import pytest

from protocol.conversation import REPLIES, REQUESTS, open_reply, replies_to
from protocol.envelope import Identity, seal
from protocol.errors import BadSignature, RateLimited, UnknownMessage
from protocol.messages import Ack, Directive, Error, Feedback, NoDirective, Profile

SERVER, CLIENT = Identity(bytes(range(32))), Identity(bytes(range(1, 33)))
PROFILE = Profile(round=1, vector=(0.0,) * 32, transfer_hash="h")


def test_every_request_a_server_accepts_has_its_replies() -> None:
    for requests in REQUESTS.values():
        for request in requests:
            assert replies_to(request) == (*REPLIES[request], Error)
    assert replies_to(Profile) == (Ack, NoDirective, Error)


def test_a_reply_of_an_allowed_type_is_returned() -> None:
    raw = seal(NoDirective(round=2, reason="advance", retry_after_ms=0), SERVER)
    env, reply = open_reply(raw, PROFILE, expected_sender=SERVER.peer_id)
    assert reply == NoDirective(round=2, reason="advance", retry_after_ms=0) and env.sender == SERVER.peer_id


def test_an_error_reply_is_raised_as_the_typed_error_it_names() -> None:
    raw = seal(Error(code="rate_limited", message="retry in 1.000 s"), SERVER)
    with pytest.raises(RateLimited, match="retry in 1.000 s"):
        open_reply(raw, PROFILE, expected_sender=SERVER.peer_id)


def test_a_reply_that_does_not_answer_the_request_is_refused() -> None:
    feedback = Feedback("d", 1, "t", "s", 1.0, 0.5, 1.0, True, "")
    with pytest.raises(UnknownMessage):  # a Directive never answers a Feedback
        open_reply(seal(Directive("d", 1, "t", "s", 0, 0.4, 2.0, 1, (1,), "h", 0, 1), SERVER), feedback,
                   expected_sender=SERVER.peer_id)
    with pytest.raises(BadSignature):  # an answer from another peer than the one asked
        open_reply(seal(Ack(ref=b"x" * 16), CLIENT), feedback, expected_sender=SERVER.peer_id)
