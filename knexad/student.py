"""The student's side of ``/knexa/exchange/1.1.0`` (or ``1.0.0``): dial the teacher,
present the directive, receive and check the package, learn, queue Feedback.

Mirrors ``knexad.exchange.ExchangeServer`` (the teacher's side). ``fetch_package``
offers 1.1.0 first and 1.0.0 second (one multistream-select exchange; an older teacher
answers ``na`` to the first), opens the boxes in order and checks the signed trailer —
1.0.0: every chunk envelope signed by the teacher, the plaintext's size and SHA-256;
1.1.0: the trailer's digest of the boxes' tags and the size — before decoding. Every
step has a deadline, and a vanished or slow teacher is a ``PeerUnavailable`` for this
pair only (docs/protocol.md §6). Each directive is acted on at most once, durably: a
CPM that restarts before it has our Feedback re-serves the round's open directive, and
learning from it again would double-count one directive's knowledge and send the CPM a
second Feedback for it (docs/knexad.md, "exactly once").
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog
import trio
from libp2p.abc import IHost
from libp2p.peer.peerinfo import PeerInfo

from knexad.agent_api import KnowledgePackage, ProtocolArm
from knexad.agents import AgentWorker
from knexad.config import CHECKPOINT_DIR, DaemonConfig
from knexad.cpm_client import CpmRpc, FeedbackSender
from knexad.exchange import UsedDirectives, negotiated
from knexad.exchanges import append_exchange
from knexad.state import StateFile
from p2p.relay import PATH_DIRECT, PATH_RELAY, RelayNode, open_stream_via
from p2p.streams import NET_ERRORS, PIPELINE_DEPTH, FramedStream, pipeline, stream_failures
from protocol.boxes import TagDigest, box_tag, parse_record
from protocol.conversation import exchange_replies
from protocol.e2e import E2EBox
from protocol.envelope import Envelope, Identity, now_ms, open_envelope, seal
from protocol.errors import (
    DecryptionFailed,
    KnexaError,
    MalformedFrame,
    PeerUnavailable,
    ProtocolError,
    TruncatedFrame,
    error_from_code,
)
from protocol.ids import EXCHANGE_PROTOCOL, EXCHANGE_PROTOCOL_1_1, EXCHANGE_PROTOCOLS
from protocol.knowledge import decode_package
from protocol.messages import (
    Directive,
    Error,
    Feedback,
    KnowledgeBox,
    KnowledgeChunk,
    KnowledgeEnd,
    KnowledgeRequest,
    KnowledgeTrailer,
)
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
        *,
        relay: RelayNode | None = None,
    ) -> None:
        self.home, self.cfg, self.identity, self.host = Path(home), cfg, identity, host
        self.rpc, self.worker, self.feedback, self.state = rpc, worker, feedback, state
        self.studied, self.guard, self.save_timeout_s = studied, guard, save_timeout_s
        self.learned_round: int | None = None  # the last round this agent distilled in
        self.relay = relay

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
            result = await fetch_package(self.host, self.identity, self.cfg, teacher, raw, d, guard=self.guard,
                                         relay=self.relay)
            self.state.count_bytes(d.teacher, bytes_in=result.wire_bytes_in, bytes_out=result.wire_bytes_out)
            self.state.count_path(result.path)
            try:  # the harness's path table (knexad/exchanges.py): a record, never a reason to fail
                await trio.to_thread.run_sync(lambda: append_exchange(
                    self.home, directive=d.directive_id, round_=d.round, teacher=d.teacher, student=d.student,
                    path=result.path, wire_bytes=result.wire_bytes_in + result.wire_bytes_out,
                    seconds=result.duration_ms / 1000.0, dial_seconds=result.dial_ms / 1000.0))
            except OSError as exc:
                log.warning("student.exchange_record.failed", directive=d.directive_id, error=str(exc))
            kb = result.wire_bytes_in / 1024.0
            log.info(
                "exchange.package.received",
                peer=d.teacher, directive=d.directive_id, round=d.round, bytes=result.plaintext_bytes,
                items=len(result.package.items), dropped=result.dropped, duration_ms=result.duration_ms,
                path=result.path, wire_bytes=result.wire_bytes_in + result.wire_bytes_out, protocol=result.protocol,
            )
            arm = ProtocolArm(d.alpha, d.temperature, d.n_samples)
            learned = await self.worker.call(
                self.worker.agent.learn, result.package, arm, timeout_s=self.cfg.timeouts.learn_s, what="learn"
            )
            loss_pre, loss_post = float(learned.loss_pre), float(learned.loss_post)
            self.learned_round = d.round
            self.state.state.learned += 1
            self.state.state.steps_trained += int(learned.steps)
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


@dataclass(frozen=True, slots=True)
class FetchResult:
    package: KnowledgePackage
    wire_bytes_in: int
    wire_bytes_out: int
    plaintext_bytes: int
    dropped: int
    duration_ms: int
    path: str = PATH_DIRECT  # direct | holepunch | relay (p2p.relay)
    dial_ms: int = 0  # of duration_ms: until the stream was open (direct try, relay, hole punch)
    protocol: str = EXCHANGE_PROTOCOL  # the exchange version the teacher agreed to


async def fetch_package(
    host: IHost,
    identity: Identity,
    cfg: DaemonConfig,
    teacher: PeerInfo,
    directive_raw: bytes,
    directive: Directive,
    *,
    guard: ReplayGuard | None = None,
    relay: RelayNode | None = None,
) -> FetchResult:
    """Student side of one exchange. Raises a typed ``KnexaError`` on any failure.

    With ``relay``, the teacher's ``/p2p-circuit`` addresses are a fallback: direct
    first (``network.direct_dial_s``), then the relayed connection and DCUtR
    (docs/networking.md). A relayed connection is closed after the exchange: the relay
    caps a circuit's bytes and lifetime, and the next exchange should try direct again."""
    guard = guard or ReplayGuard()
    teacher_id = teacher.peer_id.to_base58()
    if teacher_id != directive.teacher:
        raise MalformedFrame("dialled peer is not the directive's teacher")
    start = time.perf_counter()
    stream, path = await open_stream_via(host, relay, teacher, EXCHANGE_PROTOCOLS,
                                         direct_s=cfg.network.direct_dial_s, dial_s=cfg.timeouts.dial_s)
    dial_ms = int((time.perf_counter() - start) * 1000)
    protocol = negotiated(stream)
    framed = FramedStream(stream, cfg.limits.max_frame)
    try:
        async with stream_failures(framed, too_slow=f"teacher {teacher_id} too slow (step > {cfg.timeouts.exchange_step_s} s)",
                                   broke=f"exchange with {teacher_id} broke"):
            result = await _receive(framed, identity, cfg, directive_raw, directive, teacher_id, guard, start,
                                    protocol)
        await framed.close()
    finally:
        if path == PATH_RELAY:
            with trio.move_on_after(2):
                try:
                    await host.disconnect(teacher.peer_id)
                except NET_ERRORS:
                    pass
    return replace(result, path=path, dial_ms=dial_ms, protocol=protocol)


async def _read_frame(framed: FramedStream, peer: str) -> bytes | None:
    """A frame cut off by EOF means the teacher went away mid-send (a killed process
    looks exactly like that on libp2p): report it as the peer being unavailable."""
    try:
        return await framed.read_frame()
    except TruncatedFrame:
        raise PeerUnavailable(f"teacher {peer} vanished mid-frame") from None


async def _receive(
    framed: FramedStream,
    identity: Identity,
    cfg: DaemonConfig,
    directive_raw: bytes,
    directive: Directive,
    teacher_id: str,
    guard: ReplayGuard,
    start: float,
    protocol: str,
) -> FetchResult:
    step = cfg.timeouts.exchange_step_s
    did = directive.directive_id
    with trio.fail_after(step):
        await framed.write_frame(seal(KnowledgeRequest(directive=directive_raw), identity))
    plain, end = await receive_knowledge(
        framed,
        identity,
        teacher_id,
        did,
        guard,
        max_package_bytes=cfg.limits.max_package_bytes,
        step_s=step,
        first_wait_s=step + cfg.timeouts.teach_s,  # the teacher may spend teach_s generating
        protocol=protocol,
    )
    package = decode_package(plain)
    if len(package.items) != end.items:
        raise ProtocolError(f"trailer says {end.items} items, package has {len(package.items)}")
    return FetchResult(
        package=package,
        wire_bytes_in=framed.bytes_in,
        wire_bytes_out=framed.bytes_out,
        plaintext_bytes=len(plain),
        dropped=end.dropped,
        duration_ms=int((time.perf_counter() - start) * 1000),
    )


class _Opener:
    """The per-frame work of ``receive_knowledge`` that runs off the event loop: parse,
    verify, open the box, append. Calls are sequential and in chunk order (one worker
    thread at a time). The replay guard is not touched here (it may be shared with the
    event loop): the caller checks it."""

    def __init__(self, identity: Identity, teacher: str, directive_id: str, protocol: str) -> None:
        self.box = E2EBox(identity, teacher)
        self.teacher, self.directive_id = teacher, directive_id
        self.v11 = protocol == EXCHANGE_PROTOCOL_1_1
        self.allowed = exchange_replies(protocol)  # 1.0.0: chunks, KnowledgeEnd, Error; 1.1.0: trailer, Error
        self.parts: list[memoryview] = []  # each chunk's payload, a view of its opened box
        self.size = 0
        self.whole = hashlib.sha256()  # 1.0.0: the plaintext, as KnowledgeEnd.sha256
        self.tags = TagDigest()  # 1.1.0: the boxes' tags, as KnowledgeTrailer.macs_sha256
        self.last_size = 0

    def open(self, frame: bytes, index: int) -> tuple[Envelope | None, Any, DecryptionFailed | None]:
        if self.v11:
            record = parse_record(frame, index)  # None: not a record, so it must be an envelope
            if record is not None:
                return None, record, self._open_box(record.index, record.box, index)
        env, msg = open_envelope(frame, expected_sender=self.teacher, allowed=self.allowed)
        if isinstance(msg, KnowledgeChunk) and msg.directive_id == self.directive_id:
            return env, msg, self._open_box(msg.index, msg.box, index)
        return env, msg, None

    def _open_box(self, got: int, box: bytes, index: int) -> DecryptionFailed | None:
        if got != index:
            return None  # the caller reports the order
        try:
            payload = self.box.open_chunk_view(self.directive_id, index, box)
        except DecryptionFailed as exc:
            return exc
        # kept as views and joined once at the trailer: growing one bytearray chunk by chunk
        # re-copied the package at almost every resize (docs/performance.md)
        self.parts.append(payload)
        self.size += len(payload)
        self.last_size = len(payload)
        if self.v11:
            self.tags.add(box_tag(box))
        else:
            self.whole.update(payload)
        return None

    def check_trailer(self, end: KnowledgeEnd | KnowledgeTrailer, chunks: int) -> None:
        if end.chunks != chunks or end.total_bytes != self.size:
            raise ProtocolError(
                f"trailer mismatch: {end.chunks} chunks / {end.total_bytes} B announced, "
                f"{chunks} / {self.size} received"
            )
        if isinstance(end, KnowledgeEnd) and end.sha256 != self.whole.digest():
            raise ProtocolError("package SHA-256 does not match the trailer")
        if isinstance(end, KnowledgeTrailer) and end.macs_sha256 != self.tags.digest():
            raise ProtocolError("SHA-256 of the box tags does not match the trailer")


async def receive_knowledge(
    framed: FramedStream,
    identity: Identity,
    teacher: str,
    directive_id: str,
    guard: ReplayGuard,
    *,
    max_package_bytes: int,
    step_s: float,
    first_wait_s: float,
    protocol: str = EXCHANGE_PROTOCOL,
) -> tuple[bytes, KnowledgeEnd | KnowledgeTrailer]:
    """Student: read chunks until the trailer; returns the plaintext and trailer after
    checking chunk order, size and the trailer's digest. Checks run in the order
    docs/protocol.md gives: signature (teacher), replay guard, ``Error``, directive,
    index, box; any failure raises its typed error.

    ``protocol`` is the negotiated exchange version: 1.0.0 reads ``KnowledgeChunk``
    envelopes and ``KnowledgeEnd``; 1.1.0 reads ``KnowledgeBox`` records (no
    signature, no replay guard: the box binds directive and index) and a signed
    ``KnowledgeTrailer``. Both refuse a chunk after an empty one (only an empty package
    is an empty chunk), so a teacher cannot keep the stream going forever without
    sending bytes. Frames of the other version are refused."""
    opener = _Opener(identity, teacher, directive_id, protocol)
    send, recv = trio.open_memory_channel[bytes | Exception | None](PIPELINE_DEPTH)

    async def read_frames() -> None:
        # A read failure is relayed as the next item, so the consumer reports errors in
        # stream order (a bad chunk before a truncated one behind it), as when it was
        # one sequential loop.
        async with send:
            wait = first_wait_s
            while True:
                try:
                    with trio.fail_after(wait):
                        frame: bytes | Exception | None = await _read_frame(framed, teacher)
                except Exception as exc:  # noqa: BLE001 — relayed, raised by the consumer
                    frame = exc
                wait = step_s
                try:
                    await send.send(frame)
                except trio.BrokenResourceError:
                    return  # the consumer stopped; its own error tells why
                if not isinstance(frame, bytes):
                    return

    index = 0
    empty_before = False  # the last chunk opened was empty
    trailer = KnowledgeTrailer.__name__ if opener.v11 else KnowledgeEnd.__name__
    end: KnowledgeEnd | KnowledgeTrailer | None = None
    async with pipeline() as nursery:
        nursery.start_soon(read_frames)
        async with recv:
            async for frame in recv:
                if frame is None:
                    raise PeerUnavailable(f"teacher {teacher} closed the stream before {trailer}")
                if isinstance(frame, Exception):
                    raise frame
                env, msg, failure = await trio.to_thread.run_sync(opener.open, frame, index)
                if env is not None:
                    guard.check(env, now_ms())
                if isinstance(msg, Error):
                    raise error_from_code(msg.code, msg.message)
                if not isinstance(msg, KnowledgeBox) and msg.directive_id != directive_id:
                    raise MalformedFrame(f"frame for directive {msg.directive_id}, expected {directive_id}")
                if isinstance(msg, (KnowledgeEnd, KnowledgeTrailer)):
                    end = msg
                    nursery.cancel_scope.cancel()  # stop the reader; nothing follows the trailer
                    break
                if msg.index != index:
                    raise MalformedFrame(f"chunk {msg.index} out of order (expected {index})")
                if empty_before:
                    raise MalformedFrame(f"chunk {index} after an empty chunk")
                if failure is not None:
                    raise failure
                if opener.size > max_package_bytes:
                    raise MalformedFrame(f"package exceeds limits.max_package_bytes ({max_package_bytes})")
                empty_before = opener.last_size == 0
                index += 1
    if end is None:  # pragma: no cover — the loop only ends by raising or at the trailer
        raise PeerUnavailable(f"teacher {teacher} stopped before {trailer}")
    opener.check_trailer(end, index)
    return b"".join(opener.parts), end
