"""``knexa-cpm report --out DIR``: the run's pictures from the CPM's own database.

What the operator of a real federation relies on: the command (a real subprocess) reads
the home's store — SQLite or PostgreSQL — and writes ``rounds.png``,
``pairs_heatmap.png`` and ``report.json``, whose numbers are what the database holds.
The expectations here are computed from the tables with plain SQL, not through the
``Store`` or ``cpm.report``, so a report that drops a round, mislabels a pair or sums
the wrong reward fails. The rounds are played by the real round engine on the home's
store (as tests/integration/test_cpm_watch.py does): four agents, two pairs a round,
one failed delivery, a last round matched but without feedback.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cpm.config import load_config
from cpm.rounds import RoundEngine
from cpm.store import open_home_store
from protocol.envelope import Identity
from protocol.messages import Feedback, Profile, Register
from tests.e2e.conftest import run_cli

T0 = 1_700_000_000_000
PASS1 = 8  # perf.pass@1: docs/protocol.md §Profile (written out: the test must not share the code's constant)

pytestmark = pytest.mark.timeout(240)


def _play(home: Path, rounds: int = 3) -> list[str]:
    """``rounds`` rounds with feedback (the second fails one delivery), then one more
    round matched and left without feedback; returns the agents' peer IDs."""
    cfg = load_config(home)
    store = open_home_store(home)
    try:
        now = T0
        engine = RoundEngine(store, cfg, Identity.generate())
        engine.start(now)
        agents = [Identity.generate().peer_id for _ in range(4)]
        for i, a in enumerate(agents):
            store.admit(a, f"org-{'abcd'[i]}", now)
            engine.register(a, Register(f"org-{'abcd'[i]}", "qwen2", (f"/ip4/127.0.0.1/tcp/{4000 + i}",), "t"), now)
        rng = np.random.default_rng(7)
        for r in range(1, rounds + 2):
            now += 1000
            assert engine.current_round() == r
            for a in agents:
                vec = rng.random(32)
                vec[20:32] /= vec[20:32].sum()
                engine.profile(a, Profile(r, tuple(float(v) for v in vec), cfg.transfer_hash), now)
            directives = store.directives_for_round(r)
            assert len(directives) == 2
            if r > rounds:
                break  # matched, no feedback
            for j, d in enumerate(directives):
                ok = not (r == 2 and j == 0)
                fb = Feedback(d.directive_id, r, d.teacher, d.student, 2.0, 2.0 - 0.1 * r * (j + 1), 8.0 + r, ok,
                              "" if ok else "timeout")
                engine.feedback(d.student, fb, now)
        return agents
    finally:
        store.close()


def _expected(rows: Callable[[str], list[tuple[Any, ...]]]) -> dict[str, Any]:
    """Per-round numbers and the pair counts, straight from the tables."""
    profiles = rows("SELECT round, vector FROM profiles")
    directives = rows("SELECT directive_id, round, teacher, student FROM directives")
    feedback = {d: (r, ok, raw) for d, r, ok, raw in rows("SELECT directive_id, round, ok, raw_reward FROM feedback")}
    out: dict[int, dict[str, Any]] = {}
    for rnd, vector in profiles:
        vec = json.loads(vector) if isinstance(vector, str) else vector
        out.setdefault(rnd, {"pass1": [], "pairs": 0, "feedback": 0, "failures": 0, "raw": 0.0})["pass1"].append(vec[PASS1])
    pairs: dict[tuple[str, str], int] = {}
    for did, rnd, teacher, student in directives:
        out[rnd]["pairs"] += 1
        pairs[(teacher, student)] = pairs.get((teacher, student), 0) + 1
        if did in feedback:
            _, ok, raw = feedback[did]
            out[rnd]["feedback"] += 1
            out[rnd]["failures"] += 0 if ok else 1
            out[rnd]["raw"] += raw or 0.0
    return {"rounds": out, "pairs": pairs}


def _check(home: Path, tmp_path: Path, rows: Callable[[str], list[tuple[Any, ...]]]) -> None:
    agents = _play(home)
    out = tmp_path / "report"
    done = run_cli(["knexa-cpm", "report", "--home", str(home), "--out", str(out)])
    assert done.returncode == 0, done.stderr
    for name in ("report.json", "rounds.png", "pairs_heatmap.png"):
        assert (out / name).is_file() and str(out / name) in done.stdout
    assert (out / "rounds.png").read_bytes()[:4] == (out / "pairs_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    doc = json.loads((out / "report.json").read_text())
    want = _expected(rows)
    assert [r["round"] for r in doc["rounds"]] == [1, 2, 3, 4]
    assert doc["rounds_completed"] == 3 and [r["state"] for r in doc["rounds"]][-1] == "matched"
    cumulative = 0.0
    for row in doc["rounds"]:
        exp = want["rounds"][row["round"]]
        cumulative += exp["raw"]
        assert row["mean_pass1"] == pytest.approx(sum(exp["pass1"]) / len(exp["pass1"]))
        assert row["agents_reporting"] == len(exp["pass1"]) == 4
        assert (row["pairs"], row["feedback"], row["failures"]) == (exp["pairs"], exp["feedback"], exp["failures"])
        if row["state"] == "closed":
            assert row["cumulative_reward"] == pytest.approx(cumulative)
    assert [r["failures"] for r in doc["rounds"]] == [0, 1, 0, 0]
    assert cumulative > 0 and doc["rounds"][2]["cumulative_reward"] == pytest.approx(cumulative)
    # the matched round is not done: its reward is not added up (nor drawn) yet
    assert doc["rounds"][-1]["feedback"] == 0 and doc["rounds"][-1]["cumulative_reward"] is None
    peers, counts = doc["pairs"]["peers"], doc["pairs"]["counts"]
    assert sorted(peers) == sorted(agents)
    assert doc["pairs"]["labels"] == ["org-a", "org-b", "org-c", "org-d"]  # one agent per org: the org names it
    got = {(peers[t], peers[s]): c for t, row in enumerate(counts) for s, c in enumerate(row) if c}
    assert got == want["pairs"] and sum(got.values()) == 8


def test_report_on_sqlite_matches_the_database(tmp_path: Path) -> None:
    home = tmp_path / "cpm"
    assert run_cli(["knexa-cpm", "init", "--home", str(home), "--strategy", "random"]).returncode == 0

    def rows(sql: str) -> list[tuple[Any, ...]]:
        with sqlite3.connect(f"file:{home / 'cpm.db'}?mode=ro", uri=True) as db:
            return db.execute(sql).fetchall()

    _check(home, tmp_path, rows)


def test_report_on_postgresql_matches_the_database(tmp_path: Path, pg_server: Any) -> None:
    url = pg_server.new_database("report")
    home = tmp_path / "cpm"
    init = run_cli(["knexa-cpm", "init", "--home", str(home), "--strategy", "random", "--store", url])
    assert init.returncode == 0, init.stderr
    _check(home, tmp_path, lambda sql: pg_server.sql(url, sql))
    assert not (home / "cpm.db").exists()


def test_report_without_a_database_says_what_to_do(tmp_path: Path) -> None:
    """Exit 3 (configuration, the exit-code table's "missing DB") with one line naming
    the store it looked for and the command that creates it; nothing written."""
    home, out = tmp_path / "not-a-home", tmp_path / "report"
    home.mkdir()
    done = run_cli(["knexa-cpm", "report", "--home", str(home), "--out", str(out)])
    assert done.returncode == 3
    assert done.stderr.strip().splitlines()[-1] == (
        f"knexa-cpm: error: store: no CPM database at sqlite:{home / 'cpm.db'} — is {home} a CPM home "
        f"(`knexa-cpm init --home {home}`)?")
    assert not out.exists() and not (home / "cpm.db").exists()
