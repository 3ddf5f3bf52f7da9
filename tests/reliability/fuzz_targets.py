"""Fuzz campaigns against a running CPM (``/knexa/cpm/1.0.0`` and ``/knexa/admin/1.0.0``)
and a running teacher (``/knexa/exchange/1.0.0``), with the after-storm checks."""

from __future__ import annotations

from pathlib import Path

import structlog.testing

from protocol.envelope import Identity, now_ms, seal
from protocol.ids import ADMIN_PROTOCOL, CPM_PROTOCOL, EXCHANGE_PROTOCOL
from protocol.messages import (
    Ack,
    AdminAdmit,
    AdminQuery,
    AdminRevoke,
    DirectiveRequest,
    Feedback,
    KnowledgeRequest,
    PeerLookup,
    Profile,
    Registered,
)
from tests.integration.test_exchange import make_directive
from tests.reliability.fuzz import FuzzReport, frame, fuzz
from tests.reliability.netkit import ask, client, db_snapshot, raw_send, register_msg, running_cpm, running_teacher


async def fuzz_cpm(tmp_path: Path, *, n: int, seed: int) -> FuzzReport:
    """Fuzz the CPM protocol (n frames) and the admin protocol (n // 5) as an admitted,
    registered agent that is also an admin; then check state and liveness."""
    me, other = Identity.generate(), Identity.generate()
    async with running_cpm(tmp_path, admins=[me.peer_id]) as (svc, info), client(me) as h:
        svc.store.admit(me.peer_id, "org", now_ms())
        assert isinstance(await ask(h, info, me, register_msg()), Registered)
        th = svc.config.transfer_hash
        seeds = [seal(m, me) for m in (
            register_msg(), Profile(1, tuple(i / 32 for i in range(32)), th), DirectiveRequest(1, 0),
            PeerLookup(other.peer_id), Feedback("r1-00", 1, other.peer_id, me.peer_id, 1.0, 0.5, 3.0, True, ""),
        )]
        admin_seeds = [seal(m, me) for m in (
            AdminAdmit(other.peer_id, "x"), AdminRevoke(other.peer_id), AdminQuery("stats", -1))]
        before = db_snapshot(tmp_path / "cpm.db")
        with structlog.testing.capture_logs():  # keep the run's output readable
            report = await fuzz(h, info, CPM_PROTOCOL, seeds, n=n, seed=seed, signer=svc.identity.peer_id)
            admin = await fuzz(h, info, ADMIN_PROTOCOL, admin_seeds, n=max(1, n // 5), seed=seed + 1,
                               signer=svc.identity.peer_id)
        assert db_snapshot(tmp_path / "cpm.db") == before, "a fuzz frame changed CPM state"
        assert isinstance(await ask(h, info, me, Profile(1, (0.5,) * 32, th)), Ack)  # still serving
    report.sent += admin.sent
    report.codes.update(admin.codes)
    report.accepted += admin.accepted
    return report


async def fuzz_teacher(tmp_path: Path, *, n: int, seed: int, protocol: str = EXCHANGE_PROTOCOL) -> FuzzReport:
    """Fuzz a teacher's exchange protocol (either version: the request step is shared)
    with mutations of valid KnowledgeRequests."""
    student = Identity.generate()
    async with running_teacher(tmp_path, exchange_step_s=2.0) as t, client(student) as h:
        seeds = []
        for _ in range(3):
            raw, _ = make_directive(t.cpm, t.identity.peer_id, student.peer_id)
            seeds.append(seal(KnowledgeRequest(directive=raw), student))
        with structlog.testing.capture_logs():
            report = await fuzz(h, t.info(), protocol, seeds, n=n, seed=seed, signer=t.identity.peer_id)
        assert t.agent.teach_calls == 0 and t.used_log() == b"", "a fuzz frame made the teacher teach"
        raw, _ = make_directive(t.cpm, t.identity.peer_id, student.peer_id)
        ok = await raw_send(h, t.info(), protocol, frame(seal(KnowledgeRequest(directive=raw), student)))
        assert ok.frame is not None and ok.error(t.identity.peer_id) is None and t.agent.teach_calls == 1
    return report
