"""The daemon: one libp2p host and a trio nursery of services around one agent.

Services: the CPM client (register, profile, directive long-poll), the feedback sender
(durable outbox → CPM), the exchange server (stream handler: teach on a valid directive),
the signal watcher, and optionally a Prometheus endpoint. The student side of an
exchange runs inside the CPM client's loop (it has nothing else to do until it has
learned); blocking agent work goes through ``AgentWorker`` so the host keeps serving.

Shutdown (SIGINT/SIGTERM, or a fatal policy decision such as "not admitted") cancels
the nursery, then — shielded, under a deadline — saves the agent checkpoint and writes
the final status, and ``run()`` returns the process exit code.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import IO

import structlog
import trio

from knexad.agent_api import Agent
from knexad.agents import AgentWorker, end_round, last_evaluation, local_round, private_texts_of
from knexad.config import CHECKPOINT_DIR, OUTBOX_DIR, STUDIED_DIRECTIVES_FILE, USED_DIRECTIVES_FILE, DaemonConfig
from knexad.cpm_client import CpmClient, CpmRpc, FeedbackSender
from knexad.evaluations import append_evaluation
from knexad.exchange import ExchangeServer, UsedDirectives
from knexad.outbox import Outbox
from knexad.student import Student
from p2p.process import first_leaf
from knexad.state import DaemonState, StateFile
from p2p.files import atomic_write
from protocol.envelope import Identity
from protocol.errors import ConfigError, KnexaError
from protocol.ids import EXCHANGE_PROTOCOLS
from protocol.messages import Directive
from protocol.replay import ReplayGuard

log = structlog.get_logger(__name__)

SHUTDOWN_SAVE_S = 120.0


def write_ready_file(path: Path, peer_id: str, addrs: list[str]) -> None:
    """JSON ``{peer_id, addrs, pid}`` (the CPM node's ready-file shape), via temp +
    rename so a reader polling for the file never sees it half written."""
    atomic_write(path, json.dumps({"peer_id": peer_id, "addrs": addrs, "pid": os.getpid()}), mode=0o644,
                 durable=False)


class Daemon:
    def __init__(
        self,
        home: Path,
        cfg: DaemonConfig,
        identity: Identity,
        agent: Agent,
        *,
        ready_file: Path | None = None,
        out: IO[str] | None = None,
        handle_signals: bool = True,
    ) -> None:
        self.home = Path(home)
        self.cfg, self.identity, self.agent = cfg, identity, agent
        self.ready_file = ready_file
        self.out = out or sys.stdout
        self.handle_signals = handle_signals
        self.state = StateFile(self.home, DaemonState(peer_id=identity.peer_id, pid=os.getpid()))
        self.outbox = Outbox(self.home / OUTBOX_DIR)
        self.used = UsedDirectives(self.home / USED_DIRECTIVES_FILE)
        self.studied = UsedDirectives(self.home / STUDIED_DIRECTIVES_FILE)
        self.worker = AgentWorker(agent)
        self.guard = ReplayGuard()
        self.exit_code = 0
        self.host = None
        self.rpc: CpmRpc | None = None
        self.feedback: FeedbackSender | None = None
        self.client: CpmClient | None = None
        self.student: Student | None = None
        self.server: ExchangeServer | None = None
        self.ready = trio.Event()
        self._cancel: trio.CancelScope | None = None
        self._profiled_round: int | None = None

    # -- lifecycle ----------------------------------------------------------------------

    async def run(self) -> int:
        """Run until a signal or a fatal condition; returns the exit code."""
        self.state.update(status="starting", outbox_size=len(self.outbox))
        try:
            async with trio.open_nursery() as nursery:
                self._cancel = nursery.cancel_scope
                if self.handle_signals:
                    await nursery.start(self._signals)
                nursery.start_soon(self._main)
        finally:
            with trio.CancelScope(shield=True):
                await self._shutdown()
        return self.exit_code

    def stop(self, code: int = 0) -> None:
        """Ask the daemon to exit with ``code`` (first caller wins)."""
        if self.exit_code == 0:
            self.exit_code = code
        if self._cancel is not None:
            self._cancel.cancel()

    async def _signals(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                log.info("daemon.signal", signal=signal.Signals(signum).name)
                self.stop(0)
                return

    async def _main(self) -> None:
        try:
            await self._serve()
        except (KnexaError, OSError, ExceptionGroup) as group:
            # libp2p's nurseries wrap what our code raised inside the host's context
            exc = first_leaf(group)
            if isinstance(exc, ConfigError):
                log.error("daemon.config_error", key=exc.key, error=str(exc))
                self.stop(3)
            elif isinstance(exc, KnexaError):
                log.error("daemon.failed", error=exc.code, message=str(exc))
                self.stop(1)
            elif isinstance(exc, OSError):
                log.error("daemon.failed", error="os_error", message=str(exc))
                self.stop(1)
            else:
                raise
        finally:
            self.stop(self.exit_code)

    async def _serve(self) -> None:
        from p2p.host import build_host, listening_addrs, parse_listen_addrs

        cfg = self.cfg
        listen = parse_listen_addrs(cfg.listen)
        restored = await self.worker.call(
            self.agent.load, self.home / CHECKPOINT_DIR, timeout_s=cfg.timeouts.learn_s, what="load"
        )
        transfer_hash = await self.worker.call(
            self.agent.transfer_set_hash, timeout_s=cfg.timeouts.request_s, what="transfer_hash"
        )
        private = await self.worker.call(private_texts_of, self.agent, timeout_s=cfg.timeouts.learn_s, what="private")
        log.info("agent.ready", family=self.agent.family, restored=restored, transfer_hash=transfer_hash[:16])

        host = self.host = build_host(self.identity.seed, dial_timeout_s=cfg.timeouts.dial_s)
        async with host.run(listen):
            self.server = ExchangeServer(
                self.identity, cfg, self.worker, self.used, self.state,
                transfer_hash=transfer_hash, private_texts=private, guard=self.guard, home=self.home, host=host,
            )
            for protocol in EXCHANGE_PROTOCOLS:  # 1.1.0 and 1.0.0: handle reads which one was picked
                host.set_stream_handler(protocol, self.server.handle)
            addrs = listening_addrs(host, cfg.listen)
            self.state.update(status="running", addrs=addrs)
            from knexad.overlay import Overlay

            self.overlay = Overlay(host, cfg, self.state, addrs)
            self.server.relay = self.overlay.node  # the teacher tells hole-punched connections apart
            self.rpc = CpmRpc(host, self.identity, cfg, self.guard)
            self.feedback = FeedbackSender(self.rpc, self.outbox, cfg, self.state)
            self.student = Student(
                self.home, cfg, self.identity, host, self.rpc, self.worker, self.feedback, self.state,
                self.studied, self.guard, SHUTDOWN_SAVE_S, relay=self.overlay.node,
            )
            self.client = CpmClient(
                self.rpc, cfg, self.identity, self.state,
                family=self.agent.family, transfer_hash=transfer_hash,
                profile_fn=self._profile, on_directive=self._on_directive, on_exit=self.stop,
            )
            async with trio.open_nursery() as services:
                await services.start(self.feedback.run)
                await services.start(self.overlay.run)  # before Register: it carries the circuit address
                await services.start(self.client.run)
                if cfg.metrics_port:
                    self._start_metrics()
                print(addrs[0], file=self.out, flush=True)
                if self.ready_file is not None:
                    write_ready_file(self.ready_file, self.identity.peer_id, addrs)
                log.info("daemon.ready", peer=self.identity.peer_id, addrs=addrs, cpm=cfg.cpm)
                self.ready.set()

    async def _shutdown(self) -> None:
        if self.worker.running is not None:
            # the agent's thread cannot be interrupted: say why the exit takes a while
            log.info("daemon.stopping", waiting_for=f"agent.{self.worker.running}", then="agent.save",
                     limit_s=SHUTDOWN_SAVE_S)
        with trio.move_on_after(SHUTDOWN_SAVE_S) as scope:
            try:
                await self.worker.call(
                    self.agent.save, self.home / CHECKPOINT_DIR, timeout_s=SHUTDOWN_SAVE_S, what="save"
                )
            except KnexaError as exc:
                log.error("agent.save_failed", error=exc.code, message=str(exc))
                self.exit_code = self.exit_code or 1
        if scope.cancelled_caught:
            log.error("agent.save_failed", error="timeout")
        self.state.update(status="stopped", cpm_connected=False, outbox_size=len(self.outbox))
        log.info("daemon.stopped", exit_code=self.exit_code, outbox=len(self.outbox))

    # -- callbacks for the CPM client ----------------------------------------------------

    async def _profile(self, round_: int) -> list[float]:
        if self._profiled_round is not None and round_ > self._profiled_round:
            await self._train_if_idle(self._profiled_round)
            await self.worker.call(end_round, self.agent, timeout_s=self.cfg.timeouts.learn_s, what="end_round")
        self._profiled_round = round_
        vector = await self.worker.call(self.agent.profile, timeout_s=self.cfg.timeouts.learn_s, what="profile")
        # the held-out test metrics of the weights this profile describes stay local
        # (knexad/evaluations.py): the profile itself carries validation numbers only
        metrics = await self.worker.call(last_evaluation, self.agent, timeout_s=self.cfg.timeouts.learn_s,
                                         what="last_evaluation")
        if metrics:
            append_evaluation(self.home, round_, metrics)
        return vector

    async def _train_if_idle(self, round_: int) -> None:
        """Equal compute: an agent that did not distill in ``round_`` (a teacher, unpaired,
        LocalOnly, or its exchange failed) trains a KD round's steps on private data."""
        if not self.cfg.agent.local_when_idle or (self.student and self.student.learned_round == round_):
            return
        result = await self.worker.call(local_round, self.agent, timeout_s=self.cfg.timeouts.learn_s,
                                        what="local_round")
        if result is None:
            return
        await self.worker.call(self.agent.save, self.home / CHECKPOINT_DIR, timeout_s=SHUTDOWN_SAVE_S, what="save")
        st = self.state.state
        st.local_rounds += 1
        st.steps_trained += int(result.steps)
        self.state.update()
        log.info("agent.local_round", round=round_, steps=result.steps, loss_pre=float(result.loss_pre),
                 loss_post=float(result.loss_post), steps_trained=st.steps_trained)

    async def _on_directive(self, raw: bytes, directive: Directive) -> None:
        log.info(
            "cpm.directive.received",
            directive=directive.directive_id,
            round=directive.round,
            teacher=directive.teacher,
            student=directive.student,
            arm=directive.arm,
        )
        if directive.teacher == self.identity.peer_id:
            # nothing to do now: the student will dial us and present this directive
            self.state.update(role="teacher", last_directive=directive.directive_id, round=directive.round)
            return
        assert self.student is not None
        await self.student.learn_from(raw, directive)

    # -- metrics -------------------------------------------------------------------------

    def _start_metrics(self) -> None:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.core import GaugeMetricFamily

        state = self.state

        class _StateCollector:
            def collect(self):  # noqa: ANN202 — prometheus collector protocol
                s = state.state
                yield GaugeMetricFamily("knexad_round", "current round", value=s.round)
                yield GaugeMetricFamily("knexad_outbox_size", "feedback awaiting the CPM's Ack", value=s.outbox_size)
                yield GaugeMetricFamily("knexad_taught_total", "packages served as teacher", value=s.taught)
                yield GaugeMetricFamily("knexad_learned_total", "packages learned as student", value=s.learned)
                wire = GaugeMetricFamily("knexad_exchange_bytes", "exchange bytes by peer", labels=["peer", "direction"])
                for peer, stats in s.peers.items():
                    wire.add_metric([peer, "in"], stats.bytes_in)
                    wire.add_metric([peer, "out"], stats.bytes_out)
                yield wire
                yield GaugeMetricFamily("knexad_relay_reserved", "1 while a relay reservation is held",
                                        value=int(s.relay_reserved))
                yield GaugeMetricFamily("knexad_relay_reservations", "successful relay reservations since start",
                                        value=s.relay_reservations)
                reach = GaugeMetricFamily("knexad_reachability", "CPM dial-back verdict (1 = current)",
                                          labels=["state"])
                for name in ("unknown", "public", "private"):
                    reach.add_metric([name], int(s.reachability == name))
                yield reach

        registry = CollectorRegistry()
        registry.register(_StateCollector())
        from p2p.metrics import install_event_metrics  # exchanges, durations, rejections… from log events

        install_event_metrics(registry, "knexad")
        start_http_server(self.cfg.metrics_port, addr="127.0.0.1", registry=registry)
        log.info("daemon.metrics", port=self.cfg.metrics_port)
