"""knexad.evaluations: the daemon's local per-round record of held-out test pass@1, and
the harness reading it (harness.federation.held_out_pass1) instead of the CPM's
profiles, which carry validation numbers only."""

from __future__ import annotations

import json

from harness.federation import held_out_pass1
from knexad.evaluations import EVALUATIONS_FILE, KEPT, append_evaluation, read_evaluations


def test_append_keeps_only_the_named_metrics_and_the_last_line_per_round_wins(tmp_path) -> None:
    append_evaluation(tmp_path, 1, {"pass@1": 0.25, "val_pass@1": 0.5, "pass@1_cat3": 1.0}, now_ms=7)
    append_evaluation(tmp_path, 2, {"pass@1": 0.30}, now_ms=8)
    append_evaluation(tmp_path, 1, {"pass@1": 0.40}, now_ms=9)  # round 1 profiled again (restart)
    rows = [json.loads(line) for line in (tmp_path / EVALUATIONS_FILE).read_text().splitlines()]
    assert rows[0] == {"round": 1, "unix_ms": 7, "pass@1": 0.25, "val_pass@1": 0.5}
    assert set(rows[0]) - {"round", "unix_ms"} <= set(KEPT)
    assert read_evaluations(tmp_path) == {1: 0.40, 2: 0.30}
    assert read_evaluations(tmp_path, "val_pass@1") == {1: 0.5}


def test_missing_file_and_bad_lines(tmp_path) -> None:
    assert read_evaluations(tmp_path) == {}
    append_evaluation(tmp_path, 3, {"pass@1": 0.1})
    with open(tmp_path / EVALUATIONS_FILE, "a", encoding="utf-8") as fh:
        fh.write('{"round": 4, "pass@1": 0.9')  # torn by a crash mid-write
        fh.write("\n[1, 2]\n")
    assert read_evaluations(tmp_path) == {3: 0.1}


def test_harness_reads_test_pass1_per_round_and_peer_from_the_homes(tmp_path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    append_evaluation(a, 1, {"pass@1": 0.2})
    append_evaluation(a, 2, {"pass@1": 0.3})
    append_evaluation(b, 2, {"pass@1": 0.6})
    assert held_out_pass1({"PA": a, "PB": b, "PC": tmp_path / "never-ran"}) == {1: {"PA": 0.2}, 2: {"PA": 0.3, "PB": 0.6}}
    # the profile a daemon builds after the last round (round 3 here) is no round of the CPM's
    append_evaluation(a, 3, {"pass@1": 0.9})
    assert held_out_pass1({"PA": a, "PB": b}, rounds=[1, 2]) == {1: {"PA": 0.2}, 2: {"PA": 0.3, "PB": 0.6}}
