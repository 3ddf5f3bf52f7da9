"""Operators list and release quarantined teachers: ``AdminQuery{quarantine}`` and
``AdminRelease`` on a real CPM host (py-libp2p, Noise + yamux), the teacher quarantined
through real Feedback over ``/knexa/cpm/1.0.0``; ``knexa-cpm quarantine|release`` as a
real process against it, and locally (``--offline``) through CliRunner."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner
from structlog.testing import capture_logs

from cpm.cli import cli
from cpm.store import open_store
from protocol.envelope import Identity, now_ms
from protocol.errors import MalformedFrame, NotQuarantined, Unauthorized
from protocol.ids import ADMIN_PROTOCOL
from protocol.messages import (
    Ack,
    AdminQuery,
    AdminRelease,
    AdminResult,
    Directive,
    DirectiveRequest,
    Feedback,
    Registered,
)
from tests.e2e.conftest import bin_path, e2e_env
from tests.integration.test_cpm_service import _profile, _register, ask, client, running_cpm
from tests.unit.test_poison_quarantine import _play
from tests.unit.test_rounds import World

pytestmark = pytest.mark.timeout(180)


async def _play_rounds(svc, info, agents, bad: str, until) -> Directive:
    """Rounds over the CPM protocol with two agents: both send profiles (the second
    reaches quorum), both long-poll the directive, the student reports Feedback — loss
    up when ``bad`` taught it, down otherwise. Stops after the round where
    ``until(directive)`` holds."""
    for _ in range(60):
        round_ = svc.engine.current_round()
        for ident, host in agents.values():
            assert isinstance(await ask(host, info, ident, _profile(svc, round_, fill=0.1)), Ack)
        d = None
        for ident, host in agents.values():
            d = await ask(host, info, ident, DirectiveRequest(round=round_, wait_ms=5000))
            assert isinstance(d, Directive)
        ident, host = agents[d.student]
        post = 1.5 if d.teacher == bad else 0.5
        fb = Feedback(d.directive_id, d.round, d.teacher, d.student, 1.0, post, 10.0, True, "")
        assert isinstance(await ask(host, info, ident, fb), Ack)
        if until(d):
            return d
    raise AssertionError("the condition never held")


def _rows(result) -> list[dict]:
    assert isinstance(result, AdminResult)
    return [dict(row) for row in result.rows]


async def _cli(*args: str) -> trio.Process:
    with trio.fail_after(90):
        return await trio.run_process([bin_path("knexa-cpm"), *args], capture_stdout=True, capture_stderr=True,
                                      check=False, env=e2e_env())


async def test_operator_lists_and_releases_a_quarantined_teacher(tmp_path: Path) -> None:
    a, b, outsider = (Identity.generate() for _ in range(3))
    bad, good = a.peer_id, b.peer_id
    # the operator's key, made the documented way (docs/operations.md §11)
    key = tmp_path / "admin.key"
    made = CliRunner().invoke(cli, ["admin-key", "--out", str(key)])
    assert made.exit_code == 0, made.output
    admin = Identity(key.read_bytes())
    assert made.output.strip() == admin.peer_id and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert CliRunner().invoke(cli, ["admin-key", "--out", str(key)]).exit_code == 3  # never overwritten
    assert key.read_bytes() == admin.seed
    # ~20 rounds × 5 requests per agent in a few seconds: over the 10/s (burst 50) per-peer
    # limit, which is not under test here
    async with running_cpm(tmp_path, admins=[admin.peer_id], rate_limit_per_s=0.0) as (svc, info), \
            client(a) as ha, client(b) as hb, client(admin) as hadm, client(outsider) as hout:
        for i, (ident, host) in enumerate(((a, ha), (b, hb))):
            svc.store.admit(ident.peer_id, f"org-{i}", now_ms())
            assert isinstance(await ask(host, info, ident, _register(i)), Registered)
        agents = {a.peer_id: (a, ha), b.peer_id: (b, hb)}
        assert _rows(await ask(hadm, info, admin, AdminQuery("quarantine", -1), protocol=ADMIN_PROTOCOL)) == []

        await _play_rounds(svc, info, agents, bad, until=lambda d: svc.engine.reputation.is_quarantined(bad))
        (row,) = _rows(await ask(hadm, info, admin, AdminQuery("quarantine", -1), protocol=ADMIN_PROTOCOL))
        assert row["teacher"] == bad and row["org"] == "org-0" and row["reason"] == "sign_test"
        assert row["deliveries"] == row["harmful"] == row["harmful_run"] == 8  # B = 8 (docs/threat-model.md T19)
        assert row["mean_gain"] == pytest.approx(-0.5) and row["p_value"] == pytest.approx(2.0**-8)
        assert row["quarantined_round"] >= 8 and row["released_at"] is None
        # the CLI, as a separate process over the admin protocol, shows the same row
        res = await _cli("quarantine", "--json", "--home", str(tmp_path / "h"), "--remote", svc.addrs[0],
                         "--key", str(key))
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout) == [row]

        with pytest.raises(Unauthorized):  # only admin keys, and nothing changes
            await ask(hout, info, outsider, AdminRelease(bad), protocol=ADMIN_PROTOCOL)
        with pytest.raises(NotQuarantined):  # typed: code not_quarantined
            await ask(hadm, info, admin, AdminRelease(good), protocol=ADMIN_PROTOCOL)
        with pytest.raises(MalformedFrame):
            await ask(hadm, info, admin, AdminRelease("not-a-peer-id"), protocol=ADMIN_PROTOCOL)
        assert svc.engine.reputation.is_quarantined(bad) and good in svc.engine.reputation.teachers

        with capture_logs() as logs:
            ack = await ask(hadm, info, admin, AdminRelease(bad), protocol=ADMIN_PROTOCOL)
        assert isinstance(ack, Ack)
        (event,) = [e for e in logs if e["event"] == "cpm.teacher.released"]
        assert event["teacher"] == bad and event["admin"] == admin.peer_id and event["harmful"] == 8
        assert _rows(await ask(hadm, info, admin, AdminQuery("quarantine", -1), protocol=ADMIN_PROTOCOL)) == []
        res = await _cli("release", bad, "--home", str(tmp_path / "h"), "--remote", svc.addrs[0], "--key", str(key))
        assert res.returncode == 1 and b"not a quarantined teacher" in res.stderr, res.stderr  # already released

    # restart from the same SQLite file: still released, and it teaches again (rate limit off as above)
    async with running_cpm(tmp_path, admins=[admin.peer_id], rate_limit_per_s=0.0) as (svc, info), \
            client(a) as ha, client(b) as hb, client(admin) as hadm:
        assert _rows(await ask(hadm, info, admin, AdminQuery("quarantine", -1), protocol=ADMIN_PROTOCOL)) == []
        assert not svc.engine.reputation.is_quarantined(bad) and bad in svc.engine.reputation.released
        for i, (ident, host) in enumerate(((a, ha), (b, hb))):
            assert isinstance(await ask(host, info, ident, _register(i)), Registered)
        agents = {a.peer_id: (a, ha), b.peer_id: (b, hb)}
        await _play_rounds(svc, info, agents, bad, until=lambda d: d.teacher == bad)
        assert svc.engine.reputation.teachers[bad].deliveries == 1  # a fresh start, not re-quarantined
        assert not svc.engine.reputation.is_quarantined(bad)


def test_cli_lists_and_releases_offline(tmp_path: Path) -> None:
    runner = CliRunner()
    home = tmp_path / "cpm"
    assert runner.invoke(cli, ["init", "--home", str(home), "--strategy", "random"]).exit_code == 0
    w = World(home, 2)  # the engine on the home's database: quarantine through real feedback
    bad, good = w.agents
    _play(w, bad, until=lambda d: w.engine.reputation.is_quarantined(bad))
    w.store.close()

    rows = json.loads(runner.invoke(cli, ["quarantine", "--json", "--home", str(home)]).output)
    assert [(r["teacher"], r["org"], r["harmful"]) for r in rows] == [(bad, "org0", 8)]
    table = runner.invoke(cli, ["quarantine", "--home", str(home)]).output
    assert f"{bad[:12]}…{bad[-4:]}" in table and bad not in table and "p_value" in table  # people: short IDs
    assert bad in runner.invoke(cli, ["quarantine", "--wide", "--home", str(home)]).output

    store = open_store(home / "cpm.db")
    strategy_before = store.load_bandit_state()[1]["strategy"]
    store.close()
    res = runner.invoke(cli, ["release", bad, "--home", str(home)])
    assert res.exit_code == 2 and "--remote" in res.output  # a running node would overwrite a file edit
    res = runner.invoke(cli, ["release", bad, "--home", str(home), "--offline", "--remote",
                              "/ip4/127.0.0.1/tcp/1/p2p/" + good])
    assert res.exit_code == 2
    assert runner.invoke(cli, ["release", good, "--home", str(home), "--offline"]).exit_code == 1  # not quarantined
    res = runner.invoke(cli, ["release", bad, "--home", str(home), "--offline"])
    assert res.exit_code == 0 and f"released {bad}" in res.output
    assert runner.invoke(cli, ["release", bad, "--home", str(home), "--offline"]).exit_code == 1  # already
    assert runner.invoke(cli, ["quarantine", "--home", str(home)]).output.strip() == "(no quarantined teachers)"

    store = open_store(home / "cpm.db")
    name, state = store.load_bandit_state()
    store.close()
    assert name == "random" and state["strategy"] == strategy_before  # only the reputation changed
    w = World(home, 0)  # the next node start: same database, the release holds
    assert not w.engine.reputation.is_quarantined(bad) and bad in w.engine.reputation.released
    w.store.close()
