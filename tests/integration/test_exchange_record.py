"""The teacher's side of the exchange beyond "the package arrives": what the agent is
asked to teach, what the daemon's status records, the wire shape of a small package, the
package-size limit at its edge, and the durable single-use log. Written for behaviour
mutation testing found unpinned (docs/reliability.md, "Mutation testing"); ``Net`` and
its fixture are test_exchange.py's.
"""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from knexad.agent_api import ProtocolArm, TeachRequest
from knexad.agents import AgentWorker
from knexad.exchange import ExchangeServer, UsedDirectives
from knexad.exchanges import read_exchanges
from protocol.envelope import now_ms, parse_envelope, seal
from p2p.ratelimit import PeerRateLimiter
from protocol.errors import Expired, RateLimited, Replay
from protocol.framing import FrameDecoder
from protocol.knowledge import KnowledgePackage, encode_package
from protocol.messages import Directive

from .test_exchange import TRANSFER_HASH, CountingAgent, Net, make_directive, net  # noqa: F401 (fixture)


class RecordingAgent(CountingAgent):
    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.requests: list[TeachRequest] = []

    def teach(self, request: TeachRequest) -> KnowledgePackage:
        self.requests.append(request)
        return super().teach(request)


def _use(net: Net, agent: CountingAgent, **limits) -> None:
    """Swap the teacher's agent (and limits) in place: same host, same home."""
    net.agent = agent
    if limits:
        net.cfg = replace(net.cfg, limits=replace(net.cfg.limits, **limits))
    net.server = ExchangeServer(net.teacher_id, net.cfg, AgentWorker(agent), UsedDirectives(net.tmp / "used.log"),
                                net.state, transfer_hash=TRANSFER_HASH)


async def test_the_agent_is_asked_for_exactly_what_the_directive_says(net: Net) -> None:
    agent = RecordingAgent()
    _use(net, agent)
    issued = now_ms()
    directive = Directive(
        directive_id="r7-abc", round=7, teacher=net.teacher_id.peer_id, student=net.student_id.peer_id,
        arm=2, alpha=0.25, temperature=1.5, n_samples=3, transfer_ids=(3, 5, 8, 13),
        transfer_hash=TRANSFER_HASH, issued_at_ms=issued, expires_at_ms=issued + 60_000,
    )
    result = await net.fetch(seal(directive, net.cpm), directive)
    assert agent.requests == [TeachRequest(directive_id="r7-abc", round=7, transfer_ids=(3, 5, 8, 13),
                                           arm=ProtocolArm(alpha=0.25, temperature=1.5, n_samples=3))]
    assert result.package.meta == {"round": 7}  # the teacher's meta survives the guardrail


async def test_status_and_log_record_each_served_exchange(net: Net) -> None:
    student = net.student_id.peer_id
    with capture_logs() as logs:
        for _ in range(2):
            raw, directive = make_directive(net.cpm, net.teacher_id.peer_id, student)
            result = await net.fetch(raw, directive)
    sent = [e for e in logs if e["event"] == "exchange.package.sent"]
    assert len(sent) == 2  # the canonical line per request (docs/operations.md)
    assert {k: sent[1][k] for k in ("peer", "directive", "round", "bytes", "items", "dropped")} == {
        "peer": student, "directive": directive.directive_id, "round": directive.round,
        "bytes": result.plaintext_bytes, "items": net.agent.n_items, "dropped": 0}
    assert sent[1]["chunks"] > 1 and sent[1]["duration_ms"] >= 0
    s = net.state.state
    assert (net.server.served, s.taught, s.role, s.last_directive) == (2, 2, "teacher", directive.directive_id)
    assert s.peers[student].bytes_in > 0 and s.peers[student].bytes_out > 0


async def test_the_teacher_records_each_served_package_and_its_path(net: Net) -> None:
    """The teacher side of ``exchanges.jsonl`` (issue 17): one ``side="teacher"`` line
    per package served, its path read off the connection the request came over (here
    loopback: direct); a refused request leaves no line."""
    home = net.tmp / "teacher-home"
    home.mkdir()
    net.server.home, net.server.host = home, net.teacher_host
    student = net.student_id.peer_id
    raw, directive = make_directive(net.cpm, net.teacher_id.peer_id, student)
    with capture_logs() as logs:
        result = await net.fetch(raw, directive)
    expired_raw, expired = make_directive(net.cpm, net.teacher_id.peer_id, student, expires_in_ms=-1000)
    with pytest.raises(Expired):
        await net.fetch(expired_raw, expired)
    (rec,) = read_exchanges(home, side="teacher")
    assert {k: rec[k] for k in ("directive", "round", "teacher", "student", "path", "side")} == {
        "directive": directive.directive_id, "round": directive.round, "teacher": net.teacher_id.peer_id,
        "student": student, "path": "direct", "side": "teacher"}
    assert rec["wire_bytes"] > result.plaintext_bytes and rec["seconds"] >= 0 and rec["dial_seconds"] == 0
    assert read_exchanges(home) == []  # the student's table (the default side) is not polluted
    (sent,) = [e for e in logs if e["event"] == "exchange.package.sent"]
    assert sent["path"] == "direct"


async def test_a_refusal_is_recorded_for_the_operator(net: Net) -> None:
    raw, directive = make_directive(net.cpm, net.teacher_id.peer_id, net.student_id.peer_id, expires_in_ms=-1000)
    with capture_logs() as logs, pytest.raises(Expired):
        await net.fetch(raw, directive)
    assert net.state.state.last_error == f"refused {net.student_id.peer_id}: expired"
    (refused,) = [e for e in logs if e["event"] == "exchange.refused"]
    assert (refused["peer"], refused["error"]) == (net.student_id.peer_id, "expired")


async def test_a_small_package_is_one_chunk_then_the_trailer(net: Net) -> None:
    _use(net, CountingAgent(n_items=1, completion_bytes=10))
    raw, directive = make_directive(net.cpm, net.teacher_id.peer_id, net.student_id.peer_id)
    await net.fetch(raw, directive)
    dec = FrameDecoder(net.cfg.limits.max_frame)
    dec.feed(bytes(net.wire))
    types = []
    while (frame := dec.next_frame()) is not None:
        types.append(parse_envelope(frame).type)
    assert types == ["KnowledgeChunk", "KnowledgeEnd"]


async def test_a_package_exactly_at_the_size_limit_is_sent(net: Net) -> None:
    agent = CountingAgent(n_items=5)
    raw, directive = make_directive(net.cpm, net.teacher_id.peer_id, net.student_id.peer_id)
    size = len(encode_package(agent.teach(TeachRequest(directive.directive_id, directive.round,
                                                           directive.transfer_ids, ProtocolArm()))))
    _use(net, agent, max_package_bytes=size)
    result = await net.fetch(raw, directive)
    assert result.plaintext_bytes == size


def test_used_directive_log_is_private_and_refuses_ids_that_would_split_a_line(tmp_path: Path) -> None:
    used = UsedDirectives(tmp_path / "used.log")
    used.claim("r1-a")
    assert stat.S_IMODE(os.stat(tmp_path / "used.log").st_mode) == 0o600
    with pytest.raises(Replay):
        used.claim("r1-b\nr1-c")  # would read back as two IDs, neither of them this one
    assert "r1-a" in UsedDirectives(tmp_path / "used.log")
    assert (tmp_path / "used.log").read_text() == "r1-a\n"


async def test_one_students_flood_does_not_rate_limit_another(net: Net) -> None:
    """The budget is per peer: a student over its own budget is refused, the next
    student is still served."""
    net.server.limiter = PeerRateLimiter(rate_per_s=0.001, burst=1)
    teacher = net.teacher_id.peer_id
    raw, directive = make_directive(net.cpm, teacher, net.student_id.peer_id)
    await net.fetch(raw, directive)
    raw, directive = make_directive(net.cpm, teacher, net.student_id.peer_id)
    with pytest.raises(RateLimited):
        await net.fetch(raw, directive)
    raw, directive = make_directive(net.cpm, teacher, net.third_id.peer_id)
    result = await net.fetch(raw, directive, as_third=True)
    assert len(result.package.items) == net.agent.n_items
