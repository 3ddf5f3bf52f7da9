"""cpm.storecopy (``knexa-cpm migrate``): a store the real engine filled — agents in every
admission state, rounds in every state, directives, feedback, the bandit and
reputation state — copied SQLite → PostgreSQL (and SQLite → SQLite) and read back
equal; a copy that would differ writes nothing; a non-empty destination is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from cpm.cli import cli
from cpm.storecopy import CopyMismatch, copy_store
from cpm.store import StoreError, open_store
from protocol.envelope import Identity
from tests.unit.test_rounds import World


def _filled(tmp_path: Path) -> str:
    """Two rounds closed with feedback, a third matched and waiting, one revoked agent,
    one admitted but never registered, one preemptively banned."""
    w = World(tmp_path, 4, strategy="linucb")
    for round_ in (1, 2, 3):
        for i, a in enumerate(w.agents):
            w.now += 10
            w.profile(a, round_, seed=i + 10 * round_)
        if round_ < 3:
            for d in w.store.directives_for_round(round_):
                w.now += 10
                w.feedback(d, post=1.2)
    w.store.revoke(w.agents[0], w.now)
    w.store.touch(w.agents[1], w.now + 5000)  # seen after its last profile (a DirectiveRequest)
    w.store.admit(Identity.generate().peer_id, "later", w.now)
    w.store.revoke(Identity.generate().peer_id, w.now)
    assert w.store.latest_round().state == "matched" and len(w.store.list_feedback()) == 4
    w.store.close()
    return f"sqlite:{w.path}"


def _same(a: str, b: str) -> None:
    sa, sb = open_store(a, readonly=True), open_store(b, readonly=True)
    try:
        assert sa.counts() == sb.counts()
        assert sa.list_agents() == sb.list_agents()
        assert sa.list_profiles() == sb.list_profiles()
        assert sa.list_rounds() == sb.list_rounds()
        assert sa.list_directives() == sb.list_directives()
        assert sa.list_feedback() == sb.list_feedback()
        assert sa.load_bandit_state() == sb.load_bandit_state()
    finally:
        sa.close()
        sb.close()


def test_sqlite_to_postgresql_copies_everything_and_the_cli_says_so(tmp_path: Path, pg_url: str) -> None:
    source = _filled(tmp_path)
    res = CliRunner().invoke(cli, ["migrate", "--from", source, "--to", pg_url])
    assert res.exit_code == 0, res.output
    assert "agents=6" in res.output and "feedback=4" in res.output and "verified" in res.output
    _same(source, pg_url)
    again = CliRunner().invoke(cli, ["migrate", "--from", source, "--to", pg_url])
    assert again.exit_code == 3 and "not empty" in again.output  # never into a used store


def test_sqlite_to_sqlite(tmp_path: Path) -> None:
    source = _filled(tmp_path)
    report = copy_store(source, f"sqlite:{tmp_path / 'copy.db'}", now_ms=1)
    assert report.counts["directives"] == 6 and report.bandit_state
    _same(source, f"sqlite:{tmp_path / 'copy.db'}")


def test_a_copy_that_differs_writes_nothing(tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from cpm.store_postgres import PostgresStore

    source = _filled(tmp_path)
    monkeypatch.setattr(PostgresStore, "set_round_closed", lambda self, round_, now_ms: None)  # a lost write
    with pytest.raises(CopyMismatch, match="differ"):
        copy_store(source, pg_url, now_ms=1)
    monkeypatch.undo()
    dst = open_store(pg_url, readonly=True)
    try:
        assert not any(dst.counts().values())  # rolled back: the next try starts from empty
    finally:
        dst.close()
    copy_store(source, pg_url, now_ms=1)
    _same(source, pg_url)


def test_a_missing_source_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        copy_store(f"sqlite:{tmp_path / 'none.db'}", f"sqlite:{tmp_path / 'dst.db'}", now_ms=1)
