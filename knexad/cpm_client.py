"""The daemon's side of ``/knexa/cpm/1.0.0`` (docs/protocol.md §6).

``CpmRpc`` does one request per stream: dial (deadline), send a sealed envelope, read one
reply (deadline), verify it was signed by the configured CPM. ``CpmClient`` drives the
round loop — Register, Profile, DirectiveRequest long-poll — and hands directives to the
daemon. ``FeedbackSender`` drains the durable outbox: each Feedback is sealed anew (fresh
nonce) on every attempt and removed only after the CPM's ``Ack`` whose ``ref`` is that
attempt's nonce.

Failure policy: the CPM being down is normal (restarts, deploys): every network failure
is a ``PeerUnavailable`` and the loop reconnects with exponential backoff + jitter. With
several CPM addresses (``cpm = [...]``: replicas sharing one identity and one database,
docs/operations.md "High availability") a failure also moves the next request to the
next address, round-robin, so the backoff retries land on another replica.
``Unauthorized`` means an operator has to act: a ``cpm.unauthorized`` line with the exact
``knexa-cpm admit`` command, then exit 5 (or keep retrying if ``on_unauthorized=retry``).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
import trio
from libp2p.abc import IHost
from libp2p.peer.peerinfo import PeerInfo

from knexad.config import DaemonConfig
from knexad.outbox import Outbox
from knexad.state import StateFile
from p2p.host import parse_peer_addr
from p2p.rpc import request_reply
from protocol.conversation import open_reply
from protocol.directives import verify_directive
from protocol.envelope import Envelope, Identity, NONCE_BYTES, now_ms, seal
from protocol.errors import (
    ConfigError,
    KnexaError,
    MalformedFrame,
    PeerUnavailable,
    ProtocolError,
    RateLimited,
    Unauthorized,
)
from protocol.ids import CPM_PROTOCOL, MAX_FRAME_CPM
from protocol.messages import (
    Ack,
    Directive,
    DirectiveRequest,
    Feedback,
    NoDirective,
    PeerAddrs,
    PeerLookup,
    Profile,
    Register,
    Registered,
)
from protocol.replay import ReplayGuard

log = structlog.get_logger(__name__)

AGENT_VERSION = "knexad/0.1.0"


class TransferSetMismatch(ConfigError):
    """The CPM's transfer set is not this agent's: nothing can be exchanged (code 3)."""


class Backoff:
    """Exponential backoff with jitter: base·2^n capped at max, minus up to jitter·delay."""

    def __init__(self, base_s: float, max_s: float, jitter: float, rng: random.Random | None = None) -> None:
        self.base_s, self.max_s, self.jitter = base_s, max_s, jitter
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        delay = min(self.max_s, self.base_s * (2**self.attempt))
        self.attempt += 1
        return delay * (1.0 - self.jitter * self._rng.random())

    def reset(self) -> None:
        self.attempt = 0


@dataclass(frozen=True, slots=True)
class Reply:
    raw: bytes  # the reply envelope, verbatim (a Directive is forwarded as-is)
    envelope: Envelope
    message: Any
    request_nonce: bytes


class CpmRpc:
    """One request envelope per stream, one verified reply (docs/protocol.md §6)."""

    def __init__(self, host: IHost, identity: Identity, cfg: DaemonConfig, guard: ReplayGuard | None = None) -> None:
        self.host = host
        self.identity = identity
        self.cfg = cfg
        self.cpm_infos = [parse_peer_addr(a, "cpm") for a in cfg.cpm_addrs]
        self.active = 0  # the replica requests go to; moves on when one fails
        self.failovers = 0
        self.cpm_peer_id = cfg.cpm_peer_id
        self.guard = guard or ReplayGuard()

    @property
    def cpm_info(self) -> PeerInfo:
        return self.cpm_infos[self.active]

    def _target(self) -> PeerInfo:
        """The active replica. With several, the peerstore keeps only its address:
        they share one peer ID, and py-libp2p dials just one TCP address of a peer (the
        first it stored), which would pin every dial to the first replica ever used."""
        info = self.cpm_info
        if len(self.cpm_infos) > 1:
            self.host.get_peerstore().clear_addrs(info.peer_id)
        return info

    def _fail_over(self, exc: PeerUnavailable) -> None:
        """The active replica did not answer: the next request goes to the next one (the
        caller's backoff paces it). The outbox re-sends unacknowledged feedback there; the
        database's one-feedback-per-directive keeps that exactly-once."""
        if len(self.cpm_infos) < 2 or isinstance(exc, RateLimited):
            return
        failed = self.active
        self.active = (failed + 1) % len(self.cpm_infos)
        self.failovers += 1
        log.warning("cpm.failover", failed=self.cfg.cpm_addrs[failed], to=self.cfg.cpm_addrs[self.active],
                    error=str(exc)[:200])

    async def call(self, message: Any, timeout_s: float | None = None) -> Reply:
        """``message`` to the CPM; its verified reply (``protocol.conversation``: which
        types may answer; an ``Error`` is raised typed)."""
        timeout_s = self.cfg.timeouts.request_s if timeout_s is None else timeout_s
        nonce = os.urandom(NONCE_BYTES)
        try:
            raw = await request_reply(
                self.host, self._target(), CPM_PROTOCOL, seal(message, self.identity, nonce=nonce),
                max_frame=MAX_FRAME_CPM, dial_s=self.cfg.timeouts.dial_s, timeout_s=timeout_s,
                what=type(message).__name__,
            )
        except PeerUnavailable as exc:
            self._fail_over(exc)
            raise
        env, reply = open_reply(raw, message, expected_sender=self.cpm_peer_id)
        if not isinstance(reply, Directive):
            # directives are forwarded verbatim and may be re-served later; everything
            # else is a fresh answer and must be fresh and unique
            self.guard.check(env, now_ms())
        if isinstance(reply, Ack) and reply.ref != nonce:
            raise MalformedFrame(f"CPM Ack refers to another request (ref {reply.ref.hex()})")
        return Reply(raw, env, reply, nonce)

    async def lookup(self, peer_id: str) -> PeerInfo:
        """PeerLookup → the addresses ``peer_id`` registered, as a dialable PeerInfo."""
        import multiaddr

        from p2p.host import peer_id_of

        reply = await self.call(PeerLookup(peer_id=peer_id))
        addrs_msg: PeerAddrs = reply.message
        if addrs_msg.peer_id != peer_id:
            raise MalformedFrame("PeerAddrs for another peer")
        addrs = []
        for text in addrs_msg.addrs:
            # a /p2p-circuit address names the relay and the peer: keep it whole
            base = text if "/p2p-circuit" in text else text.split("/p2p/", 1)[0]
            if "/p2p-circuit" in text and not text.endswith(f"/p2p-circuit/p2p/{peer_id}"):
                log.warning("cpm.lookup.bad_addr", peer=peer_id, addr=text)
                continue
            try:
                addrs.append(multiaddr.Multiaddr(base))
            except (ValueError, TypeError, multiaddr.exceptions.Error):
                log.warning("cpm.lookup.bad_addr", peer=peer_id, addr=text)
        if not addrs:
            raise PeerUnavailable(f"CPM knows no address for {peer_id}")
        return PeerInfo(peer_id_of(peer_id), addrs)


DirectiveHandler = Callable[[bytes, Directive], Awaitable[None]]


class CpmClient:
    """Register, then per round: Profile → DirectiveRequest long-poll → directive handler."""

    def __init__(
        self,
        rpc: CpmRpc,
        cfg: DaemonConfig,
        identity: Identity,
        state: StateFile,
        *,
        family: str,
        transfer_hash: str,
        profile_fn: Callable[[int], Awaitable[list[float]]],
        on_directive: DirectiveHandler,
        on_exit: Callable[[int], None],
    ) -> None:
        self.rpc, self.cfg, self.identity, self.state = rpc, cfg, identity, state
        self.family, self.transfer_hash = family, transfer_hash
        self.profile_fn, self.on_directive, self.on_exit = profile_fn, on_directive, on_exit
        self.backoff = Backoff(cfg.retry.base_s, cfg.retry.max_s, cfg.retry.jitter)
        self.registered = trio.Event()
        self._last_contact = time.monotonic()
        self._profile_cache: tuple[int, tuple[float, ...]] | None = None
        self._registered_addrs: tuple[str, ...] = ()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                reg = await self._register()
                await self._rounds(reg.round)
            except Unauthorized as exc:
                self._unauthorized(exc)
                if self.cfg.on_unauthorized == "exit":
                    self.on_exit(5)
                    return
            except TransferSetMismatch as exc:
                log.error("cpm.transfer_hash_mismatch", error=str(exc), ours=self.transfer_hash)
                self.state.update(cpm_connected=False, last_error=str(exc))
                self.on_exit(3)
                return
            except (PeerUnavailable, ProtocolError) as exc:
                self.state.update(cpm_connected=False, last_error=f"{exc.code}: {exc}")
                log.warning("cpm.unreachable", error=exc.code, message=str(exc))
                give_up = self.cfg.timeouts.give_up_s
                if give_up > 0 and time.monotonic() - self._last_contact > give_up:
                    log.error("cpm.give_up", after_s=give_up, cpm=self.cfg.cpm)
                    self.on_exit(4)
                    return
            except KnexaError as exc:  # `internal`, or a code this version does not know: the CPM's
                # trouble, not ours — never a reason to stop the daemon; start the round over
                self.state.update(last_error=f"{exc.code}: {exc}")
                log.warning("cpm.error", error=exc.code, message=str(exc)[:300])
            await trio.sleep(self.backoff.next_delay())

    def _unauthorized(self, exc: KnexaError) -> None:
        hint = f"knexa-cpm admit {self.identity.peer_id} --home <cpm-home>"
        log.error("cpm.unauthorized", peer=self.identity.peer_id, error=str(exc), hint=hint)
        self.state.update(cpm_connected=False, last_error=f"unauthorized: run `{hint}`")

    def _contact(self) -> None:
        self._last_contact = time.monotonic()
        self.backoff.reset()
        # which replica answered, for `knexad doctor` (a test double without ``active`` has one)
        addr = self.cfg.cpm_addrs[getattr(self.rpc, "active", 0)]
        if self.state.state.cpm_addr != addr:
            self.state.update(cpm_addr=addr)

    def _advertised(self) -> tuple[str, ...]:
        """What Register carries: the overlay's choice (``network.advertise``; may be
        empty, e.g. relay-only before the first reservation), else the listen addrs."""
        st = self.state.state
        return tuple(st.advertised if st.advertised is not None else st.addrs)

    async def _register(self) -> Registered:
        msg = Register(
            org=self.cfg.org,
            family=self.family,
            listen_addrs=self._advertised(),
            agent_version=AGENT_VERSION,
        )
        self._registered_addrs = msg.listen_addrs
        reply = await self.rpc.call(msg)
        reg: Registered = reply.message
        self._contact()
        skew_ms = reg.cpm_time_ms - now_ms()
        if reg.transfer_hash and reg.transfer_hash != self.transfer_hash:
            # every Profile would be refused: an operator must align the transfer sets
            raise TransferSetMismatch(
                "transfer_hash", f"CPM uses transfer set {reg.transfer_hash}, this agent {self.transfer_hash}"
            )
        log.info("cpm.registered", peer=self.identity.peer_id, round=reg.round, skew_ms=skew_ms)
        self.state.update(cpm_connected=True, round=reg.round, last_error="")
        self.registered.set()
        return reg

    async def _profile_vector(self, round_: int) -> tuple[float, ...]:
        if self._profile_cache is None or self._profile_cache[0] != round_:
            vector = tuple(float(v) for v in await self.profile_fn(round_))
            self._profile_cache = (round_, vector)
        return self._profile_cache[1]

    async def _rounds(self, round_: int) -> None:
        while True:
            if self._advertised() != self._registered_addrs:
                # the relay reservation came (or went) after Register: tell the CPM
                await self._register()
            round_ = await self._send_profile(round_)
            round_ = await self._await_directive(round_)

    async def _send_profile(self, round_: int) -> int:
        """Profile until the CPM Acks it for the open round; returns that round."""
        while True:
            vector = await self._profile_vector(round_)
            reply = await self.rpc.call(Profile(round=round_, vector=vector, transfer_hash=self.transfer_hash))
            self._contact()
            if isinstance(reply.message, Ack):
                log.info("cpm.profile.accepted", round=round_)
                self.state.update(round=round_, cpm_connected=True)
                return round_
            nd: NoDirective = reply.message
            if nd.reason == "round_pending" and nd.round > round_:
                # our round is already matched (we reconnected or restarted mid-round):
                # it may hold a directive for us, so ask for it instead of waiting
                log.info("cpm.round.in_progress", round=round_)
                return round_
            round_ = await self._no_directive(nd, round_, during="profile")

    async def _await_directive(self, round_: int) -> int:
        """Long-poll for this round's directive; returns the next round to profile for."""
        wait_ms = int(self.cfg.timeouts.long_poll_s * 1000)
        while True:
            reply = await self.rpc.call(
                DirectiveRequest(round=round_, wait_ms=wait_ms),
                timeout_s=self.cfg.timeouts.long_poll_s + self.cfg.timeouts.request_s,
            )
            self._contact()
            if isinstance(reply.message, Directive):
                directive = self._check_directive(reply.raw)
                if directive.expires_at_ms < now_ms():
                    # re-served after a reconnect, too late to use: skip the round
                    log.warning("cpm.directive.expired", directive=directive.directive_id, round=directive.round)
                    return directive.round + 1
                await self.on_directive(reply.raw, directive)
                self.state.update(rounds_completed=self.state.state.rounds_completed + 1)
                st = self.state.state
                # the daemon's one canonical line per round (stable keys)
                log.info("daemon.round.done", round=directive.round, role=st.role,
                         directive=directive.directive_id, rounds_completed=st.rounds_completed,
                         outbox=st.outbox_size, last_error=st.last_error)
                return directive.round + 1
            nd = reply.message
            # not paired this round — or it was the run's last and is over already (the CPM
            # then says "finished"): the round is done for us as for everyone, and an idle
            # agent trains for it before its next Profile (equal compute, also in round R)
            if nd.reason == "not_matched" or (nd.reason == "finished" and nd.round == round_):
                log.info("cpm.directive.none", round=nd.round, reason=nd.reason)
                self.state.update(role="idle", rounds_completed=self.state.state.rounds_completed + 1)
                st = self.state.state
                log.info("daemon.round.done", round=nd.round, role="idle", directive="",
                         rounds_completed=st.rounds_completed, outbox=st.outbox_size, last_error=st.last_error)
                await trio.sleep(nd.retry_after_ms / 1000)
                return nd.round + 1
            if nd.reason == "advance":
                log.info("cpm.round.advance", round=round_, to=nd.round)
                return nd.round
            await self._no_directive(nd, round_, during="directive")

    async def _no_directive(self, nd: NoDirective, round_: int, *, during: str) -> int:
        if nd.reason == "advance":
            log.info("cpm.round.advance", round=round_, to=nd.round, during=during)
            return nd.round
        if nd.reason == "finished":
            if self.state.state.role != "finished":
                log.info("cpm.finished", round=nd.round)
                self.state.update(role="finished")
        elif nd.reason != "round_pending":
            log.warning("cpm.no_directive.unknown_reason", reason=nd.reason, round=nd.round)
        if nd.retry_after_ms > 0:
            delay = min(nd.retry_after_ms / 1000, self.cfg.retry.max_s)
        else:  # no hint: a finished run is re-checked rarely (a CPM may be restarted with more rounds)
            delay = self.cfg.retry.max_s if nd.reason == "finished" else self.cfg.retry.base_s
        await trio.sleep(delay)
        return round_

    def _check_directive(self, raw: bytes) -> Directive:
        # expiry is the caller's decision (an expired directive is skipped, not an error)
        _, directive = verify_directive(raw, cpm_peer_id=self.rpc.cpm_peer_id, now_ms=0)
        me = self.identity.peer_id
        if me not in (directive.teacher, directive.student) or directive.teacher == directive.student:
            raise MalformedFrame(f"directive {directive.directive_id} does not name this peer")
        return directive


class FeedbackSender:
    """Drains the outbox to the CPM; each item is deleted only after its Ack."""

    def __init__(self, rpc: CpmRpc, outbox: Outbox, cfg: DaemonConfig, state: StateFile) -> None:
        self.rpc, self.outbox, self.cfg, self.state = rpc, outbox, cfg, state
        self._wake = trio.Event()
        self.backoff = Backoff(cfg.retry.base_s, cfg.retry.max_s, cfg.retry.jitter)
        self.sent = 0

    async def enqueue(self, feedback: Feedback) -> None:
        """Durably queue (fsync) first, then wake the sender: nothing is lost on a crash."""
        await trio.to_thread.run_sync(self.outbox.put, feedback)
        self.state.update(outbox_size=len(self.outbox), last_feedback=_feedback_summary(feedback))
        self._wake.set()

    async def send_one(self, feedback: Feedback) -> None:
        """One attempt: seal with a fresh nonce, await the Ack for that nonce, then delete."""
        await self.rpc.call(feedback)
        await trio.to_thread.run_sync(self.outbox.ack, feedback.directive_id)
        self.sent += 1
        log.info(
            "cpm.feedback.acked",
            directive=feedback.directive_id,
            round=feedback.round,
            ok=feedback.ok,
            peer=feedback.teacher,
        )

    async def drain(self) -> int:
        """Send every pending item once; returns how many were acknowledged.

        Network trouble or ``unavailable`` (the CPM cannot store anything now) aborts
        the pass (retried with backoff). ``internal`` or a code we do not know may be
        about this one item (a CPM bug it triggers): it stays queued, the rest are
        still sent, and the pass then raises it so the caller backs off before the
        next one. A refusal of one item (the CPM does not know the directive, or says
        we are not its student) is permanent: that record is set aside as
        ``.rejected`` so it cannot block the rest.
        """
        done = 0
        kept: KnexaError | None = None
        for feedback in await trio.to_thread.run_sync(self.outbox.pending):
            try:
                await self.send_one(feedback)
            except PeerUnavailable:
                raise
            except (Unauthorized, ProtocolError) as exc:
                log.error("cpm.feedback.rejected", directive=feedback.directive_id, error=exc.code, message=str(exc))
                await trio.to_thread.run_sync(self.outbox.reject, feedback.directive_id)
                continue
            except KnexaError as exc:
                log.warning("cpm.feedback.kept", directive=feedback.directive_id, error=exc.code,
                            message=str(exc)[:300])
                kept = exc
                continue
            done += 1
        if kept is not None:
            raise kept
        return done

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self._wake = trio.Event()
            try:
                await self.drain()
                self.backoff.reset()
                self.state.update(outbox_size=len(self.outbox))
                await self._wake.wait()
                continue
            except KnexaError as exc:  # unreachable, or a refusal that is not the item's fault
                # (`unavailable`, `internal`, an unknown code): keep it queued, send it again later
                log.warning("cpm.feedback.retry", error=exc.code, message=str(exc)[:300], pending=len(self.outbox))
            self.state.update(outbox_size=len(self.outbox))
            with trio.move_on_after(self.backoff.next_delay()):
                await self._wake.wait()


def _feedback_summary(fb: Feedback) -> dict[str, Any]:
    return {
        "directive": fb.directive_id,
        "round": fb.round,
        "teacher": fb.teacher,
        "ok": fb.ok,
        "failure": fb.failure,
        "loss_pre": fb.loss_pre,
        "loss_post": fb.loss_post,
        "kb": fb.kb,
    }
