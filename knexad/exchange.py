"""``/knexa/exchange/1.0.0``: the student fetches a KnowledgePackage from its teacher.

Teacher side (``ExchangeServer.handle``, a libp2p stream handler) checks the request in
the order docs/protocol.md §6 prescribes — envelope signed by the Noise remote, directive
signed by *our* CPM, not expired, names us as teacher and the remote as student, our
transfer set, never used before — and only then asks the agent to teach. Its output
passes the guardrail, is packed, chunked, sealed end-to-end to the student, and written
chunk by chunk (awaiting each write is the backpressure).

Student side (``fetch_package``) dials the teacher, presents the directive verbatim,
verifies every envelope came from the teacher, opens the boxes in order, and checks the
trailer (chunk count, size, SHA-256) before decoding.

Every step has a deadline; a vanished or slow peer is a ``PeerUnavailable`` for this pair
only. Single use survives restarts: used directive IDs are appended (fsync) to a file in
the daemon's home before any teaching starts.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.peerinfo import PeerInfo

from knexad.agent_api import Agent, KnowledgePackage, ProtocolArm, TeachRequest
from knexad.agents import AgentWorker
from knexad.config import DaemonConfig
from knexad.cpm_client import NET_ERRORS, open_stream
from knexad.state import StateFile
from p2p.streams import FramedStream
from protocol.directives import verify_directive
from protocol.e2e import E2EBox
from protocol.envelope import Identity, now_ms, open_envelope, seal
from protocol.errors import (
    KnexaError,
    MalformedFrame,
    PeerUnavailable,
    ProtocolError,
    Replay,
    error_from_code,
)
from protocol.ids import EXCHANGE_PROTOCOL
from protocol.knowledge import decode_package, digest, encode_package, split_chunks
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
        self.served = 0

    async def handle(self, stream: INetStream) -> None:
        """Stream handler; never raises (a failure costs this stream only)."""
        framed = FramedStream(stream, self.cfg.limits.max_frame)
        remote = framed.remote_peer
        start = time.perf_counter()
        try:
            await self._serve(framed, remote, start)
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

        box = E2EBox(self.identity, remote)
        chunks = split_chunks(data, self.cfg.limits.chunk_bytes)
        did = directive.directive_id
        for index, chunk in enumerate(chunks):
            sealed = seal(KnowledgeChunk(directive_id=did, index=index, box=box.seal_chunk(did, index, chunk)), self.identity)
            with trio.fail_after(step):
                await framed.write_frame(sealed)
        end = KnowledgeEnd(
            directive_id=did,
            chunks=len(chunks),
            total_bytes=len(data),
            sha256=digest(data),
            items=len(package.items),
            dropped=dropped,
        )
        with trio.fail_after(step):
            await framed.write_frame(seal(end, self.identity))
        await framed.close()
        self.served += 1
        self.state.state.taught += 1
        log.info(
            "exchange.package.sent",
            peer=remote,
            directive=did,
            round=directive.round,
            bytes=len(data),
            chunks=len(chunks),
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
        await framed.close()


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
    try:
        result = await _receive(framed, identity, cfg, directive_raw, directive, teacher_id, guard, start)
    except trio.TooSlowError:
        await framed.reset()
        raise PeerUnavailable(f"teacher {teacher_id} too slow (step > {cfg.timeouts.exchange_step_s} s)") from None
    except NET_ERRORS as exc:
        await framed.reset()
        raise PeerUnavailable(f"exchange with {teacher_id} broke: {type(exc).__name__}") from None
    except KnexaError:
        await framed.reset()
        raise
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
    box = E2EBox(identity, teacher_id)
    plain = bytearray()
    index = 0
    while True:
        # the teacher may spend up to teach_s generating before the first chunk
        wait = step + (cfg.timeouts.teach_s if index == 0 else 0.0)
        with trio.fail_after(wait):
            frame = await _read_frame(framed, teacher_id)
        if frame is None:
            raise PeerUnavailable(f"teacher {teacher_id} closed the stream before KnowledgeEnd")
        env, msg = open_envelope(frame, expected_sender=teacher_id, allowed=(KnowledgeChunk, KnowledgeEnd, Error))
        guard.check(env, now_ms())
        if isinstance(msg, Error):
            raise error_from_code(msg.code, msg.message)
        if msg.directive_id != did:
            raise MalformedFrame(f"frame for directive {msg.directive_id}, expected {did}")
        if isinstance(msg, KnowledgeChunk):
            if msg.index != index:
                raise MalformedFrame(f"chunk {msg.index} out of order (expected {index})")
            plain += box.open_chunk(did, index, msg.box)
            if len(plain) > cfg.limits.max_package_bytes:
                raise MalformedFrame(f"package exceeds limits.max_package_bytes ({cfg.limits.max_package_bytes})")
            index += 1
            continue
        end: KnowledgeEnd = msg
        if end.chunks != index or end.total_bytes != len(plain):
            raise ProtocolError(
                f"trailer mismatch: {end.chunks} chunks / {end.total_bytes} B announced, "
                f"{index} / {len(plain)} received"
            )
        if end.sha256 != digest(bytes(plain)):
            raise ProtocolError("package SHA-256 does not match the trailer")
        package = decode_package(bytes(plain))
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
