"""The CPM node on the network: a py-libp2p host serving ``/knexa/cpm/1.0.0`` and
``/knexa/admin/1.0.0`` around the sans-IO ``RoundEngine``.

A stream carries requests until the client closes it (or stays idle for
``request_timeout_s``); answers come in request order. A client that sends one request
and closes still works; one that pipelines (sends more before the answers came) gets
the requests already buffered processed together — one commit, one write. Per request,
in this order (docs/protocol.md §6, docs/cpm.md):

1. the Noise-authenticated remote peer must be admitted (or open admission, and never
   revoked) — otherwise ``Error{unauthorized}`` (on a new stream: before a byte of the
   request is read);
2. one frame is read under a deadline (a slow-loris peer gets a reset, not a task);
3. ``open_envelope(expected_sender=remote)`` — signature bound to the Noise peer;
4. ``ReplayGuard`` — stale ``ts`` → ``expired``, repeated nonce → ``replay``;
5. dispatch to the engine, the message's effects in one transaction (a savepoint);
6. the response is written only once everything the request wrote or read is
   committed (``cpm.groupcommit``), so an ``Ack`` means "durably stored".

Every refusal is a typed error, a ``cpm.rejected`` log line with ``code``, an ``Error``
frame signed by the CPM, and no state change. An error ends the stream: the answers to
earlier requests are written first, and requests after it got no answer (not done).
"Ends" means for both sides, promptly: ``p2p.streams.serving`` sends our FIN, drops
what the peer still sends until its end, and resets a peer that lingers.
The engine is synchronous and called from one trio task at a time (never while a
COMMIT runs on the worker thread: ``GroupCommitter.gate``), so it needs no locking.

Replicas (``lease_s > 0``, PostgreSQL; docs/operations.md §13): several services share
one store and identity. Each serves every request; only the holder of the round lease
(``cpm.lease``) advances rounds — the engine checks it — and a ``_lease_loop`` task renews
it (or takes it over) on a worker thread; a new term reloads the engine from the
database. Followers' tickers poll every ``REPLICA_RECHECK_S`` to see the holder's
transitions and wake their long-polls.

Group commit (default): one fsync (``commit_ms`` in ``benchmarks/ingest.py``) per
*batch* of concurrent messages instead of per message; the COMMIT runs on a worker
thread so the loop keeps reading and verifying requests meanwhile.
``group_commit=False`` commits each message on the loop, the old behaviour (kept for
``benchmarks/ingest.py``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import structlog
import trio

from cpm.admin import AdminHandler
from cpm import faults
from cpm.groupcommit import COMMIT_MAX_BATCH, COMMIT_WINDOW_S, Batch, GroupCommitter
from cpm.config import CpmConfig
from cpm.rounds import MAX_WAIT_MS, Pending, RoundEngine
from cpm.store import BatchCommitError, Store, StoreUnavailable
from p2p.host import build_host, listening_addrs, parse_listen_addrs
from p2p.relay import RelayServiceLimits, serve_relay
from p2p.ratelimit import PeerRateLimiter
from p2p.streams import FramedStream, serving
from protocol.conversation import REQUESTS
from protocol.envelope import Identity, now_ms, open_envelope, seal
from protocol.errors import FrameTooLarge, KnexaError, PeerUnavailable, RateLimited, Unauthorized, Unavailable
from protocol.ids import ADMIN_PROTOCOL, CPM_PROTOCOL, MAX_FRAME_CPM
from protocol.messages import (
    Ack,
    DirectiveRequest,
    Error,
    Feedback,
    NoDirective,
    PeerLookup,
    Profile,
    Register,
)
from protocol.replay import ReplayGuard

log = structlog.get_logger(__name__)

CPM_REQUESTS = REQUESTS[CPM_PROTOCOL]
RECHECK_S = 1.0  # the ticker re-reads the DB at least this often (admin CLI changes)
# replicas: profiles and feedback may land on another replica, so the lease holder polls
# for quorum and closable rounds, and a follower for the holder's transitions (long-polls)
REPLICA_RECHECK_S = 0.2
# one connection per agent; py-libp2p's default cap is 256 inbound (docs/reliability.md)
MAX_INBOUND_CONNECTIONS = 10_000


class _Answer:
    __slots__ = ("kind", "started", "payload", "batch")

    def __init__(self, kind: str, started: float, payload: bytes, batch: Batch | None) -> None:
        self.kind, self.started, self.payload, self.batch = kind, started, payload, batch


class Metrics:
    """Optional Prometheus endpoint on 127.0.0.1. Values are read at scrape time from
    plain counters, so the HTTP thread never touches the store (one thread at a time)."""

    def __init__(self, engine: RoundEngine, rejected: dict[str, int]) -> None:
        self.engine = engine
        self.rejected = rejected
        self.round = 0
        self.leader: Any = None  # cpm.lease.Leadership of a replica
        self._server: Any = None

    def start(self, port: int) -> int:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        metrics = self

        class _Collector:
            def collect(self) -> Any:
                c = dict(metrics.engine.counters)
                for name in ("profiles", "feedback"):
                    yield CounterMetricFamily(f"knexa_cpm_{name}", f"accepted {name}", value=c[name])
                d = CounterMetricFamily("knexa_cpm_directives", "directives by outcome", labels=["state"])
                for state in ("issued", "used", "failed", "expired"):
                    d.add_metric([state], c[f"directives_{state}"])
                yield d
                r = CounterMetricFamily("knexa_cpm_rejected", "refused requests by code", labels=["code"])
                for code, n in sorted(dict(metrics.rejected).items()):
                    r.add_metric([code], n)
                yield r
                yield GaugeMetricFamily("knexa_cpm_round", "current round", value=metrics.round)
                if metrics.leader is not None:  # replicas: which one runs the rounds (docs/operations.md §13)
                    yield GaugeMetricFamily("knexa_cpm_lease_held", "1 while this replica holds the round lease",
                                            value=1 if metrics.leader.holds() else 0)

        registry = CollectorRegistry()
        registry.register(_Collector())  # type: ignore[arg-type]
        from p2p.metrics import install_event_metrics  # rounds, pairs, reward, … from log events

        self._events = install_event_metrics(registry, "knexa_cpm")
        self._server, _thread = start_http_server(port, addr="127.0.0.1", registry=registry)
        return int(self._server.server_port)

    def stop(self) -> None:
        if getattr(self, "_events", None) is not None:
            self._events.uninstall()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def relay_limits(config: CpmConfig) -> RelayServiceLimits:
    """The operator's relay limits (``relay_*`` keys of config.toml, docs/networking.md)."""
    return RelayServiceLimits(
        max_reservations=config.relay_max_reservations, reservation_ttl_s=config.relay_reservation_ttl_s,
        circuit_bytes=config.relay_circuit_bytes, circuit_duration_s=config.relay_circuit_duration_s,
    )


class CpmService:
    """Wire the engine to a libp2p host. ``run`` reports its full multiaddrs via
    ``task_status.started`` once the host listens."""

    def __init__(
        self,
        config: CpmConfig,
        identity: Identity,
        store: Store,
        engine: RoundEngine | None = None,
        *,
        clock: Callable[[], int] = now_ms,
        group_commit: bool = True,
        commit_window_s: float = COMMIT_WINDOW_S,
        commit_max_batch: int = COMMIT_MAX_BATCH,
        commit_in_thread: bool = True,
        leader: Any = None,
    ) -> None:
        self.config = config
        self.identity = identity
        self.store = store
        if leader is None and config.lease_s > 0:  # a replica (docs/operations.md, "High availability")
            from cpm.lease import leadership_for  # psycopg: the postgres extra

            leader = leadership_for(store, config.lease_s)
        self.leader = leader
        self.engine = engine or RoundEngine(store, config, identity, leader=leader)
        self.clock = clock
        self.committer: GroupCommitter | None = None
        if group_commit:
            self.committer = GroupCommitter(store, window_s=commit_window_s, max_batch=commit_max_batch,
                                            in_thread=commit_in_thread, on_failure=self._reload_engine)
        self.replay = ReplayGuard()
        self.limiter = PeerRateLimiter(config.rate_limit_per_s, config.rate_limit_burst)
        self.rejected: dict[str, int] = {}
        self.metrics = Metrics(self.engine, self.rejected)
        self.metrics.leader = leader
        self.metrics_port = 0
        self.addrs: list[str] = []
        self._changed = trio.Event()
        self._wake = trio.Event()
        self._seen_epoch = -1
        self.admin = AdminHandler(
            store, config, identity, self.replay, clock=clock, on_change=self._poke, on_reject=self._count_reject,
            engine=lambda: self.engine, gate=self._gate,  # a function: _reload_engine replaces the engine
        )

    # ---- lifecycle --------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listen = parse_listen_addrs(self.config.listen)
        host = build_host(self.identity.seed, dial_timeout_s=self.config.request_timeout_s,
                          max_inbound=MAX_INBOUND_CONNECTIONS)
        faults.configure()  # test-only knobs (cpm.faults): logs cpm.fault.enabled when one is set
        if self.leader is not None:
            await self._renew_lease()
        self.engine.start(self.clock())
        self._after_engine()
        if self.config.metrics_port:
            self.metrics_port = self.metrics.start(self.config.metrics_port)
        try:
            async with host.run(listen):
                host.set_stream_handler(CPM_PROTOCOL, self._handle_cpm)
                host.set_stream_handler(ADMIN_PROTOCOL, self.admin.handle)
                self.addrs = listening_addrs(host, self.config.listen)
                log.info("cpm.listening", addrs=self.addrs, peer=self.identity.peer_id,
                         strategy=self.config.strategy, metrics_port=self.metrics_port)
                async with trio.open_nursery() as nursery:
                    if self.config.relay:
                        await nursery.start(partial(serve_relay, host, relay_limits(self.config),
                                                    allow=self._relay_allowed))
                    if self.committer is not None:
                        await nursery.start(self.committer.run)
                    nursery.start_soon(self._ticker)
                    if self.leader is not None:
                        nursery.start_soon(self._lease_loop)
                    task_status.started(self.addrs)
                    await trio.sleep_forever()
        finally:
            self.metrics.stop()
            if self.leader is not None:  # let a follower take over at its next poll
                self.leader.release()

    async def _renew_lease(self) -> None:
        """One renew (or takeover attempt) on a worker thread; a new term reloads the
        engine from the database, which another replica advanced meanwhile."""
        terms = self.leader.terms
        try:
            await trio.to_thread.run_sync(self.leader.renew)
        except StoreUnavailable as exc:
            log.warning("cpm.lease.renew_failed", error=str(exc)[:200])
        if self.leader.terms != terms:
            await self._gate()
            self._reload_engine(RuntimeError(f"lease term {self.leader.epoch} begins"))
            self._poke()

    async def _lease_loop(self) -> None:
        while True:
            await trio.sleep(self.leader.interval())
            await self._renew_lease()

    def _grouped(self) -> Any:
        """Writes of the block join the open batch (group commit) or commit on their own."""
        return self.store.grouped() if self.committer is not None else contextlib.nullcontext()

    async def _gate(self) -> None:
        if self.committer is not None:
            await self.committer.gate()

    def _join(self) -> Batch | None:
        """Call right after a synchronous engine call (no ``await`` in between)."""
        return self.committer.join() if self.committer is not None else None

    def _reload_engine(self, error: BaseException) -> None:
        """A failed COMMIT rolled back what the engine already applied in memory (bandit
        updates, round transitions): rebuild it from the database, which is the truth."""
        old = self.engine
        self.engine = type(old)(self.store, self.config, self.identity, leader=old.leader)
        self.engine.counters = old.counters
        self.engine.epoch = old.epoch + 1
        self.metrics.engine = self.engine
        log.warning("cpm.engine.reloaded", reason=str(error)[:200])

    async def _ticker(self) -> None:
        """Round timers and directive expiry: sleep until the engine's next deadline,
        a poke from a request, or RECHECK_S (admin changes come from other processes)."""
        while True:
            await self._gate()
            now = self.clock()
            try:
                with self._grouped():
                    deadline = self.engine.tick(now)
            except StoreUnavailable as exc:  # e.g. the admin CLI holds the lock > busy_timeout
                log.warning("cpm.tick.retry", error=str(exc))
                deadline = None
            self._after_engine()
            recheck = RECHECK_S if self.leader is None else REPLICA_RECHECK_S
            wait = recheck if deadline is None else min(recheck, max(0.0, (deadline - now) / 1000))
            self._wake = trio.Event()
            with trio.move_on_after(wait):
                await self._wake.wait()

    def _poke(self) -> None:
        self._wake.set()

    def _after_engine(self) -> None:
        """Wake long-polls when the round state moved; let the ticker recompute deadlines."""
        if self.engine.epoch != self._seen_epoch:
            self._seen_epoch = self.engine.epoch
            self._changed.set()
            self._changed = trio.Event()
            row = self.store.latest_round()
            self.metrics.round = row.round if row else 0
        self._poke()

    def _count_reject(self, code: str) -> None:
        self.rejected[code] = self.rejected.get(code, 0) + 1

    # ---- /knexa/cpm/1.0.0 -------------------------------------------------------------
    async def _handle_cpm(self, stream: Any) -> None:
        async with serving(stream, MAX_FRAME_CPM) as framed:  # ends the stream on every path
            peer = framed.remote_peer
            first = True
            while await self._serve(framed, peer, first=first):
                first = False

    async def _serve(self, framed: FramedStream, peer: str, *, first: bool) -> bool:
        """Answer the next request and every one already buffered behind it; False when
        the stream is done (EOF, idle, or an error was answered)."""
        answers: list[_Answer] = []
        kind = "?"
        timeout_s = self.config.request_timeout_s
        try:
            if first:
                await self._check_admitted(peer)  # before reading a byte of a new stream
                self.limiter.check(peer)  # RateLimited → Error{rate_limited}, nothing read
                with trio.fail_after(timeout_s):
                    frame = await framed.read_frame()
            else:
                with trio.move_on_after(timeout_s) as idle:  # an idle kept-open stream just ends
                    frame = await framed.read_frame()
                if idle.cancelled_caught:
                    return False
            while frame is not None:
                started = time.monotonic()
                if not first:
                    self.limiter.check(peer)  # each further request on a kept-open stream
                env, msg = open_envelope(frame, expected_sender=peer, allowed=CPM_REQUESTS)
                kind = type(msg).__name__
                if not first:
                    await self._check_admitted(peer)  # a revocation applies to open streams too
                first = False
                self.replay.check(env, self.clock())
                if isinstance(msg, DirectiveRequest):
                    await self._deliver(framed, peer, answers)  # do not hold answers during a long-poll
                    payload = await self._directive_long_poll(peer, msg)
                else:
                    payload = await self._dispatch(peer, env.nonce, msg)
                answers.append(_Answer(kind, started, payload, self._join()))
                frame = framed.buffered_frame()
            if not answers:
                return False
            await self._deliver(framed, peer, answers)
            return True
        except KnexaError as exc:
            await self._deliver_quietly(framed, peer, answers)
            if isinstance(exc, PeerUnavailable) and not isinstance(exc, (RateLimited, Unavailable)):
                log.info("cpm.peer.gone", peer=peer, type=kind, error=str(exc))
            else:
                await self._refuse(framed, peer, kind, exc)
        except trio.TooSlowError:
            self._count_reject("timeout")
            log.warning("cpm.rejected", peer=peer, code="timeout", type=kind)
            await framed.reset()
        except (StoreUnavailable, BatchCommitError) as exc:  # locked, unreachable, a failed batch: nothing applied
            log.warning("cpm.store.unavailable", peer=peer, type=kind, error=str(exc)[:300])
            await self._deliver_quietly(framed, peer, answers)
            await self._refuse(framed, peer, kind, Unavailable("the CPM cannot store it now; nothing was applied: "
                                                               "send it again after a back-off"))
        except Exception as exc:  # server boundary: one bad request must not kill the node
            log.exception("cpm.internal_error", peer=peer, type=kind, error=repr(exc))
            await self._deliver_quietly(framed, peer, answers)
            await self._refuse(framed, peer, kind, KnexaError("internal error"))
        return False

    async def _deliver(self, framed: FramedStream, peer: str, answers: list[_Answer]) -> None:
        """Write the answers (in order, one write) once their batches are committed.
        Takes them out of ``answers`` first: a failed commit must never let them out later."""
        batch = answers[:]
        answers.clear()
        if not batch:
            return
        if self.committer is not None:
            for pending in dict.fromkeys(a.batch for a in batch if a.batch is not None):
                await self.committer.wait(pending)
        with trio.fail_after(self.config.request_timeout_s):
            await framed.write_frames([a.payload for a in batch])
        now = time.monotonic()
        for a in batch:
            log.info("cpm.request", peer=peer, type=a.kind, duration_ms=round((now - a.started) * 1000, 2))

    async def _deliver_quietly(self, framed: FramedStream, peer: str, answers: list[_Answer]) -> None:
        """Before an Error: the answers to the requests before it, if they can be had."""
        try:
            await self._deliver(framed, peer, answers)
        except (KnexaError, trio.TooSlowError) as exc:  # the client retries what got no answer
            log.info("cpm.answers.dropped", peer=peer, error=str(exc))

    async def _relay_allowed(self, peer: str) -> bool:
        """Only admitted members may reserve on or relay through this node."""
        try:
            await self._check_admitted(peer)
        except Unauthorized:
            return False
        return True

    async def _check_admitted(self, peer: str) -> None:
        await self._gate()
        admitted, revoked = self.store.admission(peer)
        if revoked or not (self.config.open_admission or admitted):
            raise Unauthorized("peer is not admitted")

    async def _dispatch(self, peer: str, nonce: bytes, msg: Any) -> bytes:
        """Run one request against the engine; returns the response envelope bytes.
        The message's writes form one transaction (a savepoint in the open batch)."""
        await self._gate()
        now = self.clock()
        try:
            with self._grouped(), self.store.transaction():
                if isinstance(msg, Register):
                    return self._seal(self.engine.register(peer, msg, now))
                if isinstance(msg, Profile):
                    answer = self.engine.profile(peer, msg, now)
                    return self._seal(answer if answer is not None else Ack(ref=nonce))
                if isinstance(msg, Feedback):
                    self.engine.feedback(peer, msg, now)
                    return self._seal(Ack(ref=nonce))
                assert isinstance(msg, PeerLookup)
                return self._seal(self.engine.peer_lookup(peer, msg.peer_id))
        finally:
            self._after_engine()

    async def _directive_long_poll(self, peer: str, msg: DirectiveRequest) -> bytes:
        wait_s = min(max(msg.wait_ms, 0), MAX_WAIT_MS) / 1000
        deadline = trio.current_time() + wait_s
        while True:
            await self._gate()
            with self._grouped(), self.store.transaction():
                answer = self.engine.directive(peer, msg.round, self.clock())
            self._after_engine()
            if isinstance(answer, bytes):
                return answer  # the stored CPM-signed Directive envelope, verbatim
            if not isinstance(answer, Pending):
                return self._seal(answer)
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                return self._seal(NoDirective(round=answer.round, reason="round_pending", retry_after_ms=1000))
            changed = self._changed
            with trio.move_on_after(remaining):
                await changed.wait()

    def _seal(self, message: Any) -> bytes:
        return seal(message, self.identity, ts_ms=self.clock())

    async def _refuse(self, framed: FramedStream, peer: str, kind: str, exc: KnexaError) -> None:
        self._count_reject(exc.code)
        log.warning("cpm.rejected", peer=peer, code=exc.code, type=kind, error=str(exc))
        try:
            with trio.move_on_after(self.config.request_timeout_s):
                await framed.write_frame(self._seal(Error(code=exc.code, message=str(exc)[:200])))
        except (PeerUnavailable, FrameTooLarge):
            pass
        if isinstance(exc, FrameTooLarge):
            await framed.reset()
