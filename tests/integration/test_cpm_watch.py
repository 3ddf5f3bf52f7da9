"""``knexa-cpm watch``: the live view reads what the node committed, round by round."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner
from rich.console import Console

from cpm.cli import cli
from cpm.watch import render, short, snapshot, watch
from tests.unit.test_poison_quarantine import _play
from tests.unit.test_rounds import T0, World


def _federation(tmp_path: Path) -> tuple[Path, World, str]:
    home = tmp_path / "cpm"
    assert CliRunner().invoke(cli, ["init", "--home", str(home), "--strategy", "random"]).exit_code == 0
    w = World(home, 2)
    bad = w.agents[0]
    _play(w, bad, until=lambda d: w.engine.reputation.is_quarantined(bad))
    return home, w, bad


def test_watch_shows_rounds_pairs_agents_and_quarantine(tmp_path: Path) -> None:
    home, w, bad = _federation(tmp_path)
    rounds_played = w.engine.current_round()
    w.store.close()
    out = CliRunner().invoke(cli, ["watch", "--home", str(home), "--count", "2", "--interval", "0.1"])
    assert out.exit_code == 0, out.output
    text = out.output
    assert f"round {rounds_played}" in text and "quarantined 1" in text
    assert "quarantined teachers" in text and short(bad) in text and "sign_test" in text
    assert text.count("rounds (latest 8)") == 2  # two refreshes


def test_agents_are_up_when_seen_recently(tmp_path: Path) -> None:
    home, w, _ = _federation(tmp_path)
    from cpm.admin import query_rows

    def fetch(what: str, round_: int):
        return query_rows(w.store, what, round_)

    snap = snapshot(fetch)
    last_seen = max(int(a["last_seen"]) for a in snap["agents"])
    console = Console(width=140, record=True)
    console.print(render(snap, last_seen + 1000))
    assert "agents up 2/2" in console.export_text()
    console = Console(width=140, record=True)
    console.print(render(snap, last_seen + 10 * 60_000))  # ten minutes of silence
    text = console.export_text()
    assert "agents up 0/2" in text and "│ down" in text
    frames = []
    assert watch(fetch, Console(record=True), interval_s=0.0, count=3, clock=lambda: T0 / 1000,
                 sleep=frames.append) == 3
    assert frames == [0.0, 0.0]  # waits between refreshes, not after the last
    tty = Console(force_terminal=True, width=140, record=True)  # refreshed in place
    assert watch(fetch, tty, interval_s=0.0, count=2, sleep=lambda _s: None) == 2
    assert "agents up" in tty.export_text()
    w.store.close()
