"""The student acts on each directive at most once, across restarts.

A CPM restarted before it has our Feedback re-serves the round's open directive (the
e2e kill -9 test hit this under load: two Feedbacks acked for one directive). The
second delivery must neither dial the teacher again nor queue a second Feedback.
"""

from __future__ import annotations

from pathlib import Path

import trio

from knexad.agents import AgentWorker
from knexad.config import DaemonConfig
from knexad.exchange import UsedDirectives
from knexad.outbox import Outbox
from knexad.state import DaemonState, StateFile
from knexad.student import Student
from protocol import Identity, PeerUnavailable
from protocol.messages import Directive, Feedback
from protocol.replay import ReplayGuard

TEACHER, STUDENT = Identity.generate(), Identity.generate()


class _UnreachableTeacherRpc:
    """The CPM RPC as far as the student uses it: the teacher cannot be found."""

    def __init__(self) -> None:
        self.lookups = 0

    async def lookup(self, peer_id: str):
        self.lookups += 1
        raise PeerUnavailable(f"{peer_id} is frozen")


class _Queue:
    """FeedbackSender.enqueue's contract: durably queue (here: the real outbox)."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox, self.queued = outbox, []

    async def enqueue(self, feedback: Feedback) -> None:
        self.outbox.put(feedback)
        self.queued.append(feedback)


def _directive(did: str = "d-1") -> Directive:
    return Directive(did, 0, TEACHER.peer_id, STUDENT.peer_id, 0, 0.5, 2.0, 1, (1, 2), "0" * 64, 0, 2**62)


def _student(home: Path, rpc: _UnreachableTeacherRpc, queue: _Queue) -> Student:
    return Student(
        home, DaemonConfig(cpm="/ip4/127.0.0.1/tcp/1"), STUDENT, None, rpc, AgentWorker(object()), queue,
        StateFile(home, DaemonState(peer_id=STUDENT.peer_id)),
        UsedDirectives(home / "studied.log"), ReplayGuard(), save_timeout_s=5.0,
    )


def test_a_reserved_directive_is_not_acted_on_twice(tmp_path: Path) -> None:
    rpc, queue = _UnreachableTeacherRpc(), _Queue(Outbox(tmp_path / "outbox"))
    student = _student(tmp_path, rpc, queue)

    async def main() -> list[bool]:
        return [await student.learn_from(b"raw", _directive()) for _ in range(2)]

    assert trio.run(main) == [True, False]
    assert rpc.lookups == 1
    assert [(f.directive_id, f.ok, f.failure) for f in queue.queued] == [("d-1", False, "peer_unavailable")]


def test_the_record_survives_a_restart_and_other_directives_still_run(tmp_path: Path) -> None:
    rpc, queue = _UnreachableTeacherRpc(), _Queue(Outbox(tmp_path / "outbox"))
    trio.run(_student(tmp_path, rpc, queue).learn_from, b"raw", _directive("d-1"))
    restarted = _student(tmp_path, rpc, queue)  # a new process over the same home

    async def main() -> list[bool]:
        return [await restarted.learn_from(b"raw", _directive(d)) for d in ("d-1", "d-2")]

    assert trio.run(main) == [False, True]
    assert [f.directive_id for f in queue.queued] == ["d-1", "d-2"]
    assert rpc.lookups == 2
