"""A CPM home on PostgreSQL, end to end: ``knexa-cpm init --store postgresql://…``, a real
``knexa-cpm serve`` process on the session's throwaway server (tests/pg.py), two real
daemons running one round, the admin CLI and the doctor reading the same database from
other processes, and a ``kill -9`` of the node that loses nothing it acknowledged.

What an operator relies on when they move the CPM's state to their database server:
the home names the store once (config ``store``), every command finds it there, no
SQLite file appears in the home, and a round completes exactly as on SQLite.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from cpm.store import open_store
from tests.e2e.procs import CPM
from tests.e2e.test_daemon_round import Federation, run_cli, spawn, wait_for  # noqa: F401 — spawn is a fixture
from protocol.envelope import Identity
from tests.pg import PgTestServer

pytestmark = pytest.mark.timeout(240)


def test_init_serve_a_round_admin_doctor_and_kill9_on_postgresql(tmp_path: Path, spawn,  # noqa: F811
                                                                 pg_server: PgTestServer) -> None:
    url = pg_server.new_database("e2e")
    fed = Federation(tmp_path, spawn)
    fed.init_cpm("--open", "--max-rounds", "1", "--store", url)
    assert f'store = "{url}"' in (fed.cpm_home / "config.toml").read_text()
    with _ReadOnly(url) as db:  # init created the tables, nothing else
        assert db.schema_version() >= 1 and db.counts()["agents"] == 0
    fed.start_cpm()
    peers = [fed.init_daemon(i)[1] for i in range(2)]
    daemons = [fed.start_daemon(i) for i in range(2)]
    everyone = (fed.cpm, *daemons)
    assert any(e.get("location", "").startswith("postgresql://") for e in fed.cpm.events("cpm.store.opened"))

    rows = wait_for(lambda: [r for r in fed.pairs() if r["ok"] is not None], 120, "feedback at the CPM", everyone)
    assert len(rows) == 1 and rows[0]["ok"] is True and rows[0]["state"] == "used"
    assert {rows[0]["teacher"], rows[0]["student"]} == set(peers)

    # another process (the admin CLI) writes while the node runs; the node's database is the one it sees
    revoked = run_cli([*CPM, "revoke", peers[0], "--home", str(fed.cpm_home)])
    assert revoked.returncode == 0, revoked.stderr
    agents = json.loads(run_cli([*CPM, "agents", "--home", str(fed.cpm_home), "--json"]).stdout)
    assert {a["peer_id"]: a["revoked"] for a in agents} == {peers[0]: True, peers[1]: False}
    doctor = run_cli([*CPM, "doctor", "--home", str(fed.cpm_home)])
    line = next(ln for ln in doctor.stdout.splitlines() if " database " in f" {ln} ")
    assert "PostgreSQL 15" in line and "synchronous_commit=on" in line and line.split()[0] == "ok", doctor.stdout
    assert not (fed.cpm_home / "cpm.db").exists()  # nothing went to a SQLite file

    # kill -9: everything acknowledged is in the database; a restart serves from it
    assert fed.cpm.kill9() == -signal.SIGKILL
    for d in daemons:
        d.kill9()
    with _ReadOnly(url) as db:
        assert [f.directive_id for f in db.list_feedback(1)] == [rows[0]["directive_id"]]
        assert db.get_round(1).state == "closed" and db.is_revoked(peers[0])
    fed.start_cpm(name="cpm2")
    assert json.loads(run_cli([*CPM, "stats", "--home", str(fed.cpm_home), "--json"]).stdout)["feedback"] == 1


class _ReadOnly:
    """``open_store(url, readonly=True)`` as a context manager (an observer's view)."""

    def __init__(self, url: str) -> None:
        self.store = open_store(url, readonly=True)

    def __enter__(self):
        return self.store

    def __exit__(self, *exc: object) -> None:
        self.store.close()


def test_store_option_errors_and_a_relative_sqlite_store(tmp_path: Path, pg_server: PgTestServer) -> None:
    """Each mistake with ``--store`` exits with the documented code before the home
    names the store (so fixing it needs no ``--force``); a relative ``sqlite:`` path is
    the home's."""
    from click.testing import CliRunner

    from cpm.cli import cli
    from cpm.doctor import doctor_command
    from tests.e2e.test_daemon_round import free_port

    runner = CliRunner()
    home = tmp_path / "cpm"

    def init(store: str):
        return runner.invoke(cli, ["init", "--home", str(home), "--store", store])

    res = init("postgresql://postgres:secret@127.0.0.1/knexa")
    assert res.exit_code == 3 and "password" in res.output and "secret" not in res.output
    res = init("mongodb://127.0.0.1/knexa")
    assert res.exit_code == 3 and "unknown store backend" in res.output
    res = init(pg_server.url("no_such_db"))
    assert res.exit_code == 3 and "createdb" in res.output
    down = f"postgresql://postgres@127.0.0.1:{free_port()}/knexa"
    res = init(down)
    assert res.exit_code == 1 and not (home / "config.toml").exists()  # unreachable now: retry later
    res = init("sqlite:node.db")
    assert res.exit_code == 0, res.output
    assert (home / "node.db").exists() and not (home / "cpm.db").exists()
    assert runner.invoke(cli, ["admit", Identity.generate().peer_id, "--home", str(home)]).exit_code == 0
    assert json.loads(runner.invoke(cli, ["stats", "--home", str(home), "--json"]).output)["admitted"] == 1
    cfg = (home / "config.toml").read_text()
    (home / "config.toml").write_text(cfg.replace('store = "sqlite:node.db"', f'store = "{down}"'))
    res = runner.invoke(doctor_command, ["--home", str(home)])
    line = next(ln for ln in res.output.splitlines() if " database " in f" {ln} ")
    assert res.exit_code == 1 and line.split()[0] == "FAIL" and "start the database server" in res.output
