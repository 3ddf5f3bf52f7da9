"""`knexad doctor` / `knexa-cpm doctor` against real homes and a real in-process CPM host.

Each failure mode an operator meets on day one must produce a FAIL line with a fix and
the documented exit code: bad config (3), a key others can read (3), no CPM at the
address (4), a CPM with another key at the address (4), not admitted (5, with the exact
`knexa-cpm admit` command), a CPM clock outside the replay window (1), a transfer-set
mismatch (3). The healthy path exits 0.
"""

from __future__ import annotations

import json
import os
import re
import socket
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner, Result

from cpm import config as C
from cpm.doctor import config_group as cpm_config_group
from cpm.doctor import doctor_command as cpm_doctor
from cpm.service import CpmService
from cpm.store import open_store
from knexad.agents import build_agent
from knexad.config import from_mapping, write_config
from knexad.doctor import config_group, doctor_command
from knexad.identity import create_identity
from protocol.envelope import Identity, now_ms

pytestmark = pytest.mark.timeout(120)

FAST = {"timeouts": {"dial_s": 3.0, "request_s": 3.0}}


def make_home(path: Path, cpm: str | list[str], **extra) -> Identity:
    path.mkdir(parents=True, exist_ok=True)
    write_config(path, from_mapping({"cpm": cpm, "org": "acme", **FAST, **extra}))
    return create_identity(path / "identity.key")


def synthetic_hash(cpm: str) -> str:
    return build_agent(from_mapping({"cpm": cpm})).transfer_set_hash()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def invoke(command, args: list[str], env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(command, args, env=env, catch_exceptions=False)


def lines_of(result: Result, check: str) -> list[str]:
    """The check's line and its `fix:` line (if any)."""
    lines = result.output.splitlines()
    for i, line in enumerate(lines):
        if line.split()[1:2] == check.split()[:1] and f" {check} " in f" {line} ":
            return [line] + ([lines[i + 1]] if i + 1 < len(lines) and "fix:" in lines[i + 1] else [])
    raise AssertionError(f"no {check!r} line in:\n{result.output}")


FAKE_CPM_ID = Identity(b"\x01" * 32).peer_id


# --- local failures (no CPM needed) ---------------------------------------------------


def test_missing_home_is_a_config_failure(tmp_path: Path) -> None:
    result = invoke(doctor_command, ["--home", str(tmp_path / "nope")])
    assert result.exit_code == 3
    assert "FAIL" in lines_of(result, "config")[0]
    assert "knexad init" in result.output


def test_bad_config_exits_3_and_names_the_key(tmp_path: Path) -> None:
    home = tmp_path / "d"
    make_home(home, f"/ip4/127.0.0.1/tcp/{closed_port()}/p2p/{FAKE_CPM_ID}")
    text = (home / "config.toml").read_text().replace("dial_s = 3.0", "dial_s = -1")
    (home / "config.toml").write_text(text)
    result = invoke(doctor_command, ["--home", str(home)])
    assert result.exit_code == 3
    line = lines_of(result, "config")
    assert "FAIL" in line[0] and "timeouts.dial_s" in line[0]
    assert "docs/configuration.md" in line[1]
    assert "skip" in lines_of(result, "cpm dial")[0]  # nothing network-side is attempted


def test_bad_env_override_is_blamed_on_the_environment(tmp_path: Path) -> None:
    home = tmp_path / "d"
    make_home(home, f"/ip4/127.0.0.1/tcp/{closed_port()}/p2p/{FAKE_CPM_ID}")
    result = invoke(doctor_command, ["--home", str(home)], env={"KNEXA_TIMEOUTS_DIAL_S": "0"})
    assert result.exit_code == 3
    assert "KNEXA_TIMEOUTS_DIAL_S" in lines_of(result, "config")[1]


def test_world_readable_key_exits_3_with_chmod_hint(tmp_path: Path) -> None:
    home = tmp_path / "d"
    make_home(home, f"/ip4/127.0.0.1/tcp/{closed_port()}/p2p/{FAKE_CPM_ID}")
    os.chmod(home / "identity.key", 0o644)
    result = invoke(doctor_command, ["--home", str(home)])
    assert result.exit_code == 3
    line = lines_of(result, "identity key")
    assert "FAIL" in line[0] and "644" in line[0]
    assert f"chmod 600 {home / 'identity.key'}" in line[1]


def test_cpm_down_exits_4(tmp_path: Path) -> None:
    home = tmp_path / "d"
    make_home(home, f"/ip4/127.0.0.1/tcp/{closed_port()}/p2p/{FAKE_CPM_ID}")
    result = invoke(doctor_command, ["--home", str(home), "--json"])
    assert result.exit_code == 4
    doc = json.loads(result.output)
    dial = next(c for c in doc["checks"] if c["name"] == "cpm dial")
    assert dial["status"] == "fail" and dial["code"] == 4 and "knexa-cpm serve" in dial["hint"]
    assert doc["exit_code"] == 4


def test_port_in_use_fails_the_listen_check(tmp_path: Path) -> None:
    home = tmp_path / "d"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        make_home(home, f"/ip4/127.0.0.1/tcp/{closed_port()}/p2p/{FAKE_CPM_ID}",
                  listen=[f"/ip4/127.0.0.1/tcp/{port}"])
        result = invoke(doctor_command, ["--home", str(home)])
    line = lines_of(result, "listen")
    assert "FAIL" in line[0] and "in use" in line[0]
    assert result.exit_code == 1  # listen comes before the (also failing) CPM dial


def test_config_show_prints_effective_config_and_overrides(tmp_path: Path) -> None:
    home = tmp_path / "d"
    make_home(home, f"/ip4/127.0.0.1/tcp/{closed_port()}/p2p/{FAKE_CPM_ID}")
    env = {"KNEXA_TIMEOUTS_DIAL_S": "2.5", "KNEXA_TIMEOUT_DIAL_S": "9"}
    result = invoke(config_group, ["show", "--home", str(home)], env=env)
    assert result.exit_code == 0
    assert "# timeouts.dial_s = '2.5'  (from KNEXA_TIMEOUTS_DIAL_S)" in result.output
    assert "dial_s = 2.5" in result.output
    assert "ignored: KNEXA_TIMEOUT_DIAL_S" in result.output
    doc = json.loads(invoke(config_group, ["show", "--home", str(home), "--json"], env=env).output)
    assert doc["config"]["timeouts"]["dial_s"] == 2.5
    assert doc["env_overrides"] == {"KNEXA_TIMEOUTS_DIAL_S": "timeouts.dial_s"}
    assert invoke(config_group, ["show", "--home", str(tmp_path / "none")]).exit_code == 3


# --- against a real CPM host ----------------------------------------------------------


@asynccontextmanager
async def running_cpm(tmp_path: Path, *, clock_offset_ms: int = 0, transfer_hash: str | None = None):
    cfg = C.CpmConfig(request_timeout_s=3.0)
    if transfer_hash is not None:
        cfg.transfer_hash = transfer_hash
    ident = Identity.generate()
    store = open_store(tmp_path / "cpm.db")
    service = CpmService(cfg, ident, store, clock=lambda: now_ms() + clock_offset_ms)
    try:
        async with trio.open_nursery() as nursery:
            addrs = await nursery.start(service.run)
            yield service, store, addrs[0]
            nursery.cancel_scope.cancel()
    finally:
        store.close()


async def doctor_in_thread(home: Path) -> Result:
    """The CLI runs its own trio loop: give it a thread so the CPM keeps serving."""
    return await trio.to_thread.run_sync(lambda: invoke(doctor_command, ["--home", str(home)]))


async def test_not_admitted_exits_5_with_the_admit_command(tmp_path: Path) -> None:
    async with running_cpm(tmp_path) as (_service, _store, addr):
        ident = make_home(tmp_path / "d", addr)
        result = await doctor_in_thread(tmp_path / "d")
    assert result.exit_code == 5, result.output
    assert "ok" in lines_of(result, "cpm dial")[0] and "ok" in lines_of(result, "cpm protocol")[0]
    line = lines_of(result, "admission")
    assert "FAIL" in line[0] and ident.peer_id in line[0]
    assert f"knexa-cpm admit {ident.peer_id} --org acme --home <cpm-home>" in line[1]


async def test_healthy_member_exits_0(tmp_path: Path) -> None:
    async with running_cpm(tmp_path) as (service, store, addr):
        ident = make_home(tmp_path / "d", addr)
        service.config.transfer_hash = synthetic_hash(addr)
        store.admit(ident.peer_id, "acme", now_ms())
        result = await doctor_in_thread(tmp_path / "d")
        registered = store.get_agent(ident.peer_id)
    assert result.exit_code == 0, result.output
    for check in ("config", "identity key", "cpm dial", "cpm protocol", "admission", "clock", "transfer set"):
        assert lines_of(result, check)[0].split()[0] == "ok", result.output
    assert "FAIL" not in result.output
    assert registered is not None and registered.org == "acme"  # the Register really reached the CPM


async def test_transfer_set_mismatch_exits_3_with_the_hash_to_use(tmp_path: Path) -> None:
    async with running_cpm(tmp_path, transfer_hash="0" * 64) as (_service, store, addr):
        ident = make_home(tmp_path / "d", addr)
        store.admit(ident.peer_id, "acme", now_ms())
        result = await doctor_in_thread(tmp_path / "d")
    assert result.exit_code == 3, result.output
    assert f'transfer_hash = "{synthetic_hash(addr)}"' in lines_of(result, "transfer set")[1]


async def test_clock_skew_near_the_window_warns(tmp_path: Path) -> None:
    async with running_cpm(tmp_path, clock_offset_ms=60_000) as (service, store, addr):
        ident = make_home(tmp_path / "d", addr)
        service.config.transfer_hash = synthetic_hash(addr)
        store.admit(ident.peer_id, "acme", now_ms())
        result = await doctor_in_thread(tmp_path / "d")
    line = lines_of(result, "clock")
    assert line[0].split()[0] == "WARN", line
    # the estimate includes the request's round trip (and, under load, the CPM's commit
    # wait), so it is 60 s give or take; "+59.99 s" is as right as "+60.01 s"
    skew = float(re.search(r"([+-]\d+(?:\.\d+)?) ?s", line[0]).group(1))
    assert abs(skew - 60.0) <= 0.5, line[0]
    assert "NTP" in line[1]
    assert result.exit_code == 0  # warnings do not fail


async def test_clock_outside_the_window_fails_with_ntp_hint(tmp_path: Path) -> None:
    async with running_cpm(tmp_path, clock_offset_ms=300_000) as (_service, store, addr):
        ident = make_home(tmp_path / "d", addr)
        store.admit(ident.peer_id, "acme", now_ms())
        result = await doctor_in_thread(tmp_path / "d")
    assert result.exit_code == 1, result.output
    line = lines_of(result, "admission")
    assert "timestamp" in line[0] and "NTP" in line[1]


async def test_wrong_cpm_peer_id_at_the_address_exits_4(tmp_path: Path) -> None:
    async with running_cpm(tmp_path) as (_service, _store, addr):
        wrong = addr.split("/p2p/")[0] + f"/p2p/{FAKE_CPM_ID}"
        make_home(tmp_path / "d", wrong)
        result = await doctor_in_thread(tmp_path / "d")
    assert result.exit_code == 4, result.output
    line = lines_of(result, "cpm dial")
    assert "handshake" in line[0] and "knexa-cpm peer-id" in line[1]


# --- knexa-cpm doctor -----------------------------------------------------------------


def init_cpm_home(home: Path, **overrides) -> Identity:
    home.mkdir(parents=True)
    cfg = C.CpmConfig(**overrides)
    C.save_config(home, cfg)
    ident = C.create_identity(home)
    open_store(C.db_path(home)).close()
    return ident


def test_cpm_doctor_healthy_home_and_config_show(tmp_path: Path) -> None:
    home = tmp_path / "cpm"
    init_cpm_home(home)
    result = invoke(cpm_doctor, ["--home", str(home)])
    assert result.exit_code == 0, result.output
    assert "WAL" in lines_of(result, "database")[0]
    shown = invoke(cpm_config_group, ["show", "--home", str(home)])
    assert shown.exit_code == 0 and 'strategy = "linucb"' in shown.output


def test_cpm_doctor_failures(tmp_path: Path) -> None:
    home = tmp_path / "cpm"
    init_cpm_home(home, open_admission=True)
    os.chmod(home / "identity.key", 0o640)
    result = invoke(cpm_doctor, ["--home", str(home)])
    assert result.exit_code == 3
    assert "chmod 600" in lines_of(result, "identity key")[1]
    assert lines_of(result, "admission")[0].split()[0] == "WARN"  # open admission
    os.chmod(home / "identity.key", 0o600)
    (home / "cpm.db").write_bytes(b"this is not a database" * 100)
    result = invoke(cpm_doctor, ["--home", str(home)])
    assert result.exit_code == 3
    assert "backup" in lines_of(result, "database")[1]
    (home / "config.toml").write_text('strategy = "best"\n')
    assert invoke(cpm_doctor, ["--home", str(home)]).exit_code == 3


async def test_cpm_doctor_probes_the_running_node(tmp_path: Path) -> None:
    home = tmp_path / "cpm"
    ident = init_cpm_home(home, request_timeout_s=3.0)
    store = open_store(C.db_path(home))
    service = CpmService(C.load_config(home), ident, store)
    try:
        async with trio.open_nursery() as nursery:
            addrs = await nursery.start(service.run)
            ok = await trio.to_thread.run_sync(
                lambda: invoke(cpm_doctor, ["--home", str(home), "--addr", addrs[0]]))
            other = addrs[0].split("/p2p/")[0]
            port = int(other.rsplit("/", 1)[1])
            nursery.cancel_scope.cancel()
    finally:
        store.close()
    assert ok.exit_code == 0, ok.output
    line = lines_of(ok, "running node")[0]
    assert line.split()[0] == "ok" and ident.peer_id in line
    assert port > 0
    # the node is gone: the same probe now says so, with exit 4
    gone = await trio.to_thread.run_sync(lambda: invoke(cpm_doctor, ["--home", str(home), "--addr", other]))
    assert gone.exit_code == 4
    assert lines_of(gone, "running node")[0].split()[0] == "FAIL"


def test_cpm_doctor_port_held_by_another_process_exits_1(tmp_path: Path) -> None:
    home = tmp_path / "cpm"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        init_cpm_home(home, listen=[f"/ip4/127.0.0.1/tcp/{port}"], request_timeout_s=2.0)
        result = invoke(cpm_doctor, ["--home", str(home)])
    assert result.exit_code == 1, result.output
    line = lines_of(result, "running node")
    assert line[0].split()[0] == "FAIL"
    assert "another process" in line[1] or "does not answer" in line[1]


def test_running_daemon_holds_its_port_and_stale_outbox_warns(tmp_path: Path) -> None:
    from knexad.state import DaemonState, StateFile

    home = tmp_path / "d"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        make_home(home, f"/ip4/127.0.0.1/tcp/{closed_port()}/p2p/{FAKE_CPM_ID}",
                  listen=[f"/ip4/127.0.0.1/tcp/{port}"])
        (home / "outbox").mkdir()
        (home / "outbox" / "r1-abc.fb").write_bytes(b"x")
        state = StateFile(home, DaemonState(peer_id="p", pid=os.getpid(), status="running"))
        state.save()
        running = invoke(doctor_command, ["--home", str(home)])
        state.update(status="starting", pid=2**22 + 12345)  # a pid that is not alive: it died
        dead = invoke(doctor_command, ["--home", str(home)])
    assert "in use by the running process" in lines_of(running, "listen")[0]
    assert lines_of(running, "daemon")[0].split()[0] == "ok"
    assert lines_of(running, "outbox")[0].split()[0] == "ok"  # a running daemon is delivering it
    assert lines_of(dead, "daemon")[0].split()[0] == "WARN"
    assert lines_of(dead, "outbox")[0].split()[0] == "WARN" and "1 feedback" in lines_of(dead, "outbox")[0]
    assert "FAIL" in lines_of(dead, "listen")[0]  # nobody we know holds the port now


# --- ML members: the transfer-set hash is known before the model is built --------------


def test_config_show_prints_the_ml_agents_own_transfer_hash(tmp_path: Path) -> None:
    """An operator onboarding an ML member learns the hash the CPM must pin from
    `config show` — before, only `knexad run` failing with exit 3 told it."""
    pytest.importorskip("torch", reason="the ML agent (compared against) needs the [ml] extra")
    from knexad.agent.ml_agent import MLAgent

    home = tmp_path / "d"
    make_home(home, f"/ip4/127.0.0.1/tcp/{closed_port()}/p2p/{FAKE_CPM_ID}",
              agent={"model": "tiny-gpt2", "n_agents": 4, "index": 2, "seed": 7})
    expected = MLAgent("tiny-gpt2", agent_index=2, n_agents=4, seed=7).transfer_set_hash()  # lazy: no model load
    doc = json.loads(invoke(config_group, ["show", "--home", str(home), "--json"]).output)
    assert doc["transfer_hash"] == expected
    assert f"# agent transfer-set hash: {expected}" in invoke(config_group, ["show", "--home", str(home)]).output
    assert expected != synthetic_hash(doc["config"]["cpm"])


async def test_ml_member_with_another_transfer_set_fails_the_doctor(tmp_path: Path) -> None:
    async with running_cpm(tmp_path) as (service, store, addr):  # the CPM pins the synthetic set
        ident = make_home(tmp_path / "d", addr, agent={"model": "tiny-qwen2"})
        service.config.transfer_hash = synthetic_hash(addr)
        store.admit(ident.peer_id, "acme", now_ms())
        result = await doctor_in_thread(tmp_path / "d")
    assert result.exit_code == 3, result.output
    assert "FAIL" in lines_of(result, "transfer set")[0]


# --- several CPM addresses (replicas, docs/operations.md "High availability") --------


@asynccontextmanager
async def running_replicas(tmp_path: Path, n: int):
    """``n`` CPM nodes with one identity key, each on its own port (and its own SQLite
    store: the doctor only needs each to answer Register, not a shared round state)."""
    ident = Identity.generate()
    stores = [open_store(tmp_path / f"cpm{i}.db") for i in range(n)]
    services = [CpmService(C.CpmConfig(request_timeout_s=3.0), ident, s) for s in stores]
    try:
        async with trio.open_nursery() as nursery:
            addrs = [(await nursery.start(svc.run))[0] for svc in services]
            yield services, stores, addrs
            nursery.cancel_scope.cancel()
    finally:
        for s in stores:
            s.close()


def _down(addr: str) -> str:
    """The same CPM peer ID at a port nothing listens on (a replica that is down)."""
    return f"/ip4/127.0.0.1/tcp/{closed_port()}/p2p/{addr.rsplit('/p2p/', 1)[1]}"


async def test_doctor_checks_every_cpm_replica_and_warns_for_a_down_one(tmp_path: Path) -> None:
    async with running_replicas(tmp_path, 1) as (services, stores, (up,)):
        down = _down(up)
        ident = make_home(tmp_path / "d", [down, up])
        services[0].config.transfer_hash = synthetic_hash(up)
        stores[0].admit(ident.peer_id, "acme", now_ms())
        result = await doctor_in_thread(tmp_path / "d")
    assert result.exit_code == 0, result.output  # one replica answers: the daemon fails over to it
    first, second = lines_of(result, "cpm replica 1"), lines_of(result, "cpm replica 2")
    assert first[0].split()[0] == "WARN" and "not reachable" in first[0] and down.split("/p2p/")[0] in first[0]
    assert "fails over" in first[1]
    assert second[0].split()[0] == "ok" and "reachable" in second[0] and up.split("/p2p/")[0] in second[0]
    assert re.search(r"Register answered in \d+ ms", second[0]) and "settles here" in second[0]
    assert "2 replicas" in lines_of(result, "cpm address")[0]
    for check in ("cpm dial", "cpm protocol", "admission", "transfer set"):  # the full path, on the live one
        assert lines_of(result, check)[0].split()[0] == "ok", result.output


async def test_doctor_shows_which_replica_the_running_daemon_uses(tmp_path: Path) -> None:
    from knexad.state import DaemonState, StateFile

    async with running_replicas(tmp_path, 2) as (services, stores, addrs):
        ident = make_home(tmp_path / "d", addrs)
        for svc, store in zip(services, stores):
            svc.config.transfer_hash = synthetic_hash(addrs[0])
            store.admit(ident.peer_id, "acme", now_ms())
        StateFile(tmp_path / "d", DaemonState(peer_id=ident.peer_id, pid=os.getpid(), status="running",
                                              cpm_addr=addrs[1])).save()
        result = await doctor_in_thread(tmp_path / "d")
        registered = [store.get_agent(ident.peer_id) for store in stores]
    first, second = lines_of(result, "cpm replica 1")[0], lines_of(result, "cpm replica 2")[0]
    assert first.split()[0] == "ok" and "in use" not in first and "below" not in first
    assert second.split()[0] == "ok" and "in use by the running daemon" in second and "checked in full below" in second
    assert all(r is not None and r.registered_at for r in registered)  # the doctor's Register reached both


async def test_doctor_fails_with_4_when_no_cpm_replica_answers(tmp_path: Path) -> None:
    cpm = f"/ip4/127.0.0.1/tcp/{closed_port()}/p2p/{FAKE_CPM_ID}"
    make_home(tmp_path / "d", [cpm, _down(cpm)])
    result = await doctor_in_thread(tmp_path / "d")
    assert result.exit_code == 4, result.output
    for name in ("cpm replica 1", "cpm replica 2", "cpm dial"):
        assert lines_of(result, name)[0].split()[0] == "FAIL", result.output
