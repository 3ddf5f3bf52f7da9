"""``/knexa/exchange/1.0.0``: the student fetches a KnowledgePackage from its teacher.

Teacher side (``ExchangeServer.handle``, a libp2p stream handler) checks the request in
the order docs/protocol.md §6 prescribes — envelope signed by the Noise remote, directive
signed by *our* CPM, not expired, names us as teacher and the remote as student, our
transfer set, never used before — and only then asks the agent to teach. Its output
passes the guardrail, is packed, chunked, sealed end-to-end to the student, and written
chunk by chunk (awaiting each write is the backpressure; sealing the next chunk runs in
a worker thread meanwhile, see ``send_knowledge``).

Student side (``fetch_package``) dials the teacher, presents the directive verbatim,
verifies every envelope came from the teacher, opens the boxes in order, and checks the
trailer (chunk count, size, SHA-256) before decoding.

Every step has a deadline; a vanished or slow peer is a ``PeerUnavailable`` for this pair
only. Single use survives restarts: used directive IDs are appended (fsync) to a file in
the daemon's home before any teaching starts.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.peerinfo import PeerInfo

from knexad.agent_api import Agent, KnowledgePackage, ProtocolArm, TeachRequest
from knexad.agents import AgentWorker
from knexad.config import DaemonConfig
from knexad.cpm_client import open_stream
from knexad.state import StateFile
from p2p.ratelimit import PeerRateLimiter
from p2p.streams import NET_ERRORS, FramedStream, serving, stream_failures
from protocol.directives import verify_directive
from protocol.e2e import E2EBox
from protocol.envelope import Envelope, Identity, now_ms, open_envelope, seal
from protocol.errors import (
    DecryptionFailed,
    KnexaError,
    MalformedFrame,
    PeerUnavailable,
    ProtocolError,
    RateLimited,
    Replay,
    error_from_code,
)
from protocol.ids import EXCHANGE_PROTOCOL
from protocol.knowledge import decode_package, encode_package, seal_chunk_frame
from protocol.messages import Directive, Error, KnowledgeChunk, KnowledgeEnd, KnowledgeRequest
from protocol.replay import ReplayGuard

log = structlog.get_logger(__name__)


class UsedDirectives:
    """Append-only, fsync'ed log of directive IDs already served (single use, durable)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._used: set[str] = set()
        if self.path.exists():
            self._used = {line for line in self.path.read_text(encoding="utf-8").splitlines() if line}

    def __contains__(self, directive_id: str) -> bool:
        return directive_id in self._used

    def claim(self, directive_id: str) -> None:
        """Mark used *before* teaching; a second claim is a ``Replay``."""
        if directive_id in self._used or "\n" in directive_id:
            raise Replay(f"directive {directive_id} was already used")
        self._used.add(directive_id)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, (directive_id + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)


class Guardrail:
    """The teacher's outbound filter (secrets/PII, private-data overlap), with the
    private-text index built once per daemon rather than per package.

    Imported lazily: ``knexad.agent.guardrail`` is torch-free but lives with the ML code;
    the daemon loads it only when it actually teaches.
    """

    def __init__(self, private_texts: tuple[str, ...] = ()) -> None:
        self.private_texts = private_texts
        self._index = None

    def apply(self, package: KnowledgePackage) -> tuple[KnowledgePackage, int]:
        from knexad.agent.guardrail import build_index, filter_items

        if self.private_texts and self._index is None:
            self._index = build_index(self.private_texts)
        report = filter_items(list(package.items), index=self._index)
        kept = KnowledgePackage(package.teacher_family, tuple(report.kept), dict(package.meta))
        return kept, len(report.dropped)


class ExchangeServer:
    """Teacher side: serves KnowledgeRequests that carry a valid, unused directive."""

    def __init__(
        self,
        identity: Identity,
        cfg: DaemonConfig,
        worker: AgentWorker,
        used: UsedDirectives,
        state: StateFile,
        *,
        transfer_hash: str,
        private_texts: tuple[str, ...] = (),
        guard: ReplayGuard | None = None,
    ) -> None:
        self.identity, self.cfg, self.worker, self.used, self.state = identity, cfg, worker, used, state
        self.transfer_hash = transfer_hash
        self.guardrail = Guardrail(private_texts)
        self.guard = guard or ReplayGuard()
        self.limiter = PeerRateLimiter(cfg.limits.rate_limit_per_s, cfg.limits.rate_limit_burst)
        self.served = 0

    async def handle(self, stream: INetStream) -> None:
        """Stream handler; never raises (a failure costs this stream only)."""
        async with serving(stream, self.cfg.limits.max_frame) as framed:  # ends the stream on every path
            await self._handle(framed)

    async def _handle(self, framed: FramedStream) -> None:
        remote = framed.remote_peer
        start = time.perf_counter()
        try:
            self.limiter.check(remote)  # before reading the KnowledgeRequest
            await self._serve(framed, remote, start)
        except RateLimited as exc:  # a PeerUnavailable, but the peer is there: answer it
            await self._refuse(framed, remote, exc)
        except PeerUnavailable as exc:
            log.warning("exchange.failed", peer=remote, error=exc.code, message=str(exc))
            await framed.reset()
        except KnexaError as exc:
            await self._refuse(framed, remote, exc)
        except trio.TooSlowError:
            log.warning("exchange.failed", peer=remote, error="peer_unavailable", message="student too slow")
            await framed.reset()
        except NET_ERRORS as exc:
            log.warning("exchange.failed", peer=remote, error="peer_unavailable", message=type(exc).__name__)
            await framed.reset()
        except Exception as exc:  # noqa: BLE001 — boundary: a bug must not kill the host
            log.exception("exchange.internal_error", peer=remote, error=type(exc).__name__)
            await framed.reset()
        finally:
            self.state.count_bytes(remote, bytes_in=framed.bytes_in, bytes_out=framed.bytes_out)
            self.state.save()

    async def _serve(self, framed: FramedStream, remote: str, start: float) -> None:
        step = self.cfg.timeouts.exchange_step_s
        with trio.fail_after(step):
            frame = await framed.read_frame()
        if frame is None:
            raise MalformedFrame("stream closed before a KnowledgeRequest")
        env, request = open_envelope(frame, expected_sender=remote, allowed=(KnowledgeRequest,))
        self.guard.check(env, now_ms())
        _, directive = verify_directive(
            request.directive,
            cpm_peer_id=self.cfg.cpm_peer_id,
            now_ms=now_ms(),
            teacher=self.identity.peer_id,
            student=remote,
            transfer_hash=self.transfer_hash,
        )
        await trio.to_thread.run_sync(self.used.claim, directive.directive_id)
        log.info("exchange.request.accepted", peer=remote, directive=directive.directive_id, round=directive.round)
        self.state.update(role="teacher", last_directive=directive.directive_id)

        teach = TeachRequest(
            directive_id=directive.directive_id,
            round=directive.round,
            transfer_ids=directive.transfer_ids,
            arm=ProtocolArm(directive.alpha, directive.temperature, directive.n_samples),
        )
        agent: Agent = self.worker.agent
        package = await self.worker.call(agent.teach, teach, timeout_s=self.cfg.timeouts.teach_s, what="teach")
        package, dropped = await trio.to_thread.run_sync(self.guardrail.apply, package)
        if dropped:
            log.info("exchange.guardrail.dropped", peer=remote, directive=directive.directive_id, dropped=dropped)
        data = encode_package(package)
        if len(data) > self.cfg.limits.max_package_bytes:
            raise KnexaError(f"package of {len(data)} bytes exceeds limits.max_package_bytes")

        did = directive.directive_id
        chunks = await send_knowledge(
            framed,
            self.identity,
            remote,
            did,
            data,
            chunk_bytes=self.cfg.limits.chunk_bytes,
            step_s=step,
            items=len(package.items),
            dropped=dropped,
        )
        await framed.close()
        self.served += 1
        self.state.state.taught += 1
        log.info(
            "exchange.package.sent",
            peer=remote,
            directive=did,
            round=directive.round,
            bytes=len(data),
            chunks=chunks,
            items=len(package.items),
            dropped=dropped,
            duration_ms=int((time.perf_counter() - start) * 1000),
        )

    async def _refuse(self, framed: FramedStream, remote: str, exc: KnexaError) -> None:
        log.warning("exchange.refused", peer=remote, error=exc.code, message=str(exc))
        self.state.state.last_error = f"refused {remote}: {exc.code}"
        with trio.move_on_after(self.cfg.timeouts.exchange_step_s):
            try:
                await framed.write_frame(seal(Error(code=exc.code, message=str(exc)[:500]), self.identity))
            except (KnexaError, *NET_ERRORS):
                pass


@dataclass(frozen=True, slots=True)
class FetchResult:
    package: KnowledgePackage
    wire_bytes_in: int
    wire_bytes_out: int
    plaintext_bytes: int
    dropped: int
    duration_ms: int


async def fetch_package(
    host: IHost,
    identity: Identity,
    cfg: DaemonConfig,
    teacher: PeerInfo,
    directive_raw: bytes,
    directive: Directive,
    *,
    guard: ReplayGuard | None = None,
) -> FetchResult:
    """Student side of one exchange. Raises a typed ``KnexaError`` on any failure."""
    guard = guard or ReplayGuard()
    teacher_id = teacher.peer_id.to_base58()
    if teacher_id != directive.teacher:
        raise MalformedFrame("dialled peer is not the directive's teacher")
    start = time.perf_counter()
    stream = await open_stream(host, teacher, EXCHANGE_PROTOCOL, cfg.timeouts.dial_s)
    framed = FramedStream(stream, cfg.limits.max_frame)
    async with stream_failures(framed, too_slow=f"teacher {teacher_id} too slow (step > {cfg.timeouts.exchange_step_s} s)",
                               broke=f"exchange with {teacher_id} broke"):
        result = await _receive(framed, identity, cfg, directive_raw, directive, teacher_id, guard, start)
    await framed.close()
    return result


async def _read_frame(framed: FramedStream, peer: str) -> bytes | None:
    """A frame cut off by EOF means the teacher went away mid-send (a killed process
    looks exactly like that on libp2p): report it as the peer being unavailable."""
    try:
        return await framed.read_frame()
    except MalformedFrame as exc:
        if "truncated" in str(exc):
            raise PeerUnavailable(f"teacher {peer} vanished mid-frame") from None
        raise


async def _receive(
    framed: FramedStream,
    identity: Identity,
    cfg: DaemonConfig,
    directive_raw: bytes,
    directive: Directive,
    teacher_id: str,
    guard: ReplayGuard,
    start: float,
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


# --- the chunk stream, shared by both sides and by benchmarks/stream.py ---------------
#
# Each side overlaps its per-chunk crypto with the stream: the teacher seals chunk i+1 in
# a worker thread while chunk i is written, the student verifies and opens chunk i in a
# worker thread while chunk i+1 is read. SHA-256 and XSalsa20-Poly1305 release the GIL,
# so on two cores the crypto runs beside py-libp2p's (pure-Python) yamux and Noise
# instead of after them. It still shares the cores and the GIL with the event loop;
# ``python -m benchmarks.stream --interference`` measures what that alone costs.
# At most PIPELINE_DEPTH frames wait between the two stages.

PIPELINE_DEPTH = 1


@asynccontextmanager
async def _pipeline() -> AsyncIterator[trio.Nursery]:
    """A nursery for a two-stage pipeline that fails with the error that stopped it
    (a ``PeerUnavailable``, ``TooSlowError`` …), not an ``ExceptionGroup`` around it,
    so callers keep handling typed errors as before."""
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        first = next((e for e in leaves if not isinstance(e, trio.Cancelled)), leaves[0])
        raise first from None


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


async def send_knowledge(
    framed: FramedStream,
    identity: Identity,
    student: str,
    directive_id: str,
    data: bytes,
    *,
    chunk_bytes: int,
    step_s: float,
    items: int,
    dropped: int,
) -> int:
    """Teacher: write ``data`` as sealed ``KnowledgeChunk`` frames, then the
    ``KnowledgeEnd`` trailer; every write has ``step_s``. Returns the chunk count."""
    box = E2EBox(identity, student)
    view = memoryview(data)
    count = max(1, -(-len(data) // chunk_bytes))  # an empty package is one empty chunk
    whole = hashlib.sha256()

    def build(index: int) -> bytes:  # worker thread; calls are sequential, in order
        piece = view[index * chunk_bytes : (index + 1) * chunk_bytes]
        whole.update(piece)
        return seal_chunk_frame(identity, box, directive_id, index, piece, framed.max_frame)

    send, recv = trio.open_memory_channel[bytes | Exception](PIPELINE_DEPTH)

    async def produce() -> None:
        async with send:
            for index in range(count):
                try:
                    frame: bytes | Exception = await trio.to_thread.run_sync(build, index)
                except Exception as exc:  # noqa: BLE001 — relayed: the writer raises it in order
                    frame = exc
                try:
                    await send.send(frame)
                except trio.BrokenResourceError:
                    return  # the writer stopped; its own error tells why
                if isinstance(frame, Exception):
                    return

    async with _pipeline() as nursery:
        nursery.start_soon(produce)
        async with recv:
            async for frame in recv:
                if isinstance(frame, Exception):
                    raise frame
                with trio.fail_after(step_s):
                    await framed.write_encoded(frame)
    end = KnowledgeEnd(directive_id, count, len(data), whole.digest(), items, dropped)
    with trio.fail_after(step_s):
        await framed.write_frame(seal(end, identity))
    return count


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
) -> tuple[bytearray, KnowledgeEnd]:
    """Student: read chunks until ``KnowledgeEnd``; returns the plaintext and trailer
    after checking chunk order, size and SHA-256. Checks run in the order
    docs/protocol.md gives: signature (teacher), replay guard, ``Error``, directive,
    index, box; any failure raises its typed error."""
    box = E2EBox(identity, teacher)
    plain = bytearray()
    whole = hashlib.sha256()
    allowed = (KnowledgeChunk, KnowledgeEnd, Error)

    def open_frame(frame: bytes, index: int) -> tuple[Envelope, Any, DecryptionFailed | None]:
        # worker thread; calls are sequential, in chunk order. The replay guard is not
        # touched here (it may be shared with the event loop): the caller checks it.
        env, msg = open_envelope(frame, expected_sender=teacher, allowed=allowed)
        if isinstance(msg, KnowledgeChunk) and msg.directive_id == directive_id and msg.index == index:
            try:
                payload = box.open_chunk_view(directive_id, index, msg.box)
            except DecryptionFailed as exc:
                return env, msg, exc
            plain.extend(payload)
            whole.update(payload)
        return env, msg, None

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
    end: KnowledgeEnd | None = None
    async with _pipeline() as nursery:
        nursery.start_soon(read_frames)
        async with recv:
            async for frame in recv:
                if frame is None:
                    raise PeerUnavailable(f"teacher {teacher} closed the stream before KnowledgeEnd")
                if isinstance(frame, Exception):
                    raise frame
                env, msg, failure = await trio.to_thread.run_sync(open_frame, frame, index)
                guard.check(env, now_ms())
                if isinstance(msg, Error):
                    raise error_from_code(msg.code, msg.message)
                if msg.directive_id != directive_id:
                    raise MalformedFrame(f"frame for directive {msg.directive_id}, expected {directive_id}")
                if isinstance(msg, KnowledgeEnd):
                    end = msg
                    nursery.cancel_scope.cancel()  # stop the reader; nothing follows the trailer
                    break
                if msg.index != index:
                    raise MalformedFrame(f"chunk {msg.index} out of order (expected {index})")
                if failure is not None:
                    raise failure
                if len(plain) > max_package_bytes:
                    raise MalformedFrame(f"package exceeds limits.max_package_bytes ({max_package_bytes})")
                index += 1
    if end is None:  # pragma: no cover — the loop only ends by raising or at the trailer
        raise PeerUnavailable(f"teacher {teacher} stopped before KnowledgeEnd")
    if end.chunks != index or end.total_bytes != len(plain):
        raise ProtocolError(
            f"trailer mismatch: {end.chunks} chunks / {end.total_bytes} B announced, "
            f"{index} / {len(plain)} received"
        )
    if end.sha256 != whole.digest():
        raise ProtocolError("package SHA-256 does not match the trailer")
    return plain, end
