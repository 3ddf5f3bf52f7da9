"""Build the agent a config asks for, and run its blocking calls off the event loop.

Why a factory with lazy imports: the daemon's networking must never pay for (or depend
on) torch. ``synthetic`` imports only ``knexad.synthetic``; ``tiny-*`` and model paths
import ``knexad.agent.ml_agent`` (torch) only when chosen.

Why a worker: agent methods block for seconds to minutes (generation, distillation).
``AgentWorker.call`` runs them in a thread via ``trio.to_thread.run_sync`` so the host
keeps answering streams, one call at a time (a trio lock), under a deadline. A call
that times out is abandoned by the event loop but still holds a thread lock until it
really returns, so a later call never runs concurrently with it on the same model.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import structlog
import trio

from knexad.agent_api import Agent, LearnResult
from knexad.config import DaemonConfig
from protocol.errors import ConfigError, KnexaError

log = structlog.get_logger(__name__)

T = TypeVar("T")
SYNTHETIC_ALPHA = 0.1  # Dirichlet concentration of the data histograms (design §5: non-IID)


class AgentError(KnexaError):
    """An agent method raised: the daemon reports it (e.g. Feedback ok=false) and goes on."""

    code = "internal"


class AgentTimeout(KnexaError):
    """An agent call exceeded its configured deadline (teach_s / learn_s)."""

    code = "internal"


def build_agent(cfg: DaemonConfig) -> Agent:
    """``synthetic`` → SyntheticAgent; ``tiny-*`` / directory → MLAgent (torch, lazily)
    with the step counts of ``agent.budget``."""
    a = cfg.agent
    if a.model == "synthetic":
        from knexad.synthetic import make_population

        # the population is drawn from the shared seed, so every daemon of a run that
        # uses the same (n_agents, seed) gets a consistent, non-IID world; we keep ours
        return make_population(a.n_agents, alpha=SYNTHETIC_ALPHA, seed=a.seed)[a.index]
    if a.data != "builtin":
        raise ConfigError("agent.data", f"the ML agent supports data = 'builtin' only, got {a.data!r}")
    from knexad.agent.ml_agent import MLAgent, steps_for_budget

    return MLAgent(model=a.model, agent_index=a.index, n_agents=a.n_agents, seed=a.seed,
                   steps=steps_for_budget(a.budget), verify_knowledge=a.verify_knowledge,
                   reward_measure=a.reward_measure, replay_knowledge=a.replay_knowledge)


def end_round(agent: Agent) -> None:
    """Close a round before the next profile: agents with their own per-round dynamics
    (SyntheticAgent's local training) advance; others re-evaluate, so the dynamic dims
    of the next profile (pass@1 and its delta) reflect what this round's KD changed —
    without it the CPM would keep matching on first-round performance."""
    fn = getattr(agent, "end_round", None)
    if fn is not None:
        fn()
    else:
        agent.evaluate()


def last_evaluation(agent: Agent) -> dict[str, float] | None:
    """The agent's latest held-out metrics without a new evaluation (the ML agent's cache,
    None when its weights changed since); an agent without that accessor is asked to
    ``evaluate`` (the synthetic world's evaluation is a pure function of its state)."""
    fn = getattr(agent, "last_evaluation", None)
    return fn() if fn is not None else agent.evaluate()


def local_round(agent: Agent) -> LearnResult | None:
    """Train the agent on its private data for one KD round's steps, if it can (the ML
    agent's ``local_round``); None for agents without it (the synthetic world trains
    locally in ``end_round`` already)."""
    fn = getattr(agent, "local_round", None)
    return fn() if fn is not None else None


def private_texts_of(agent: Agent) -> tuple[str, ...]:
    """The agent's private training texts for the guardrail's overlap check, if exposed."""
    fn = getattr(agent, "private_texts", None)
    if fn is None:
        return ()
    return tuple(fn())


class AgentWorker:
    """Serialises blocking agent calls in a worker thread, each under a deadline."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._lock = trio.Lock()
        self._thread_lock = threading.Lock()
        # the call that holds the agent's thread now (it may outlive a cancelled caller:
        # a worker thread cannot be interrupted), so shutdown can say what it waits for
        self.running: str | None = None

    async def call(self, fn: Callable[..., T], *args: Any, timeout_s: float, what: str) -> T:
        def run() -> T:
            with self._thread_lock:
                self.running = what
                try:
                    return fn(*args)
                finally:
                    self.running = None

        start = time.perf_counter()
        async with self._lock:
            with trio.move_on_after(timeout_s) as scope:
                try:
                    result = await trio.to_thread.run_sync(run, abandon_on_cancel=True)
                except KnexaError:
                    raise
                except Exception as exc:  # noqa: BLE001 — boundary: an agent bug fails this call only
                    log.exception("agent.failed", call=what, error=type(exc).__name__)
                    raise AgentError(f"agent.{what} failed: {type(exc).__name__}: {exc}") from exc
        duration_ms = int((time.perf_counter() - start) * 1000)
        if scope.cancelled_caught:
            log.error("agent.timeout", call=what, duration_ms=duration_ms, limit_s=timeout_s)
            raise AgentTimeout(f"agent.{what} exceeded {timeout_s} s")
        log.debug("agent.call", call=what, duration_ms=duration_ms)
        return result
