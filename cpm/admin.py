"""Admin operations: listings shared by the CLI, the ``/knexa/admin/1.0.0`` handler and
the request/response client used by ``knexa-cpm --remote`` (and by tests).

Why one module: the local CLI (acting on the home's store) and the remote admin protocol
must produce the same rows, so both call ``query_rows``. Only peers listed in the
config's ``admins`` may use the admin protocol; everyone else gets ``unauthorized``
before their frame is even read.

Releasing a quarantined teacher (``AdminRelease``) is the one admin operation that acts
on the running node's memory, not just on the database: the round engine holds the
reputation and saves all of it with every feedback, so a release written to the file
behind its back would be overwritten. Over the admin protocol it therefore goes through
the engine (``RoundEngine.release_teacher``); ``release_offline`` edits the file of a
node that is not running.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog
import trio

from cpm.config import CpmConfig, validate_peer_id
from cpm.reputation import TeacherRecord, reputation_from_saved
from cpm.store import Store
from protocol.conversation import REQUESTS, open_reply
from protocol.envelope import Identity, now_ms, open_envelope, seal
from protocol.errors import (
    ConfigError,
    FrameTooLarge,
    KnexaError,
    MalformedFrame,
    NotQuarantined,
    PeerUnavailable,
    Unauthorized,
)
from protocol.ids import ADMIN_PROTOCOL, MAX_FRAME_ADMIN
from protocol.messages import Ack, AdminAdmit, AdminQuery, AdminRelease, AdminResult, AdminRevoke, Error
from protocol.replay import ReplayGuard

if TYPE_CHECKING:
    from cpm.rounds import RoundEngine

log = structlog.get_logger(__name__)

QUERIES = ("agents", "rounds", "pairs", "stats", "quarantine")
ADMIN_REQUESTS = REQUESTS[ADMIN_PROTOCOL]


# --- listings ---------------------------------------------------------------------------


def query_rows(store: Store, what: str, round_: int = -1, *, max_rounds: int = 0) -> list[dict[str, Any]]:
    """Rows for ``agents | rounds | pairs | stats`` with scalar values only (wire-safe)."""
    if what == "agents":
        return [
            {
                "peer_id": a.peer_id, "org": a.org, "admitted": a.admitted, "revoked": a.revoked,
                "family": a.family, "registered_at": a.registered_at, "last_seen": a.last_seen,
                "listen_addrs": " ".join(a.listen_addrs),
            }
            for a in store.list_agents()
        ]
    if what == "rounds":
        out = []
        for r in store.list_rounds():
            ds = store.directives_for_round(r.round)
            out.append({
                "round": r.round, "state": r.state, "opened_at": r.opened_at, "matched_at": r.matched_at,
                "closed_at": r.closed_at, "profiles": len(store.list_profiles(r.round)), "pairs": len(ds),
                "feedback": len(store.list_feedback(r.round)),
            })
        return out
    if what == "pairs":
        out = []
        for d in store.list_directives(None if round_ < 0 else round_):
            fb = store.get_feedback(d.directive_id)
            out.append({
                "round": d.round, "directive_id": d.directive_id, "teacher": d.teacher, "student": d.student,
                "arm": d.arm, "score": d.score, "state": d.state, "issued_at": d.issued_at,
                "expires_at": d.expires_at,
                "loss_pre": fb.loss_pre if fb else None, "loss_post": fb.loss_post if fb else None,
                "kb": fb.kb if fb else None, "ok": fb.ok if fb else None,
                "raw_reward": fb.raw_reward if fb else None, "reward": fb.reward if fb else None,
            })
        return out
    if what == "stats":
        counts = store.counts()
        latest = store.latest_round()
        finished = bool(max_rounds and latest and latest.round >= max_rounds and latest.state == "closed")
        rewards = [f.reward for f in store.list_feedback() if f.reward is not None]
        return [{
            "round": latest.round if latest else 0,
            "state": "finished" if finished else (latest.state if latest else "none"),
            **counts,
            "mean_reward": (sum(rewards) / len(rewards)) if rewards else None,
            "schema_version": store.schema_version(),
        }]
    if what == "quarantine":
        return quarantine_rows(store)
    raise MalformedFrame(f"unknown admin query {what!r} (one of {', '.join(QUERIES)})")


def quarantine_rows(store: Store) -> list[dict[str, Any]]:
    """One row per quarantined teacher: its org and the evidence that tipped it (the
    committed reputation, which the engine saves with every feedback that changes it)."""
    out = []
    for row in reputation_from_saved(store.load_bandit_state()).rows():
        if not row.pop("quarantined"):
            continue
        agent = store.get_agent(row["teacher"])
        out.append({"teacher": row.pop("teacher"), "org": agent.org if agent else None, **row})
    return out


def release_offline(store: Store, peer_id: str, now_ms_: int, *, admin: str = "local") -> TeacherRecord:
    """Release on the database of a CPM that is **not running** (``knexa-cpm release
    --offline``): read-modify-write of the reputation inside the saved state, in one
    transaction; the strategy state is kept byte for byte (whatever strategy saved it).
    A running node would overwrite this with its next save: use ``AdminRelease`` there."""
    with store.transaction():
        saved = store.load_bandit_state()
        rep = reputation_from_saved(saved)
        cleared = rep.release(peer_id, now_ms_)
        if saved is None or cleared is None:
            raise NotQuarantined(f"{peer_id} is not a quarantined teacher")
        name, state = saved
        state["reputation"] = rep.to_state()
        store.save_bandit_state(name, state, now_ms_)
    cleared.log_released(peer_id, admin)
    return cleared


def to_wire_rows(rows: list[dict[str, Any]]) -> tuple[tuple[tuple[str, Any], ...], ...]:
    return tuple(tuple((k, v) for k, v in row.items()) for row in rows)


def from_wire_rows(rows: tuple[tuple[tuple[str, Any], ...], ...]) -> list[dict[str, Any]]:
    return [dict(row) for row in rows]


# --- server -------------------------------------------------------------------------------


class AdminHandler:
    """Serves ``/knexa/admin/1.0.0``: one request envelope per stream, one response."""

    def __init__(
        self,
        store: Store,
        config: CpmConfig,
        identity: Identity,
        replay: ReplayGuard,
        *,
        clock: Callable[[], int] = now_ms,
        on_change: Callable[[], None] = lambda: None,
        on_reject: Callable[[str], None] = lambda code: None,
        engine: Callable[[], RoundEngine] | None = None,
        gate: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """``engine`` returns the node's current round engine (a getter: the service
        rebuilds it after a failed commit); without it ``AdminRelease`` is refused.
        ``gate`` waits until no group COMMIT runs, before the engine is touched."""
        self.store = store
        self.config = config
        self.identity = identity
        self.replay = replay
        self.clock = clock
        self.on_change = on_change
        self.on_reject = on_reject
        self.engine = engine
        self.gate = gate

    async def handle(self, stream: Any) -> None:
        from p2p.streams import serving

        async with serving(stream, MAX_FRAME_ADMIN) as framed:  # ends the stream on every path
            await self._handle(framed)

    async def _handle(self, framed: Any) -> None:
        peer = framed.remote_peer
        started = time.monotonic()
        try:
            if peer not in self.config.admins:
                raise Unauthorized("not an admin key")
            with trio.fail_after(self.config.request_timeout_s):
                frame = await framed.read_frame()
            if frame is None:
                return
            env, msg = open_envelope(frame, expected_sender=peer, allowed=ADMIN_REQUESTS)
            self.replay.check(env, self.clock())
            response = await self._dispatch(peer, env.nonce, msg)
            with trio.fail_after(self.config.request_timeout_s):
                await framed.write_frame(seal(response, self.identity))
            log.info("cpm.admin.request", peer=peer, type=type(msg).__name__,
                     duration_ms=round((time.monotonic() - started) * 1000, 2))
        except KnexaError as exc:
            await self._refuse(framed, peer, exc)
        except trio.TooSlowError:
            self.on_reject("timeout")
            log.warning("cpm.rejected", peer=peer, code="timeout", protocol=ADMIN_PROTOCOL)
            await framed.reset()
        except Exception as exc:  # server boundary: a bug or a locked DB must not kill the node
            log.exception("cpm.internal_error", peer=peer, protocol=ADMIN_PROTOCOL, error=repr(exc))
            await self._refuse(framed, peer, KnexaError("internal error"))

    async def _dispatch(self, peer: str, nonce: bytes, msg: Any) -> Any:
        if isinstance(msg, AdminRelease):
            return await self._release(peer, nonce, msg)
        now = self.clock()
        if isinstance(msg, AdminAdmit):
            _peer_arg(msg.peer_id)
            self.store.admit(msg.peer_id, msg.org, now)
            log.info("cpm.admin.admitted", peer=msg.peer_id, org=msg.org, admin=peer)
            self.on_change()
            return Ack(ref=nonce)
        if isinstance(msg, AdminRevoke):
            _peer_arg(msg.peer_id)
            known = self.store.revoke(msg.peer_id, now)
            log.info("cpm.admin.revoked", peer=msg.peer_id, known=known, admin=peer)
            self.on_change()
            return Ack(ref=nonce)
        assert isinstance(msg, AdminQuery)
        rows = query_rows(self.store, msg.what, msg.round, max_rounds=self.config.max_rounds)
        return AdminResult(rows=to_wire_rows(rows))

    async def _release(self, admin: str, nonce: bytes, msg: AdminRelease) -> Ack:
        _peer_arg(msg.peer_id)
        if self.engine is None:
            raise KnexaError("this admin endpoint has no round engine to release teachers in")
        if self.gate is not None:
            await self.gate()
        # no await from here on: the engine is touched by one task at a time
        if self.engine().release_teacher(msg.peer_id, self.clock(), admin=admin) is None:
            raise NotQuarantined(f"{msg.peer_id} is not a quarantined teacher")
        self.on_change()
        return Ack(ref=nonce)

    async def _refuse(self, framed: Any, peer: str, exc: KnexaError) -> None:
        self.on_reject(exc.code)
        log.warning("cpm.rejected", peer=peer, code=exc.code, error=str(exc), protocol=ADMIN_PROTOCOL)
        try:
            with trio.move_on_after(self.config.request_timeout_s):
                await framed.write_frame(seal(Error(code=exc.code, message=str(exc)[:200]), self.identity))
        except (PeerUnavailable, FrameTooLarge):
            pass
        if isinstance(exc, FrameTooLarge):
            await framed.reset()


def _peer_arg(peer_id: str) -> None:
    try:
        validate_peer_id(peer_id)
    except ConfigError as exc:
        raise MalformedFrame(str(exc)) from None


# --- client ---------------------------------------------------------------------------------


async def call(
    host: Any,
    peer_info: Any,
    identity: Identity,
    message: Any,
    *,
    protocol_id: str,
    max_frame: int,
    timeout_s: float = 10.0,
) -> tuple[Any, Any]:
    """One request/response on a fresh stream; returns (envelope, message).

    A remote ``Error`` frame is raised as its typed error; a dial or stream failure is
    ``PeerUnavailable``. The response must be signed by the peer we dialled
    (Noise-authenticated), so it cannot be forged by a middlebox."""
    from p2p.rpc import request_reply

    raw = await request_reply(host, peer_info, protocol_id, seal(message, identity), max_frame=max_frame,
                              dial_s=timeout_s, timeout_s=timeout_s, what=type(message).__name__)
    return open_reply(raw, message, expected_sender=peer_info.peer_id.to_base58())


async def remote_admin(addr: str, identity: Identity, message: Any, *, timeout_s: float = 10.0) -> Any:
    """Run one admin request against a CPM at ``addr`` (``…/p2p/<id>``) as ``identity``."""
    import multiaddr

    from p2p.host import build_host, parse_peer_addr

    peer_info = parse_peer_addr(addr, key="remote")
    host = build_host(identity.seed, dial_timeout_s=timeout_s)
    outcome: list[Any] = []
    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        try:
            outcome.append(await call(host, peer_info, identity, message, protocol_id=ADMIN_PROTOCOL,
                                      max_frame=MAX_FRAME_ADMIN, timeout_s=timeout_s))
        except KnexaError as exc:  # raised outside host.run, so callers see it unwrapped
            outcome.append(exc)
    if isinstance(outcome[0], KnexaError):
        raise outcome[0]
    return outcome[0][1]
