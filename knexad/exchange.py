"""The teacher's side of ``/knexa/exchange/1.1.0`` and ``1.0.0`` (the student's is
``knexad.student``). The daemon registers ``handle`` for both IDs; the version
multistream-select picked is the stream's protocol, and only the chunk frames and the
trailer differ between them (docs/protocol.md §6).

``ExchangeServer.handle``, a libp2p stream handler, checks the request in
the order docs/protocol.md §6 prescribes — envelope signed by the Noise remote, directive
signed by *our* CPM, not expired, names us as teacher and the remote as student, our
transfer set, never used before — and only then asks the agent to teach. Its output
passes the guardrail, is packed, chunked, sealed end-to-end to the student, and written
chunk by chunk (awaiting each write is the backpressure; sealing the next chunk runs in
a worker thread meanwhile, see ``send_knowledge``).

Every step has a deadline; a vanished or slow student is a ``PeerUnavailable`` for this
pair only. Single use survives restarts: used directive IDs are appended (fsync) to a file in
the daemon's home before any teaching starts.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import structlog
import trio
from libp2p.abc import INetStream

from knexad.agent_api import Agent, KnowledgePackage, ProtocolArm, TeachRequest
from knexad.agents import AgentWorker
from knexad.config import DaemonConfig
from knexad.exchanges import append_exchange
from knexad.state import StateFile
from p2p.ratelimit import PeerRateLimiter
from p2p.relay import RelayNode, stream_path
from p2p.streams import NET_ERRORS, PIPELINE_DEPTH, FramedStream, pipeline, serving
from protocol.boxes import TagDigest, seal_box_frame
from protocol.conversation import REQUESTS
from protocol.directives import verify_directive
from protocol.e2e import E2EBox
from protocol.envelope import Identity, now_ms, open_envelope, seal
from protocol.errors import (
    KnexaError,
    MalformedFrame,
    PeerUnavailable,
    RateLimited,
    Replay,
)
from protocol.ids import EXCHANGE_PROTOCOL, EXCHANGE_PROTOCOL_1_1, EXCHANGE_PROTOCOLS
from protocol.knowledge import encode_package, seal_chunk_frame
from protocol.messages import Directive, Error, KnowledgeEnd, KnowledgeTrailer
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
        home: Path | None = None,
        host: Any = None,
        relay: RelayNode | None = None,
    ) -> None:
        """``home`` and ``host``: where to record each served package's path
        (``knexad.exchanges``, side ``teacher``) and the host whose connection it came
        over; ``relay`` (settable later: the daemon builds its overlay after this
        server) tells a hole-punched connection from a plain direct one."""
        self.identity, self.cfg, self.worker, self.used, self.state = identity, cfg, worker, used, state
        self.home, self.host, self.relay = home, host, relay
        self.transfer_hash = transfer_hash
        self.guardrail = Guardrail(private_texts)
        self.guard = guard or ReplayGuard()
        self.limiter = PeerRateLimiter(cfg.limits.rate_limit_per_s, cfg.limits.rate_limit_burst)
        self.served = 0

    async def handle(self, stream: INetStream) -> None:
        """Stream handler for every ID in ``EXCHANGE_PROTOCOLS``; never raises (a
        failure costs this stream only)."""
        protocol = negotiated(stream)
        async with serving(stream, self.cfg.limits.max_frame) as framed:  # ends the stream on every path
            await self._handle(framed, protocol)

    async def _handle(self, framed: FramedStream, protocol: str) -> None:
        remote = framed.remote_peer
        start = time.perf_counter()
        try:
            self.limiter.check(remote)  # before reading the KnowledgeRequest
            await self._serve(framed, remote, start, protocol)
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

    async def _serve(self, framed: FramedStream, remote: str, start: float, protocol: str) -> None:
        step = self.cfg.timeouts.exchange_step_s
        with trio.fail_after(step):
            frame = await framed.read_frame()
        if frame is None:
            raise MalformedFrame("stream closed before a KnowledgeRequest")
        env, request = open_envelope(frame, expected_sender=remote, allowed=REQUESTS[protocol])
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
        log.info("exchange.request.accepted", peer=remote, directive=directive.directive_id, round=directive.round,
                 protocol=protocol)
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
            protocol=protocol,
        )
        await framed.close()
        self.served += 1
        self.state.state.taught += 1
        seconds = time.perf_counter() - start
        path = stream_path(self.host, framed.stream, self.relay) if self.host is not None else ""
        log.info(
            "exchange.package.sent",
            peer=remote,
            directive=did,
            round=directive.round,
            bytes=len(data),
            chunks=chunks,
            items=len(package.items),
            dropped=dropped,
            duration_ms=int(seconds * 1000),
            path=path,
            protocol=protocol,
        )
        if self.home is not None and path:
            await self._record(directive, remote, path, framed.bytes_in + framed.bytes_out, seconds)

    async def _record(self, directive: Directive, remote: str, path: str, wire_bytes: int, seconds: float) -> None:
        """The teacher's line in ``exchanges.jsonl``: a record, never a reason to fail."""
        home = self.home
        assert home is not None
        try:
            await trio.to_thread.run_sync(lambda: append_exchange(
                home, directive=directive.directive_id, round_=directive.round, teacher=self.identity.peer_id,
                student=remote, path=path, wire_bytes=wire_bytes, seconds=seconds, side="teacher"))
        except OSError as exc:
            log.warning("exchange.record.failed", directive=directive.directive_id, error=str(exc))

    async def _refuse(self, framed: FramedStream, remote: str, exc: KnexaError) -> None:
        log.warning("exchange.refused", peer=remote, error=exc.code, message=str(exc))
        self.state.state.last_error = f"refused {remote}: {exc.code}"
        with trio.move_on_after(self.cfg.timeouts.exchange_step_s):
            try:
                await framed.write_frame(seal(Error(code=exc.code, message=str(exc)[:500]), self.identity))
            except (KnexaError, *NET_ERRORS):
                pass


def negotiated(stream: object) -> str:
    """The exchange version of a served stream: the ID multistream-select agreed on
    (py-libp2p sets it before calling the handler). A stream without one — a test
    double — speaks 1.0.0, the version every peer has."""
    get = getattr(stream, "get_protocol", None)
    protocol = get() if get is not None else None
    return protocol if protocol in EXCHANGE_PROTOCOLS else EXCHANGE_PROTOCOL


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
    protocol: str = EXCHANGE_PROTOCOL,
) -> int:
    """Teacher: write ``data`` as sealed chunk frames, then the signed trailer; every
    write has ``step_s``. Returns the chunk count.

    ``protocol`` picks the frames: 1.0.0 — ``KnowledgeChunk`` envelopes, each signed
    over the SHA-256 of its body, and a ``KnowledgeEnd`` with the SHA-256 of the whole
    plaintext; 1.1.0 — unsigned ``KnowledgeBox`` records and a ``KnowledgeTrailer``
    signed over the digest of their tags (no hash pass over the payload). Either way
    chunk i+1 is sealed in a worker thread while chunk i is written."""
    box = E2EBox(identity, student)
    view = memoryview(data)
    count = max(1, -(-len(data) // chunk_bytes))  # an empty package is one empty chunk
    v11 = protocol == EXCHANGE_PROTOCOL_1_1
    whole = hashlib.sha256()
    tags = TagDigest()

    def build(index: int) -> bytes:  # worker thread; calls are sequential, in order
        piece = view[index * chunk_bytes : (index + 1) * chunk_bytes]
        if v11:
            frame, tag = seal_box_frame(box, directive_id, index, piece, framed.max_frame)
            tags.add(tag)
            return frame
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

    async with pipeline() as nursery:
        nursery.start_soon(produce)
        async with recv:
            async for frame in recv:
                if isinstance(frame, Exception):
                    raise frame
                with trio.fail_after(step_s):
                    await framed.write_encoded(frame)
    end: KnowledgeEnd | KnowledgeTrailer
    if v11:
        end = KnowledgeTrailer(directive_id, count, len(data), tags.digest(), items, dropped)
    else:
        end = KnowledgeEnd(directive_id, count, len(data), whole.digest(), items, dropped)
    with trio.fail_after(step_s):
        await framed.write_frame(seal(end, identity))
    return count
