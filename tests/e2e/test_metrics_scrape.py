"""Prometheus scrape of live nodes: a real CPM and two real daemons complete a round,
then `/metrics` on each (urllib, 127.0.0.1) shows what happened — and every KNEXA metric
name a node exposes is documented in docs/operations.md.

Also checks the canonical log lines an operator alerts on: one `cpm.round.matched` and
one `cpm.round.closed` per round at the CPM, one `exchange.package.sent` (teacher) and
one `exchange.package.received` (student) per exchange, with the stable keys.
"""

from __future__ import annotations

import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from p2p.logs import log_events
from tests.e2e.conftest import ManagedProcess, ProcessManager, cpm_init, e2e_env, run_cli, start_cpm

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parents[2]
FAST_ENV = {
    "KNEXA_RETRY_BASE_S": "0.2",
    "KNEXA_RETRY_MAX_S": "1.0",
    "KNEXA_TIMEOUTS_DIAL_S": "4",
    "KNEXA_TIMEOUTS_REQUEST_S": "5",
    "KNEXA_TIMEOUTS_LONG_POLL_S": "5",
    "KNEXA_TIMEOUTS_EXCHANGE_STEP_S": "5",
}
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    """``name{labels}`` → value, from the Prometheus text format."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m and not line.startswith("#"):
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def families(sample: dict[str, float], prefix: str) -> set[str]:
    names = {key.split("{", 1)[0] for key in sample if key.startswith(prefix)}
    # prometheus_client adds _created (a timestamp) to counters and histograms, and
    # _bucket/_count/_sum to histograms; the documented name is the family's
    return {re.sub(r"_(bucket|count|sum)$", "", n) for n in names if not n.endswith("_created")}


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, procs: list[ManagedProcess]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (urllib.error.URLError, OSError):
            value = None
        if value:
            return value
        time.sleep(0.2)
    tails = "\n".join(f"--- {p.name} ---\n{p.stderr()[-3000:]}" for p in procs)
    pytest.fail(f"timed out waiting for {what}\n{tails}")


def events(proc: ManagedProcess, name: str) -> list[dict[str, Any]]:
    return log_events(proc.stderr(), name)


def synthetic_transfer_hash() -> str:
    from knexad.agents import build_agent
    from knexad.config import AgentSection, DaemonConfig
    from protocol.envelope import Identity

    cfg = DaemonConfig(cpm=f"/ip4/127.0.0.1/tcp/1/p2p/{Identity.generate().peer_id}",
                       agent=AgentSection(n_agents=2, seed=0))
    return build_agent(cfg).transfer_set_hash()


def test_round_shows_up_in_metrics_and_logs(tmp_path: Path, procs: ProcessManager) -> None:
    cpm_home = tmp_path / "cpm"
    cpm_init(cpm_home, "--transfer-hash", synthetic_transfer_hash(), "--max-rounds", "1", "--round-timer", "30")
    cpm_metrics = free_port()
    cpm = start_cpm(procs, cpm_home, "--metrics-port", str(cpm_metrics))
    assert cpm.ready is not None and cpm.ready["metrics_port"] == cpm_metrics
    cpm_addr = cpm.ready["addrs"][0]

    ports, daemons = [], []
    for i in range(2):
        home = tmp_path / f"d{i}"
        res = run_cli(["knexad", "init", "--home", str(home), "--cpm", cpm_addr, "--agent-index", str(i),
                       "--n-agents", "2", "--org", f"org{i}"])
        assert res.returncode == 0, res.stderr
        peer = run_cli(["knexad", "peer-id", "--home", str(home)]).stdout.strip()
        assert run_cli(["knexa-cpm", "admit", peer, "--org", f"org{i}", "--home", str(cpm_home)]).returncode == 0
        ports.append(free_port())
        env = e2e_env(**FAST_ENV, KNEXA_METRICS_PORT=str(ports[-1]))
        daemons.append(procs.start(["knexad", "run", "--home", str(home), "--ready-file", str(tmp_path / f"d{i}.ready"),
                                    "--log-format", "json"], name=f"d{i}", ready_file=tmp_path / f"d{i}.ready",
                                   env=env))
    everyone = [cpm, *daemons]
    for d in daemons:
        d.wait_ready(60)

    cpm_sample = wait_for(lambda: (s := scrape(cpm_metrics)).get('knexa_cpm_feedback_recorded_total{ok="true"}')
                          and s, 120, "feedback counted at the CPM", everyone)
    cpm_sample = wait_for(lambda: (s := scrape(cpm_metrics)).get("knexa_cpm_rounds_closed_total") and s,
                          30, "round closed", everyone)
    assert cpm_sample["knexa_cpm_rounds_matched_total"] == 1
    assert cpm_sample["knexa_cpm_pairs_total"] == 1
    assert cpm_sample['knexa_cpm_directives_total{state="issued"}'] == 1
    assert cpm_sample['knexa_cpm_directives_total{state="used"}'] == 1
    assert cpm_sample["knexa_cpm_reward_count"] == 1
    assert cpm_sample["knexa_cpm_registrations_total"] >= 2
    assert cpm_sample['knexa_cpm_request_duration_seconds_count{type="Feedback"}'] >= 1

    samples = [wait_for(lambda p=p: (s := scrape(p)).get("knexad_feedback_acked_total{ok=\"true\"}", 1)
                        and s, 30, "daemon metrics", everyone) for p in ports]
    by_role = {role: [s for s in samples if s.get(f'knexad_exchanges_total{{role="{role}"}}') == 1]
               for role in ("teacher", "student")}
    assert len(by_role["teacher"]) == 1 and len(by_role["student"]) == 1, samples
    student, teacher = by_role["student"][0], by_role["teacher"][0]
    assert student['knexad_exchange_duration_seconds_count{role="student"}'] == 1
    assert student['knexad_feedback_acked_total{ok="true"}'] == 1
    assert student['knexad_exchange_payload_bytes_total{role="student"}'] > 1000
    assert teacher['knexad_exchange_payload_bytes_total{role="teacher"}'] == \
        student['knexad_exchange_payload_bytes_total{role="student"}']
    assert any(k.startswith("knexad_exchange_bytes{") and v > 1000 for k, v in student.items())
    for s in samples:
        assert s["knexad_profiles_sent_total"] >= 1 and s["knexad_directives_received_total"] == 1

    # every exposed KNEXA metric family is documented for operators
    ops = (REPO / "docs" / "operations.md").read_text()
    exposed = families(cpm_sample, "knexa_cpm_") | set().union(*(families(s, "knexad_") for s in samples))
    undocumented = sorted(n for n in exposed if f"`{n}`" not in ops)
    assert not undocumented, f"metrics missing from docs/operations.md: {undocumented}"

    # canonical log lines with their stable keys
    matched, closed = events(cpm, "cpm.round.matched"), events(cpm, "cpm.round.closed")
    assert [e["round"] for e in matched] == [1] and [e["round"] for e in closed] == [1]
    assert matched[0]["pairs"] == 1
    sent = [e for d in daemons for e in events(d, "exchange.package.sent")]
    received = [e for d in daemons for e in events(d, "exchange.package.received")]
    assert len(sent) == 1 and len(received) == 1
    for e in (sent[0], received[0]):
        assert {"peer", "round", "directive", "bytes", "duration_ms"} <= set(e)
    assert sent[0]["directive"] == received[0]["directive"] and sent[0]["bytes"] == received[0]["bytes"]


def test_event_metrics_count_and_never_break_logging() -> None:
    """(In-process companion of the scrape test.) A log event with missing or odd keys
    counts nothing and never raises: logging must not fail because of metrics."""
    import io

    import structlog
    from prometheus_client import CollectorRegistry, generate_latest

    from p2p.logs import configure_logging
    from p2p.metrics import install_event_metrics

    out = io.StringIO()
    configure_logging("json", stream=out)
    registry = CollectorRegistry()
    metrics = install_event_metrics(registry, "knexad")
    try:
        log = structlog.get_logger("t")
        log.info("exchange.package.received", peer="p", bytes=2048, duration_ms=250)
        log.info("exchange.package.received", peer="p", bytes="lots")  # no duration, bad bytes
        log.warning("exchange.refused", peer="p", error="replay")
        log.info("agent.learned", loss_pre=None, loss_post=1.0)
    finally:
        metrics.uninstall()
    log.info("exchange.package.received", peer="p", bytes=1, duration_ms=1)  # after uninstall: not counted
    text = generate_latest(registry).decode()
    assert 'knexad_exchanges_total{role="student"} 3.0' not in text
    assert 'knexad_exchanges_total{role="student"} 2.0' in text
    assert 'knexad_exchange_duration_seconds_count{role="student"} 1.0' in text
    assert 'knexad_exchange_payload_bytes_total{role="student"} 2048.0' in text
    assert 'knexad_rejected_total{code="replay"} 1.0' in text
    assert "knexad_learn_loss_gain_count 0.0" in text
    assert len([line for line in out.getvalue().splitlines() if line.startswith("{")]) == 5
