"""benchmarks/round.py: phases of a round read back from the processes' JSON logs.

A synthetic pair of rounds written in the exact line format the daemons and the CPM
produce (structlog JSON with an ISO ``timestamp``, plus the non-JSON lines real logs
hold), so the expected phase seconds are known exactly."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from benchmarks import round as bench

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


def _line(t: float, event: str, **kw) -> str:
    ts = (T0 + timedelta(seconds=t)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return json.dumps({**kw, "event": event, "level": "info", "timestamp": ts})


def _write(path: Path, header: str, lines: list[str]) -> None:
    path.write_text("\n".join([header, *lines, "Loading weights: 100%|████| 50/50"]) + "\n", encoding="utf-8")


@pytest.fixture()
def logs(tmp_path: Path) -> Path:
    d = tmp_path / "logs"
    d.mkdir()
    _write(d / "cpm.log", "# 12:00:00 $ knexa-cpm serve …", [
        _line(0.0, "cpm.round.opened", round=1),
        _line(30.0, "cpm.profile.accepted", peer="a", round=1),
        _line(41.0, "cpm.profile.accepted", peer="b", round=1),
        _line(41.5, "cpm.round.matched", round=1, pairs=1),
        _line(41.5, "cpm.directive.issued", round=1, directive="r1-x"),
        _line(70.0, "cpm.feedback.recorded", round=1, directive="r1-x"),
        _line(70.25, "cpm.round.closed", round=1),
        _line(70.25, "cpm.round.opened", round=2),
        _line(74.0, "cpm.profile.accepted", peer="b", round=2),
        _line(75.25, "cpm.profile.accepted", peer="a", round=2),
        _line(75.5, "cpm.round.matched", round=2, pairs=1),
        _line(75.5, "cpm.directive.issued", round=2, directive="r2-y"),
        # round 2's exchange failed: Feedback ok=false, no package, no learning
        _line(90.25, "cpm.feedback.recorded", round=2, directive="r2-y"),
        _line(90.25, "cpm.round.closed", round=2),
        _line(90.25, "cpm.round.opened", round=3),  # never closes: not a measured round
        _line(95.0, "cpm.profile.accepted", peer="a", round=3),
    ])
    _write(d / "node-00.log", "# 12:00:01 $ knexad run …", [
        _line(8.0, "daemon.ready", peer="a"),
        _line(25.0, "agent.local.done", steps=100, duration_ms=16000),
        _line(29.0, "agent.evaluate.done", duration_ms=4000),
        _line(45.0, "exchange.package.received", round=1, duration_ms=3500),
        _line(65.0, "agent.learn.done", round=1, duration_ms=20000),
        _line(65.0, "agent.learned", round=1),
        "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWxyz",
        "{not json",
    ])
    _write(d / "node-01.log", "# 12:00:01 $ knexad run …", [
        _line(10.0, "daemon.ready", peer="b"),
        _line(36.0, "agent.local.done", steps=100, duration_ms=26000),
        _line(40.0, "agent.evaluate.done", duration_ms=4000),
        _line(44.0, "agent.teach.done", round=1, duration_ms=1000),
    ])
    _write(d / "node-00-init.log", "# init", [_line(0.0, "cpm.round.opened", round=9)])
    return d


def test_phases_add_up_and_match_the_milestones(logs: Path) -> None:
    doc = bench.analyze(logs)
    rounds = doc["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]  # round 3 never closed; init logs ignored
    r1 = rounds[0]
    assert r1["phases"] == pytest.approx({"profile": 41.0, "match": 0.5, "exchange": 3.5, "learn": 20.0,
                                          "feedback": 5.25})
    assert r1["total_s"] == pytest.approx(70.25) == pytest.approx(sum(r1["phases"].values()))
    assert r1["pairs"] == 1 and r1["feedback"] == 1
    assert r1["work"]["learn"] == {"n": 1, "median_s": 20.0, "max_s": 20.0}
    assert r1["work"]["evaluate"]["n"] == 2


def test_missing_milestones_carry_forward(logs: Path) -> None:
    r2 = bench.analyze(logs)["rounds"][1]
    # no package, no learning: those phases are 0 and feedback spans from the match
    assert r2["phases"] == pytest.approx({"profile": 5.0, "match": 0.25, "exchange": 0.0, "learn": 0.0,
                                          "feedback": 14.75})
    assert r2["total_s"] == pytest.approx(20.0)


def test_metric_is_the_steady_rounds_and_warmup_is_apart(logs: Path) -> None:
    doc = bench.analyze(logs)
    m = doc["metric"]
    assert m["value"] == pytest.approx(20.0) and m["ratio"] == pytest.approx(20.0 / 60.0, abs=1e-3)
    w = doc["warmup"]
    assert w["all_ready_s"] == pytest.approx(10.0)
    assert w["local_done_s"] == pytest.approx(36.0)
    assert w["local_finetune"]["max_s"] == pytest.approx(26.0)
    text = bench.format_table(doc)
    assert "ratio 0.33 (meets)" in text and text.splitlines()[1].split()[0] == "1"


def test_only_round_one_reports_it_with_its_warmup(logs: Path) -> None:
    cpm = logs / "cpm.log"
    kept = [ln for ln in cpm.read_text().splitlines() if '"round": 1' in ln or not ln.startswith("{")]
    cpm.write_text("\n".join(kept) + "\n")
    m = bench.analyze(logs)["metric"]
    assert m["value"] == pytest.approx(70.25) and m["ratio"] > 1
    assert "round 1" in m["name"]


def test_empty_log_dir_has_no_metric(tmp_path: Path) -> None:
    doc = bench.analyze(tmp_path)
    assert doc["rounds"] == [] and doc["metric"]["value"] is None
    assert bench.main(["--from-logs", str(tmp_path), "--json"]) == 1
