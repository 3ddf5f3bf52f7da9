"""A CPM that cannot serve a request now must not stop a daemon (issue #18's load run).

Under load on a shared PostgreSQL store a replica's write can wait past ``lock_timeout``;
the CPM then answers ``Error{unavailable}`` (older nodes: ``internal``). Before, the
daemon's CPM client and feedback sender caught only ``peer_unavailable`` and protocol
errors, so an ``internal`` answer escaped their loops and ended the daemon. What a
member relies on: such an answer is retried after a back-off, queued feedback stays
queued and is sent once, and the daemon never exits for it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from structlog.testing import capture_logs

from knexad.config import DaemonConfig, RetrySection
from knexad.cpm_client import CpmClient, FeedbackSender, Reply
from knexad.outbox import Outbox
from knexad.state import StateFile
from protocol.envelope import Identity
from protocol.errors import ERROR_CODES, KnexaError, PeerUnavailable, Unavailable, error_from_code
from protocol.messages import Ack, Feedback, Register, Registered
from tests.unit.test_outbox import CPM, feedback

FAST = RetrySection(base_s=0.01, max_s=0.02, jitter=0.0)


def test_unavailable_is_a_transient_code() -> None:
    exc = error_from_code("unavailable", "store busy")
    assert type(exc) is Unavailable and isinstance(exc, PeerUnavailable)
    assert ERROR_CODES["unavailable"] is Unavailable
    assert type(error_from_code("internal", "x")) is KnexaError


class RefusingRpc:
    """Stands in for CpmRpc: refuses the first calls with ``codes``, then answers."""

    def __init__(self, codes: list[str]) -> None:
        self.codes = list(codes)
        self.sent: list[object] = []

    async def call(self, message, timeout_s=None, **_kw):
        self.sent.append(message)
        if self.codes:
            raise error_from_code(self.codes.pop(0), "the store could not take it")
        if isinstance(message, Register):
            return Reply(b"", None, Registered(round=1, cpm_time_ms=0, transfer_hash=""), b"")
        return Reply(b"", None, Ack(ref=b"x" * 16), b"")


@pytest.mark.parametrize("code", ["internal", "unavailable", "some_future_code"])
async def test_feedback_refused_for_the_cpm_s_own_trouble_stays_queued_and_is_sent_once(
        tmp_path: Path, code: str) -> None:
    rpc = RefusingRpc([code, code])
    sender = FeedbackSender(rpc, Outbox(tmp_path / "outbox"), DaemonConfig(cpm=CPM, retry=FAST),
                            StateFile(tmp_path))
    async with trio.open_nursery() as nursery:
        await nursery.start(sender.run)
        await sender.enqueue(feedback(3))
        with trio.fail_after(20):  # hang guard only
            while len(sender.outbox):
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert [fb.directive_id for fb in rpc.sent if isinstance(fb, Feedback)] == ["d-3"] * 3
    assert list((tmp_path / "outbox").glob("*.rejected")) == []  # not set aside as the item's fault


class _Stop(Exception):
    pass


@pytest.mark.parametrize("code", ["internal", "unavailable"])
async def test_cpm_client_retries_a_refused_register_and_never_exits(tmp_path: Path, code: str) -> None:
    rpc = RefusingRpc([code, code])
    exits: list[int] = []

    async def profile(_round: int) -> list[float]:
        raise _Stop  # registered: the round loop got this far, which is all this test needs

    async def nothing(*_a) -> None:
        return None

    state = StateFile(tmp_path)
    client = CpmClient(rpc, DaemonConfig(cpm=CPM, retry=FAST), Identity.generate(), state, family="qwen2",
                       transfer_hash="ab" * 32, profile_fn=profile, on_directive=nothing, on_exit=exits.append)
    with capture_logs() as logs, pytest.raises(_Stop), trio.fail_after(20):  # hang guard only
        await client.run()
    assert [type(m).__name__ for m in rpc.sent] == ["Register"] * 3
    assert exits == []
    assert [e["error"] for e in logs if e["event"] in ("cpm.error", "cpm.unreachable")] == [code, code]


class PoisonRpc(RefusingRpc):
    """Answers ``internal`` for one directive every time (a CPM bug it triggers)."""

    def __init__(self, poison: str) -> None:
        super().__init__([])
        self.poison = poison

    async def call(self, message, timeout_s=None, **_kw):
        if isinstance(message, Feedback) and message.directive_id == self.poison:
            self.sent.append(message)
            raise error_from_code("internal", "a bug this record triggers")
        return await super().call(message, timeout_s)


async def test_one_record_refused_internal_does_not_block_the_others(tmp_path: Path) -> None:
    """``internal`` may be about one record: it stays queued (never rejected, never
    lost), the records behind it are still sent in the same pass, and the pass raises
    so the sender backs off before trying the stuck one again."""
    outbox = Outbox(tmp_path / "outbox")
    for i in (1, 2, 3):
        outbox.put(feedback(i))
    first = outbox.pending()[0].directive_id
    rpc = PoisonRpc(first)
    sender = FeedbackSender(rpc, outbox, DaemonConfig(cpm=CPM, retry=FAST), StateFile(tmp_path))
    with pytest.raises(KnexaError) as info:
        await sender.drain()
    assert info.value.code == "internal"
    assert [fb.directive_id for fb in outbox.pending()] == [first]  # only the stuck one is left
    assert len([m for m in rpc.sent if isinstance(m, Feedback)]) == 3
    assert list((tmp_path / "outbox").glob("*.rejected")) == []
