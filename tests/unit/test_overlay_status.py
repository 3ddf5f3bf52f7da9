"""How an operator reads the overlay: ``knexad doctor``'s network check, the
``[network]`` config section, and what Register advertises (docs/networking.md)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from knexad.config import DaemonConfig, NetworkSection, from_mapping
from knexad.doctor import check_network
from knexad.state import DaemonState
from p2p import checks as K
from protocol.envelope import Identity
from protocol.errors import ConfigError

CPM = f"/ip4/127.0.0.1/tcp/4001/p2p/{Identity.generate().peer_id}"


@pytest.mark.parametrize(
    "reach, reserved, status",
    [("public", False, K.OK), ("private", True, K.OK), ("private", False, K.WARN), ("unknown", True, K.WARN)],
)
def test_doctor_network_check(reach: str, reserved: bool, status: str) -> None:
    state = DaemonState(reachability=reach, relay_reserved=reserved, paths={"relay": 2})
    check = check_network(state, True, DaemonConfig(cpm=CPM))
    assert check.status == status
    assert f"reachability {reach}" in check.detail and "relay 2" in check.detail


def test_doctor_network_check_needs_the_running_daemon() -> None:
    assert check_network(DaemonState(reachability="public"), False, DaemonConfig(cpm=CPM)).status == K.SKIP


def test_network_section_is_validated() -> None:
    cfg = from_mapping({"cpm": CPM, "network": {"advertise": "relay-only", "direct_dial_s": 1.5}})
    assert cfg.network == replace(NetworkSection(), advertise="relay-only", direct_dial_s=1.5)
    with pytest.raises(ConfigError) as err:
        from_mapping({"cpm": CPM, "network": {"advertise": "everywhere"}})
    assert err.value.key == "network.advertise"
    with pytest.raises(ConfigError) as err:
        from_mapping({"cpm": CPM, "network": {"advertise": "relay-only", "relay": False}})
    assert err.value.key == "network.advertise"
    with pytest.raises(ConfigError) as err:
        from_mapping({"cpm": CPM, "network": {"holepunch": "yes"}})
    assert err.value.key == "network.holepunch"


class _Stop(Exception):
    pass


class _FakeRpc:
    """Answers Register and Profile like a CPM; stops the loop at the long-poll."""

    def __init__(self) -> None:
        self.sent: list[object] = []

    async def call(self, msg, **_kw):
        from knexad.cpm_client import Reply
        from protocol.messages import Ack, Profile, Register, Registered

        self.sent.append(msg)
        if isinstance(msg, Register):
            return Reply(b"", None, Registered(round=1, cpm_time_ms=0, transfer_hash=""), b"")
        if isinstance(msg, Profile):
            return Reply(b"", None, Ack(ref=b""), b"")
        raise _Stop


async def test_client_registers_again_when_advertised_addresses_change(tmp_path) -> None:
    """The relay reservation may come after the first Register (CPM not up yet): the
    CPM must learn the circuit address before the next Profile."""
    from knexad.cpm_client import CpmClient
    from knexad.state import StateFile
    from protocol.messages import Register

    state = StateFile(tmp_path)
    state.update(addrs=["/ip4/127.0.0.1/tcp/5/p2p/x"], advertised=["/ip4/127.0.0.1/tcp/5/p2p/x"])
    rpc = _FakeRpc()

    async def profile(_r: int) -> list[float]:
        return [0.0] * 32

    async def nothing(*_a) -> None:
        return None

    cl = CpmClient(rpc, DaemonConfig(cpm=CPM), Identity.generate(), state, family="qwen2",
                   transfer_hash="ab" * 32, profile_fn=profile, on_directive=nothing, on_exit=lambda c: None)
    await cl._register()
    circuit = CPM + "/p2p-circuit/p2p/x"
    state.update(advertised=["/ip4/127.0.0.1/tcp/5/p2p/x", circuit])
    with pytest.raises(_Stop):
        await cl._rounds(1)
    registers = [m for m in rpc.sent if isinstance(m, Register)]
    assert len(registers) == 2 and registers[1].listen_addrs[-1] == circuit
    assert [type(m).__name__ for m in rpc.sent[1:3]] == ["Register", "Profile"]
    rpc.sent.clear()
    with pytest.raises(_Stop):  # unchanged: no third Register
        await cl._rounds(1)
    assert not [m for m in rpc.sent if isinstance(m, Register)]


@pytest.mark.parametrize("mode", ["all", "direct", "relay-only"])
def test_advertised_addresses_follow_the_mode_and_the_reservation(tmp_path, mode: str) -> None:
    import os

    from knexad.overlay import Overlay
    from knexad.state import StateFile
    from p2p.host import build_host

    host = build_host(os.urandom(32))
    me = host.get_id().to_base58()
    direct = f"/ip4/127.0.0.1/tcp/7/p2p/{me}"
    cfg = DaemonConfig(cpm=CPM, network=NetworkSection(advertise=mode))
    overlay = Overlay(host, cfg, StateFile(tmp_path), [direct])
    circuit = f"{CPM}/p2p-circuit/p2p/{me}"
    before = {"all": [direct], "direct": [direct], "relay-only": []}[mode]
    assert overlay.advertised() == before  # no reservation yet: no circuit address
    overlay.node.reservations = 1
    after = {"all": [direct, circuit], "direct": [direct], "relay-only": [circuit]}[mode]
    assert overlay.advertised() == after


def test_cpm_relay_keys_reach_the_relay_limits() -> None:
    from cpm.config import config_from_dict
    from cpm.service import relay_limits

    cfg = config_from_dict({"relay_circuit_bytes": 1 << 20, "relay_circuit_duration_s": 30,
                            "relay_max_reservations": 5, "relay_reservation_ttl_s": 120})
    lim = relay_limits(cfg).to_libp2p()
    assert (lim.data, lim.duration, lim.max_reservations, lim.reservation_ttl) == (1 << 20, 30, 5, 120)
    assert config_from_dict({}).relay is True
    for bad in ({"relay": "yes"}, {"relay_reservation_ttl_s": 10}, {"relay_circuit_bytes": -1}):
        with pytest.raises(ConfigError) as err:
            config_from_dict(bad)
        assert err.value.key == next(iter(bad))
