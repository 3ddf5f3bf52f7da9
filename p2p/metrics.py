"""Prometheus metrics derived from the canonical log events, shared by both binaries.

Why from log events: every thing an operator wants to count — a round matched, an
exchange finished, a request refused — already produces exactly one structlog line with
stable keys (``round``, ``bytes``, ``duration_ms``, ``error``/``code``). Counting those
lines in one processor gives metrics and logs that can never disagree, and needs one
hook per binary instead of counters threaded through every module. The mapping is the
table below (``KNEXAD_EVENTS``, ``CPM_EVENTS``); docs/operations.md lists the resulting
metric names, and ``tests/e2e/test_metrics_scrape.py`` scrapes a live node for them.

Limits (documented): the processor sees only events at or above the configured log
level (structlog's filtering logger drops the rest before processors run), so metrics
sourced from ``debug`` events stay empty at the default level; and a renamed log event
silently stops its metric — the e2e scrape test is the guard.

State-based gauges (current round, outbox size, bytes per peer) stay with their owners
(``cpm/service.py``, ``knexad/daemon.py``), which register collectors in the same
registry.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram

log = structlog.get_logger(__name__)

Value = Callable[[Mapping[str, Any]], float | None]

# Seconds buckets that cover a loopback request (ms) up to a model distillation (minutes).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
REWARD_BUCKETS = (-3, -2, -1, -0.5, -0.25, 0, 0.25, 0.5, 1, 2, 3)
LOSS_BUCKETS = (-1, -0.5, -0.1, -0.01, 0, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2)


def _key(name: str, scale: float = 1.0) -> Value:
    def get(event: Mapping[str, Any]) -> float | None:
        value = event.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        return float(value) * scale

    return get


def _one(_event: Mapping[str, Any]) -> float:
    return 1.0


def _loss_gain(event: Mapping[str, Any]) -> float | None:
    pre, post = event.get("loss_pre"), event.get("loss_post")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (pre, post)):
        return None
    return float(pre) - float(post)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class EventMetric:
    """One metric fed by one log event.

    ``labels`` map a Prometheus label to an event key (``"code": "error"``) or, prefixed
    with ``=``, to a constant (``"role": "=student"``).
    """

    event: str
    name: str  # without the binary prefix
    doc: str
    kind: str = "counter"  # counter (inc by value) | histogram (observe value)
    value: Value = _one
    labels: Mapping[str, str] | None = None
    buckets: Sequence[float] = DURATION_BUCKETS


_MS = _key("duration_ms", 1e-3)

KNEXAD_EVENTS: tuple[EventMetric, ...] = (
    EventMetric("cpm.profile.accepted", "profiles_sent_total", "profiles the CPM acknowledged"),
    EventMetric("cpm.directive.received", "directives_received_total", "directives received (teacher or student)"),
    EventMetric("cpm.directive.none", "rounds_unmatched_total", "rounds in which this agent got no pair"),
    EventMetric("cpm.feedback.acked", "feedback_acked_total", "feedback the CPM acknowledged", labels={"ok": "ok"}),
    EventMetric("cpm.unreachable", "cpm_unreachable_total", "failed CPM requests (then backoff)",
                labels={"code": "error"}),
    EventMetric("exchange.package.sent", "exchanges_total", "completed exchanges",
                labels={"role": "=teacher"}),
    EventMetric("exchange.package.received", "exchanges_total", "completed exchanges",
                labels={"role": "=student"}),
    EventMetric("exchange.package.sent", "exchange_duration_seconds", "exchange wall time",
                kind="histogram", value=_MS, labels={"role": "=teacher"}),
    EventMetric("exchange.package.received", "exchange_duration_seconds", "exchange wall time",
                kind="histogram", value=_MS, labels={"role": "=student"}),
    EventMetric("exchange.package.received", "exchange_path_total", "exchanges by connection path",
                labels={"path": "path"}),
    EventMetric("exchange.package.received", "exchange_path_wire_bytes_total", "wire bytes by connection path",
                value=_key("wire_bytes"), labels={"path": "path"}),
    EventMetric("exchange.package.received", "exchange_path_duration_seconds", "exchange wall time by path",
                kind="histogram", value=_MS, labels={"path": "path"}),
    EventMetric("exchange.package.sent", "exchange_payload_bytes_total", "package plaintext bytes",
                value=_key("bytes"), labels={"role": "=teacher"}),
    EventMetric("exchange.package.received", "exchange_payload_bytes_total", "package plaintext bytes",
                value=_key("bytes"), labels={"role": "=student"}),
    EventMetric("exchange.guardrail.dropped", "guardrail_dropped_total", "items the guardrail withheld",
                value=_key("dropped")),
    EventMetric("exchange.refused", "rejected_total", "exchange requests refused, by error code",
                labels={"code": "error"}),
    EventMetric("exchange.failed", "exchange_failures_total", "exchanges that failed, by error code",
                labels={"code": "error"}),
    EventMetric("agent.learned", "learn_loss_gain", "validation loss before minus after distillation",
                kind="histogram", value=_loss_gain, buckets=LOSS_BUCKETS),
    EventMetric("agent.learn.done", "agent_seconds", "time in agent calls (ML agents)",
                kind="histogram", value=_MS, labels={"call": "=learn"}),
    EventMetric("agent.local.done", "agent_seconds", "time in agent calls (ML agents)",
                kind="histogram", value=_MS, labels={"call": "=train"}),
    EventMetric("agent.evaluate.done", "agent_seconds", "time in agent calls (ML agents)",
                kind="histogram", value=_MS, labels={"call": "=evaluate"}),
    EventMetric("agent.call", "agent_call_seconds", "every agent call (logged at debug level only)",
                kind="histogram", value=_MS, labels={"call": "call"}),
    EventMetric("agent.timeout", "agent_timeouts_total", "agent calls past their deadline",
                labels={"call": "call"}),
)

CPM_EVENTS: tuple[EventMetric, ...] = (
    EventMetric("cpm.round.matched", "rounds_matched_total", "rounds matched"),
    EventMetric("cpm.round.closed", "rounds_closed_total", "rounds closed"),
    EventMetric("cpm.round.matched", "pairs_total", "pairs (directives) issued", value=_key("pairs")),
    EventMetric("cpm.agent.registered", "registrations_total", "Register requests accepted"),
    EventMetric("cpm.feedback.recorded", "feedback_recorded_total", "feedback recorded, by outcome",
                labels={"ok": "ok"}),
    EventMetric("cpm.feedback.recorded", "reward", "z-scored reward (Eq. 3) fed to the strategy",
                kind="histogram", value=_key("reward"), buckets=REWARD_BUCKETS),
    EventMetric("cpm.feedback.recorded", "raw_reward", "raw reward γ(L_pre − L_post) − δ·KB",
                kind="histogram", value=_key("raw_reward"), buckets=REWARD_BUCKETS),
    EventMetric("cpm.request", "request_duration_seconds", "CPM request handling time, by message type",
                kind="histogram", value=_MS, labels={"type": "type"}),
    EventMetric("cpm.peer.gone", "peer_gone_total", "streams whose peer vanished mid-request"),
)


def _label_value(event: Mapping[str, Any], source: str) -> str:
    if source.startswith("="):
        return source[1:]
    value = event.get(source, "")
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)[:64]


class EventMetrics:
    """A structlog processor that turns canonical log events into Prometheus metrics."""

    def __init__(self, registry: CollectorRegistry, prefix: str, table: Sequence[EventMetric]) -> None:
        self.registry = registry
        self.prefix = prefix
        self._by_event: dict[str, list[tuple[EventMetric, Any]]] = {}
        made: dict[str, Any] = {}
        for spec in table:
            name = f"{prefix}_{spec.name}"
            labels = tuple(sorted(spec.labels or {}))
            metric = made.get(name)
            if metric is None:
                if spec.kind == "histogram":
                    metric = Histogram(name, spec.doc, labels, registry=registry, buckets=tuple(spec.buckets))
                else:
                    # prometheus_client appends _total itself; strip it from the base name
                    base = name[: -len("_total")] if name.endswith("_total") else name
                    metric = Counter(base, spec.doc, labels, registry=registry)
                made[name] = metric
            self._by_event.setdefault(spec.event, []).append((spec, metric))
        self._lock = threading.Lock()
        self._installed = False

    @property
    def events(self) -> frozenset[str]:
        return frozenset(self._by_event)

    def __call__(self, _logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        """structlog processor: observe, then pass the event through unchanged."""
        specs = self._by_event.get(str(event_dict.get("event", "")))
        if specs:
            for spec, metric in specs:
                self._observe(spec, metric, event_dict)
        return event_dict

    def _observe(self, spec: EventMetric, metric: Any, event: Mapping[str, Any]) -> None:
        value = spec.value(event)
        if value is None:
            return  # the event lacks the key this metric needs: count nothing, never raise
        target = metric
        if spec.labels:
            target = metric.labels(**{label: _label_value(event, src) for label, src in spec.labels.items()})
        if spec.kind == "histogram":
            target.observe(value)
        elif value >= 0:
            target.inc(value)

    def install(self) -> None:
        """Put this processor first in the current structlog pipeline (idempotent)."""
        with self._lock:
            if self._installed:
                return
            processors = list(structlog.get_config()["processors"])
            processors.insert(0, self)
            structlog.configure(processors=processors)
            self._installed = True

    def uninstall(self) -> None:
        with self._lock:
            if not self._installed:
                return
            processors = [p for p in structlog.get_config()["processors"] if p is not self]
            structlog.configure(processors=processors)
            self._installed = False


TABLES: dict[str, tuple[EventMetric, ...]] = {"knexad": KNEXAD_EVENTS, "knexa_cpm": CPM_EVENTS}


def install_event_metrics(registry: CollectorRegistry, prefix: str) -> EventMetrics:
    """Register the event-derived metrics of one binary (``knexad`` or ``knexa_cpm``) in
    ``registry`` and start counting. The one hook each binary's metrics setup calls."""
    metrics = EventMetrics(registry, prefix, TABLES[prefix])
    metrics.install()
    return metrics


def metric_names(prefix: str) -> list[str]:
    """Exposed names of the event metrics of ``prefix`` (for docs and tests)."""
    out: list[str] = []
    for spec in TABLES[prefix]:
        name = f"{prefix}_{spec.name}"
        if name not in out:
            out.append(name)
    return out
