"""Exchange version negotiation between real hosts: a teacher serves 1.1.0 and 1.0.0, a
student offers 1.1.0 first, and peers of either age still exchange (docs/protocol.md §6).

Uses ``tests/integration/test_exchange.py``'s CPM, teacher (``ExchangeServer`` behind a
recording stream) and student (``fetch_package``); only which IDs each end has differs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

import knexad.student
from knexad.agents import AgentWorker
from knexad.exchange import ExchangeServer, UsedDirectives
from protocol.ids import EXCHANGE_PROTOCOL, EXCHANGE_PROTOCOL_1_1, EXCHANGE_PROTOCOLS
from tests.integration.test_exchange import MARKER, TRANSFER_HASH, Net, make_directive, running_host
from tests.integration.test_hostile_knowledge import PRIVATE_DOC, SECRETS, LeakyAgent


@pytest.fixture
async def versions(tmp_path: Path):
    """A ``Net`` whose teacher registers the IDs the test asks for."""
    n = Net(tmp_path)
    async with running_host(n.teacher_id) as t, running_host(n.student_id) as s, running_host(n.third_id) as c:
        n.teacher_host, n.student_host, n.third_host = t, s, c

        def serve(*protocols: str) -> None:
            for protocol in protocols:
                t.set_stream_handler(protocol, n.recording_handler)

        yield n, serve


async def _exchange(n: Net):
    raw, directive = make_directive(n.cpm, n.teacher_id.peer_id, n.student_id.peer_id)
    with capture_logs() as logs:
        result = await n.fetch(raw, directive)
    assert len(result.package.items) == n.agent.n_items
    assert all(MARKER in item.completion for item in result.package.items)
    assert MARKER.encode() not in bytes(n.wire)  # E2E boxed in either version
    sent = [e for e in logs if e["event"] == "exchange.package.sent"]
    assert len(sent) == 1 and sent[0]["protocol"] == result.protocol
    return result


async def test_new_teacher_and_student_agree_on_1_1(versions) -> None:
    n, serve = versions
    serve(*EXCHANGE_PROTOCOLS)
    result = await _exchange(n)
    assert result.protocol == EXCHANGE_PROTOCOL_1_1
    assert b"KnowledgeBox" in n.wire and b"KnowledgeTrailer" in n.wire
    assert b"KnowledgeChunk" not in n.wire and b"KnowledgeEnd" not in n.wire


async def test_a_teacher_serving_only_1_0_still_teaches_a_new_student(versions) -> None:
    n, serve = versions
    serve(EXCHANGE_PROTOCOL)  # an older daemon
    result = await _exchange(n)
    assert result.protocol == EXCHANGE_PROTOCOL
    assert b"KnowledgeChunk" in n.wire and b"KnowledgeBox" not in n.wire


async def test_a_student_offering_only_1_0_is_served_1_0(versions, monkeypatch: pytest.MonkeyPatch) -> None:
    n, serve = versions
    serve(*EXCHANGE_PROTOCOLS)
    monkeypatch.setattr(knexad.student, "EXCHANGE_PROTOCOLS", (EXCHANGE_PROTOCOL,))  # an older daemon
    result = await _exchange(n)
    assert result.protocol == EXCHANGE_PROTOCOL
    assert b"KnowledgeChunk" in n.wire and b"KnowledgeBox" not in n.wire


async def test_guardrail_drops_reach_the_student_in_the_1_1_trailer(versions) -> None:
    """``dropped`` and ``items`` travel in the signed KnowledgeTrailer as they did in
    KnowledgeEnd (tests/integration/test_hostile_knowledge.py covers 1.0.0)."""
    n, serve = versions
    n.server = ExchangeServer(n.teacher_id, n.cfg, AgentWorker(LeakyAgent()), UsedDirectives(n.tmp / "used2.log"),
                              n.state, transfer_hash=TRANSFER_HASH, private_texts=(PRIVATE_DOC,))
    serve(*EXCHANGE_PROTOCOLS)
    raw, directive = make_directive(n.cpm, n.teacher_id.peer_id, n.student_id.peer_id)
    result = await n.fetch(raw, directive)
    assert result.protocol == EXCHANGE_PROTOCOL_1_1
    assert result.dropped == len(SECRETS) + 3 and len(result.package.items) == 40 - result.dropped
