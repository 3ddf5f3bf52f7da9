"""A round across the CPM's circuit relay with real processes (docs/networking.md).

The teacher advertises only its ``/p2p-circuit`` address (``network.advertise =
"relay-only"``, the testing aid that stands in for a NAT on loopback) and hole punching
is off (on loopback DCUtR would always succeed): the student must move the package over
the relay, the round must complete with feedback, and the path must be recorded.
"""

from __future__ import annotations

import signal
import urllib.request
from pathlib import Path

from tests.e2e.test_daemon_round import Federation, _stronger_index, free_port, read_ready, spawn, wait_for  # noqa: F401 — spawn is a fixture

NO_PUNCH = {"KNEXA_NETWORK_HOLEPUNCH": "false"}


def test_round_over_the_relay_records_the_path(tmp_path: Path, spawn) -> None:
    seed = 0
    fed = Federation(tmp_path, spawn, seed=seed)
    fed.init_cpm("--open", "--max-rounds", "1", "--strategy", "heuristic")
    fed.start_cpm()
    t_idx = _stronger_index(seed)
    s_idx = 1 - t_idx
    t_peer = fed.init_daemon(t_idx)[1]
    s_peer = fed.init_daemon(s_idx)[1]
    teacher = fed.start_daemon(t_idx, {**NO_PUNCH, "KNEXA_NETWORK_ADVERTISE": "relay-only"})
    metrics_port = free_port()
    student = fed.start_daemon(s_idx, {**NO_PUNCH, "KNEXA_METRICS_PORT": str(metrics_port)})
    everyone = (fed.cpm, teacher, student)
    for i in (t_idx, s_idx):
        wait_for(lambda i=i: read_ready(tmp_path / f"d{i}.ready"), 60, f"d{i} ready", everyone)

    rows = wait_for(lambda: [r for r in fed.pairs() if r["ok"] is not None], 120, "feedback at the CPM", everyone)
    assert len(rows) == 1 and rows[0]["ok"] is True
    assert (rows[0]["teacher"], rows[0]["student"]) == (t_peer, s_peer)

    received = student.events("exchange.package.received")
    assert [e["path"] for e in received] == ["relay"] and received[0]["wire_bytes"] > 0
    # the direct attempt was not even possible: the CPM handed out only the circuit address
    assert not student.events("p2p.dial.direct_failed")
    st = wait_for(lambda: (s := fed.status(s_idx))["learned"] == 1 and s, 20, "student status", everyone)
    assert st["paths"] == {"relay": 1} and st["last_path"] == "relay"
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    assert 'knexad_exchange_path_total{path="relay"} 1.0' in metrics
    assert 'knexad_reachability{state="public"}' in metrics and "knexad_relay_reserved 1.0" in metrics
    tst = fed.status(t_idx)
    assert tst["relay_reserved"] is True and tst["relay_reservations"] >= 1
    assert tst["advertised"] == [a for a in tst["advertised"] if "/p2p-circuit/p2p/" + t_peer in a] != []
    # reachability from the CPM's dial-back: the student's direct address answers, the
    # relay-only teacher offered none
    wait_for(lambda: fed.status(s_idx)["reachability"] == "public", 30, "student reachability", everyone)
    wait_for(lambda: fed.status(t_idx)["reachability"] == "private", 30, "teacher reachability", everyone)

    # the relay (the CPM) dies and comes back on its port: the teacher re-reserves on its
    # own and is again reachable through it (no operator)
    port = fed.cpm_addr.split("/tcp/")[1].split("/")[0]
    before = len(teacher.events("p2p.relay.reserved"))
    fed.cpm.signal(signal.SIGKILL)
    fed.cpm.wait(30)
    fed.start_cpm(listen=f"/ip4/127.0.0.1/tcp/{port}", name="cpm2")
    everyone = (fed.cpm, teacher, student)
    wait_for(lambda: len(teacher.events("p2p.relay.reserved")) > before, 90, "re-reservation", everyone)
    st = wait_for(lambda: (t := fed.status(t_idx))["relay_reserved"] and t, 30, "teacher reserved again", everyone)
    assert st["relay_reservations"] > tst["relay_reservations"]
