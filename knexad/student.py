"""The student's side of one directive: dial the teacher, fetch, learn, queue Feedback.

Mirrors ``ExchangeServer`` (the teacher's side). Each directive is acted on at most
once, durably: a CPM that restarts before it has our Feedback re-serves the round's
open directive, and learning from it again would double-count one directive's
knowledge and send the CPM a second Feedback for it (docs/knexad.md, "exactly once").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog
import trio

from knexad.agent_api import ProtocolArm
from knexad.agents import AgentWorker
from knexad.config import CHECKPOINT_DIR, DaemonConfig
from knexad.cpm_client import CpmRpc, FeedbackSender
from knexad.exchange import UsedDirectives, fetch_package
from knexad.state import StateFile
from protocol.envelope import Identity
from protocol.errors import KnexaError
from protocol.messages import Directive, Feedback
from protocol.replay import ReplayGuard

log = structlog.get_logger(__name__)


class Student:
    """Acts on directives that name this daemon as the student."""

    def __init__(
        self,
        home: Path,
        cfg: DaemonConfig,
        identity: Identity,
        host: Any,
        rpc: CpmRpc,
        worker: AgentWorker,
        feedback: FeedbackSender,
        state: StateFile,
        studied: UsedDirectives,
        guard: ReplayGuard,
        save_timeout_s: float,
    ) -> None:
        self.home, self.cfg, self.identity, self.host = Path(home), cfg, identity, host
        self.rpc, self.worker, self.feedback, self.state = rpc, worker, feedback, state
        self.studied, self.guard, self.save_timeout_s = studied, guard, save_timeout_s

    async def learn_from(self, raw: bytes, d: Directive) -> bool:
        """Fetch and learn; returns False when ``d`` was already acted on (nothing done).

        The directive is recorded only after its Feedback is durably queued: a crash in
        between re-runs it, and the outbox keeps one Feedback per directive (``put``
        replaces), so the CPM still sees at most one.
        """
        if d.directive_id in self.studied:
            log.info("student.directive.already_done", directive=d.directive_id, round=d.round, peer=d.teacher)
            return False
        self.state.update(role="student", last_directive=d.directive_id, round=d.round)
        loss_pre = loss_post = kb = 0.0
        failure = ""
        try:
            teacher = await self.rpc.lookup(d.teacher)
            result = await fetch_package(self.host, self.identity, self.cfg, teacher, raw, d, guard=self.guard)
            self.state.count_bytes(d.teacher, bytes_in=result.wire_bytes_in, bytes_out=result.wire_bytes_out)
            kb = result.wire_bytes_in / 1024.0
            log.info(
                "exchange.package.received",
                peer=d.teacher, directive=d.directive_id, round=d.round, bytes=result.plaintext_bytes,
                items=len(result.package.items), dropped=result.dropped, duration_ms=result.duration_ms,
            )
            arm = ProtocolArm(d.alpha, d.temperature, d.n_samples)
            learned = await self.worker.call(
                self.worker.agent.learn, result.package, arm, timeout_s=self.cfg.timeouts.learn_s, what="learn"
            )
            loss_pre, loss_post = float(learned.loss_pre), float(learned.loss_post)
            self.state.state.learned += 1
            log.info(
                "agent.learned", directive=d.directive_id, round=d.round, loss_pre=loss_pre,
                loss_post=loss_post, items=learned.items_used,
            )
            await self.worker.call(
                self.worker.agent.save, self.home / CHECKPOINT_DIR, timeout_s=self.save_timeout_s, what="save"
            )
        except KnexaError as exc:
            failure = exc.code or "internal"
            log.warning("exchange.failed", peer=d.teacher, directive=d.directive_id, round=d.round,
                        error=failure, message=str(exc))
            self.state.update(last_error=f"{failure}: {exc}")
        feedback = Feedback(
            directive_id=d.directive_id, round=d.round, teacher=d.teacher, student=d.student,
            loss_pre=loss_pre, loss_post=loss_post, kb=kb, ok=not failure, failure=failure,
        )
        await self.feedback.enqueue(feedback)
        await trio.to_thread.run_sync(self.studied.claim, d.directive_id)
        return True
