"""``knexa-cpm`` as a real process: init, serve, live admission, kill -9 + restart, CLI
exit codes (subprocess and CliRunner)."""

from __future__ import annotations

import json
import os
import signal
import socket
from contextlib import asynccontextmanager

import multiaddr
import pytest
from click.testing import CliRunner

from cpm.admin import call
from cpm.cli import cli
from p2p.host import build_host, parse_peer_addr
from protocol.envelope import Identity
from protocol.errors import KnexaError, Unauthorized
from protocol.ids import CPM_PROTOCOL, MAX_FRAME_CPM
from protocol.messages import Ack, Directive, DirectiveRequest, Profile, Register, Registered

from .conftest import cpm_init, run_cli, start_cpm

pytestmark = pytest.mark.timeout(240)


@asynccontextmanager
async def client(identity: Identity):
    host = build_host(identity.seed)
    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        yield host


async def ask(addr: str, ident: Identity, message):
    """One request on a fresh client host (daemons reconnect after a CPM restart)."""
    outcome = []
    async with client(ident) as host:
        try:
            outcome.append((await call(host, parse_peer_addr(addr), ident, message, protocol_id=CPM_PROTOCOL,
                                       max_frame=MAX_FRAME_CPM, timeout_s=20))[1])
        except KnexaError as exc:  # re-raised outside host.run (which wraps in exception groups)
            outcome.append(exc)
    if isinstance(outcome[0], KnexaError):
        raise outcome[0]
    return outcome[0]


def _json(args):
    res = run_cli(args)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


async def test_serve_admit_live_kill9_restart(tmp_path, procs):
    home = tmp_path / "cpm"
    cpm_id = cpm_init(home, "--strategy", "random", "--round-timer", "600")
    assert (home / "identity.key").stat().st_mode & 0o777 == 0o600
    cpm = start_cpm(procs, home)
    addr = cpm.ready["addrs"][0]
    assert addr.endswith(f"/p2p/{cpm_id}") and cpm.ready["peer_id"] == cpm_id
    assert addr in cpm.stdout()

    a, b = Identity.generate(), Identity.generate()
    with pytest.raises(Unauthorized):
        await ask(addr, a, Register("org-a", "qwen2", ("/ip4/127.0.0.1/tcp/1",), "t"))
    # admission through the CLI (another process, same SQLite file) applies without restart
    assert run_cli(["knexa-cpm", "admit", a.peer_id, "--org", "org-a", "--home", str(home)]).returncode == 0
    assert run_cli(["knexa-cpm", "admit", b.peer_id, "--org", "org-b", "--home", str(home)]).returncode == 0
    reg = await ask(addr, a, Register("org-a", "qwen2", ("/ip4/127.0.0.1/tcp/1",), "t"))
    assert isinstance(reg, Registered) and reg.round == 1
    assert isinstance(await ask(addr, b, Register("org-b", "gpt2", ("/ip4/127.0.0.1/tcp/2",), "t")), Registered)
    vec = tuple(float(i) / 32 for i in range(32))
    assert isinstance(await ask(addr, a, Profile(1, vec, reg.transfer_hash)), Ack)

    assert cpm.kill9() == -signal.SIGKILL
    port = multiaddr.Multiaddr(addr).value_for_protocol("tcp")
    cpm2 = start_cpm(procs, home, "--listen", f"/ip4/127.0.0.1/tcp/{port}", name="cpm-restarted")
    assert cpm2.ready["addrs"][0] == addr  # same key, same port

    agents = {row["peer_id"]: row for row in _json(["knexa-cpm", "agents", "--home", str(home), "--json"])}
    assert agents[a.peer_id]["org"] == "org-a" and agents[a.peer_id]["admitted"] is True
    assert agents[b.peer_id]["family"] == "gpt2"
    rounds = _json(["knexa-cpm", "rounds", "--home", str(home), "--json"])
    assert [(r["round"], r["state"], r["profiles"]) for r in rounds] == [(1, "open", 1)]

    # the acked profile survived: b's profile completes the quorum of round 1
    assert isinstance(await ask(addr, b, Profile(1, vec, reg.transfer_hash)), Ack)
    directive = await ask(addr, a, DirectiveRequest(round=1, wait_ms=10_000))
    assert isinstance(directive, Directive)
    assert {directive.teacher, directive.student} == {a.peer_id, b.peer_id}
    pairs = _json(["knexa-cpm", "pairs", "--round", "1", "--home", str(home), "--json"])
    assert [p["directive_id"] for p in pairs] == [directive.directive_id]
    stats = _json(["knexa-cpm", "stats", "--home", str(home), "--json"])
    assert stats["round"] == 1 and stats["state"] == "matched" and stats["directives_issued"] == 1

    out = tmp_path / "export.csv"
    res = run_cli(["knexa-cpm", "export", "--format", "csv", "--out", str(out), "--home", str(home)])
    assert res.returncode == 0 and directive.directive_id in out.read_text()
    assert cpm2.terminate() == 0  # SIGTERM → clean exit 0


async def test_remote_admin_exit_codes(tmp_path, procs):
    admin_key = tmp_path / "admin.key"
    admin = Identity.generate()
    fd = os.open(admin_key, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, admin.seed)
    os.close(fd)
    other_key = tmp_path / "other.key"
    other_key.write_bytes(Identity.generate().seed)
    other_key.chmod(0o600)  # key files readable by others are refused (exit 3)
    home = tmp_path / "cpm"
    cpm_init(home, "--admin", admin.peer_id)
    cpm = start_cpm(procs, home)
    addr = cpm.ready["addrs"][0]
    newbie = Identity.generate().peer_id

    res = run_cli(["knexa-cpm", "admit", newbie, "--home", str(home), "--remote", addr, "--key", str(other_key)])
    assert res.returncode == 5, res.stderr
    res = run_cli(["knexa-cpm", "admit", newbie, "--org", "n", "--home", str(home), "--remote", addr,
                   "--key", str(admin_key)])
    assert res.returncode == 0, res.stderr
    rows = json.loads(run_cli(["knexa-cpm", "agents", "--json", "--home", str(home), "--remote", addr,
                               "--key", str(admin_key)]).stdout)
    assert [r["peer_id"] for r in rows] == [newbie] and rows[0]["admitted"] is True

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"/ip4/127.0.0.1/tcp/{s.getsockname()[1]}/p2p/{cpm.ready['peer_id']}"
    res = run_cli(["knexa-cpm", "stats", "--home", str(home), "--remote", dead, "--key", str(admin_key)])
    assert res.returncode == 4, res.stderr
    assert cpm.send_signal(signal.SIGINT) == 0  # Ctrl-C is a clean shutdown too
    assert "cpm.shutdown" in cpm.stderr()


def test_serve_port_in_use_is_runtime_error(tmp_path):
    home = tmp_path / "cpm"
    cpm_init(home)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = run_cli(["knexa-cpm", "serve", "--home", str(home), "--listen", f"/ip4/127.0.0.1/tcp/{port}"],
                      timeout=60)
    assert res.returncode == 1, res.stderr


# --- exit codes through CliRunner (no subprocess) ------------------------------------------


def test_cli_usage_errors_exit_2(tmp_path):
    runner = CliRunner()
    home = str(tmp_path / "cpm")
    assert runner.invoke(cli, ["init", "--home", home]).exit_code == 0
    assert runner.invoke(cli, ["admit", "not-a-peer-id", "--home", home]).exit_code == 2
    assert runner.invoke(cli, ["revoke", "Qm123", "--home", home]).exit_code == 2
    assert runner.invoke(cli, ["no-such-command"]).exit_code == 2
    assert runner.invoke(cli, ["export", "--format", "xml", "--out", "x", "--home", home]).exit_code == 2
    assert runner.invoke(cli, ["init", "--home", home, "--strategy", "oracle", "--force"]).exit_code == 2
    res = runner.invoke(cli, ["admit", Identity.generate().peer_id, "--home", home, "--remote",
                              "/ip4/127.0.0.1/tcp/1/p2p/" + Identity.generate().peer_id])
    assert res.exit_code == 2  # --remote without --key


def test_cli_config_errors_exit_3(tmp_path):
    runner = CliRunner()
    home = tmp_path / "cpm"
    assert runner.invoke(cli, ["stats", "--home", str(home)]).exit_code == 3  # not initialized
    assert runner.invoke(cli, ["init", "--home", str(home)]).exit_code == 0
    assert runner.invoke(cli, ["init", "--home", str(home)]).exit_code == 3  # already initialized
    cfg = (home / "config.toml").read_text()
    (home / "config.toml").write_text(cfg.replace("quorum = 1.0", "quorum = 7.5"))
    res = runner.invoke(cli, ["stats", "--home", str(home)])
    assert res.exit_code == 3 and "quorum" in res.output
    (home / "config.toml").write_text(cfg + "\nbogus_key = 1\n")
    res = runner.invoke(cli, ["serve", "--home", str(home)])
    assert res.exit_code == 3 and "bogus_key" in res.output
    (home / "config.toml").write_text(cfg)
    res = runner.invoke(cli, ["serve", "--home", str(home), "--listen", "not-a-multiaddr"])
    assert res.exit_code == 3 and "listen" in res.output
    (home / "identity.key").write_bytes(b"short")
    assert runner.invoke(cli, ["peer-id", "--home", str(home)]).exit_code == 3
    bad_hash = runner.invoke(cli, ["init", "--home", str(tmp_path / "x"), "--transfer-hash", "zz"])
    assert bad_hash.exit_code == 3 and "transfer_hash" in bad_hash.output


def test_cli_local_admin_roundtrip(tmp_path):
    runner = CliRunner()
    home = str(tmp_path / "cpm")
    res = runner.invoke(cli, ["init", "--home", home, "--open", "--max-rounds", "3"])
    cpm_id = res.output.strip()
    assert runner.invoke(cli, ["peer-id", "--home", home]).output.strip() == cpm_id
    peer = Identity.generate().peer_id
    assert runner.invoke(cli, ["admit", peer, "--org", "acme", "--home", home]).exit_code == 0
    rows = json.loads(runner.invoke(cli, ["agents", "--json", "--home", home]).output)
    assert rows[0]["peer_id"] == peer and rows[0]["org"] == "acme" and rows[0]["admitted"] is True
    assert runner.invoke(cli, ["revoke", peer, "--home", home]).exit_code == 0
    rows = json.loads(runner.invoke(cli, ["agents", "--json", "--home", home]).output)
    assert rows[0]["revoked"] is True and rows[0]["admitted"] is False
    out = tmp_path / "all.json"
    assert runner.invoke(cli, ["export", "--format", "json", "--out", str(out), "--home", home]).exit_code == 0
    data = json.loads(out.read_text())
    assert set(data) == {"agents", "rounds", "pairs", "profiles", "stats"}
