"""harness.paths: the per-exchange path table built from the students' exchanges.jsonl
(knexad.exchanges), joined with the CPM's directives, and its one-line summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from harness import results as R
from harness.paths import collect_exchanges, path_section, summarize_paths, summary_line
from knexad.exchanges import EXCHANGES_FILE, append_exchange, read_exchanges


def _homes(tmp_path: Path) -> dict[str, Path]:
    """Student B fetched d1 (relay) and d3 (holepunch); student A fetched d5 directly.
    B's file also has a torn line and d1 twice (re-fetched after a crash: last wins)."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    append_exchange(b, directive="d1", round_=1, teacher="peerA", student="peerB", path="relay",
                    wire_bytes=999, seconds=9.0, now_ms=1)
    with open(b / EXCHANGES_FILE, "a", encoding="utf-8") as fh:
        fh.write('{"directive": "dx", "round": \n')  # torn write
    append_exchange(b, directive="d1", round_=1, teacher="peerA", student="peerB", path="relay",
                    wire_bytes=4_000_000, seconds=2.0, dial_seconds=1.5, now_ms=2)
    append_exchange(b, directive="d3", round_=2, teacher="peerA", student="peerB", path="holepunch",
                    wire_bytes=1_000_000, seconds=0.5, now_ms=3)
    append_exchange(a, directive="d5", round_=2, teacher="peerB", student="peerA", path="direct",
                    wire_bytes=2_000_000, seconds=0.25, now_ms=4)
    # the teachers' own lines: A served d1 and d3, B served d5 (not a fourth exchange)
    for home, did, path in ((a, "d1", "relay"), (a, "d3", "holepunch"), (b, "d5", "direct")):
        append_exchange(home, directive=did, round_=1, teacher="t", student="s", path=path, wire_bytes=1,
                        seconds=1.0, side="teacher")
    return {"peerA": a, "peerB": b}


def _pairs() -> list[R.PairRecord]:
    return [
        R.PairRecord(1, "peerA", "peerB", directive_id="d1", ok=True, kb=10.0),
        R.PairRecord(1, "peerC", "peerD", directive_id="d2", ok=False),  # failed: not expected in the table
        R.PairRecord(2, "peerA", "peerB", directive_id="d3", ok=True, kb=5.0),
        R.PairRecord(2, "peerB", "peerA", directive_id="d5", ok=True, kb=5.0),
        R.PairRecord(2, "peerD", "peerC", directive_id="d4", ok=True, kb=5.0),  # ok but never recorded
    ]


def test_read_exchanges_skips_torn_lines_and_keeps_the_last_record_of_a_directive(tmp_path: Path) -> None:
    recs = read_exchanges(_homes(tmp_path)["peerB"])
    assert [(r["directive"], r["path"], r["wire_bytes"]) for r in recs] == [("d1", "relay", 4_000_000),
                                                                           ("d3", "holepunch", 1_000_000)]
    assert read_exchanges(tmp_path / "nowhere") == []


def test_table_has_one_row_per_exchange_with_path_bytes_and_seconds(tmp_path: Path) -> None:
    rows = collect_exchanges(_homes(tmp_path), {"peerA": "node-00", "peerB": "node-01"})
    assert [(r["round"], r["teacher_name"], r["student_name"], r["path"], r["wire_bytes"], r["seconds"])
            for r in rows] == [(1, "node-00", "node-01", "relay", 4_000_000, 2.0),
                               (2, "node-01", "node-00", "direct", 2_000_000, 0.25),
                               (2, "node-00", "node-01", "holepunch", 1_000_000, 0.5)]
    assert [r["teacher_path"] for r in rows] == [r["path"] for r in rows]  # both sides saw the same path


def test_a_teacher_record_is_kept_apart_and_a_foreign_side_is_skipped(tmp_path: Path) -> None:
    home = _homes(tmp_path)["peerA"]
    assert [r["directive"] for r in read_exchanges(home, side="teacher")] == ["d1", "d3"]
    with open(home / EXCHANGES_FILE, "a", encoding="utf-8") as fh:
        fh.write('{"side": "relay", "directive": "dz", "round": 1, "teacher": "t", "student": "s", "path": "relay",'
                 ' "wire_bytes": 1, "seconds": 1.0}\n')
    assert [r["directive"] for r in read_exchanges(home)] == ["d5"]
    assert [r["directive"] for r in read_exchanges(home, side="teacher")] == ["d1", "d3"]
    with pytest.raises(ValueError):
        append_exchange(home, directive="d9", round_=1, teacher="t", student="s", path="direct", wire_bytes=1,
                        seconds=1.0, side="cpm")


def test_summary_counts_shares_bytes_seconds_and_throughput_per_path(tmp_path: Path) -> None:
    s = summarize_paths(collect_exchanges(_homes(tmp_path)), _pairs())
    assert s["exchanges"] == 3 and s["unrecorded"] == 1  # d4: ok feedback, no student record
    relay, punch, direct = s["by_path"]["relay"], s["by_path"]["holepunch"], s["by_path"]["direct"]
    assert (relay["count"], relay["bytes"], relay["seconds"]) == (1, 4_000_000, 2.0)
    assert relay["share"] == pytest.approx(1 / 3) and direct["share"] == pytest.approx(1 / 3)
    assert relay["mbit_s"] == pytest.approx(16.0)  # 4 MB · 8 / 2 s
    assert relay["dial_seconds"] == 1.5 and relay["transfer_mbit_s"] == pytest.approx(64.0)  # 4 MB · 8 / 0.5 s
    assert direct["transfer_mbit_s"] == pytest.approx(64.0)  # no dial recorded: all of it is transfer
    assert punch["mbit_s"] == pytest.approx(16.0) and direct["mbit_s"] == pytest.approx(64.0)
    empty = summarize_paths([], [])
    assert empty["by_path"]["relay"] == {"count": 0, "share": 0.0, "bytes": 0, "seconds": 0.0, "dial_seconds": 0.0,
                                         "mbit_s": None, "transfer_mbit_s": None}


def test_section_is_json_and_the_summary_line_names_every_path(tmp_path: Path) -> None:
    section = path_section(_homes(tmp_path), _pairs(), {"peerA": "node-00"})
    assert json.loads(json.dumps(section, allow_nan=False)) == section
    line = summary_line(section)
    assert line.startswith("paths of 3 exchanges: ")
    assert "direct 1 (33%, 64.00 Mbit/s with dial" in line
    assert "relay 1 (33%, 16.00 Mbit/s with dial, 64.00 Mbit/s open stream)" in line
    assert "1 unrecorded" in line
    console = Console(record=True, width=200)
    doc = {"rounds_completed": 0, "rounds": [], "agents": [], "config": {"out": str(tmp_path)}, "paths": section,
           "summary": {"initial_pass1": None, "final_pass1": None, "gain": None, "cumulative_reward": 0.0, "pairs": 0}}
    R.print_run_summary(console, "ok", "", doc)
    assert line in console.export_text()


class _ClosingStore:
    """A CPM store whose round 1 closes — its second feedback arrives, then the round is
    marked closed — right after the first read of the feedback table: the race the
    harness's progress poll runs against a live CPM."""

    def __init__(self) -> None:
        from types import SimpleNamespace as NS

        self.ns = NS
        self.directives = [NS(round=1, teacher="A", student="B", arm=0, directive_id="d1"),
                           NS(round=1, teacher="C", student="D", arm=0, directive_id="d2")]
        self.feedback = [NS(directive_id="d1", ok=True, raw_reward=0.1, reward=0.0, kb=1.0)]
        self.state = "open"

    def list_feedback(self) -> list:
        out = list(self.feedback)
        if self.state == "open":  # the round closes between this read and the next ones
            self.feedback.append(self.ns(directive_id="d2", ok=True, raw_reward=0.2, reward=0.0, kb=1.0))
            self.state = "closed"
        return out

    def list_directives(self) -> list:
        return list(self.directives)

    def list_profiles(self) -> list:
        return []

    def list_rounds(self) -> list:
        return [self.ns(round=1, state=self.state)]

    def list_agents(self) -> list:
        return []

    def latest_round(self):
        return self.ns(round=1, state=self.state)


def test_a_round_is_reported_only_with_all_the_feedback_it_closed_with() -> None:
    from harness.federation import snapshot

    store = _ClosingStore()
    reported = [row for _ in range(2) for row in snapshot(store)["closed_rows"]]
    assert reported, "the closed round is reported by the second poll"
    assert all((row["pairs"], row["feedback"]) == (2, 2) for row in reported), reported
