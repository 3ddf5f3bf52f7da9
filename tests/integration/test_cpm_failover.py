"""A daemon's CPM client with several CPM addresses (``cpm = [...]``, replicas sharing one
identity): when the address in use does not answer, the next request goes to the next
one — real py-libp2p hosts, a real CPM service, a dead address that refuses TCP."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio
from structlog.testing import capture_logs

from knexad.config import DaemonConfig, from_mapping
from knexad.cpm_client import CpmRpc
from protocol.envelope import Identity
from protocol.errors import ConfigError, PeerUnavailable
from protocol.messages import Register, Registered
from tests.reliability.netkit import client, running_cpm

pytestmark = pytest.mark.timeout(120)


def _dead_port() -> int:
    """A 127.0.0.1 port nobody listens on (bound, then closed: connect is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_dead_first_address_fails_over_to_the_next(tmp_path: Path) -> None:
    me = Identity.generate()
    async with running_cpm(tmp_path, open_admission=True) as (service, _info), client(me) as h:
        cpm_id = service.identity.peer_id
        live = service.addrs[0]
        dead = f"/ip4/127.0.0.1/tcp/{_dead_port()}/p2p/{cpm_id}"
        cfg = from_mapping({"cpm": [dead, live]})
        assert cfg.cpm_addrs == (dead, live)
        rpc = CpmRpc(h, me, cfg)
        msg = Register(org="o", family="qwen2", listen_addrs=(), agent_version="t")
        with capture_logs() as logs, trio.fail_after(60):
            with pytest.raises(PeerUnavailable):
                await rpc.call(msg)  # the first address refuses
            reply = await rpc.call(msg)  # the retry goes to the second
            assert isinstance(reply.message, Registered)
            again = await rpc.call(msg)  # and stays there while it answers
            assert isinstance(again.message, Registered)
        assert rpc.failovers == 1 and rpc.active == 1
        assert [e["to"] for e in logs if e["event"] == "cpm.failover"] == [live]


async def test_one_address_never_fails_over(tmp_path: Path) -> None:
    me = Identity.generate()
    async with client(me) as h:
        dead = f"/ip4/127.0.0.1/tcp/{_dead_port()}/p2p/{Identity.generate().peer_id}"
        rpc = CpmRpc(h, me, DaemonConfig(cpm=dead))
        with capture_logs(), trio.fail_after(60), pytest.raises(PeerUnavailable):
            await rpc.call(Register(org="o", family="qwen2", listen_addrs=(), agent_version="t"))
        assert rpc.failovers == 0 and rpc.active == 0


def test_cpm_list_config_round_trips_and_names_one_cpm() -> None:
    import tomllib

    a, b = Identity.generate().peer_id, Identity.generate().peer_id
    one = f"/ip4/127.0.0.1/tcp/4001/p2p/{a}"
    two = f"/ip4/127.0.0.1/tcp/4002/p2p/{a}"
    cfg = from_mapping({"cpm": [one, two]})
    assert (cfg.cpm, cfg.cpm_replicas, cfg.cpm_peer_id) == (one, (two,), a)
    data = tomllib.loads(cfg.to_toml())
    assert data["cpm"] == [one, two] and "cpm_replicas" not in data
    assert from_mapping(data) == cfg
    single = from_mapping({"cpm": one})  # the single-string form stays valid and is written as one
    assert tomllib.loads(single.to_toml())["cpm"] == one and single.cpm_addrs == (one,)
    with pytest.raises(ConfigError, match="same CPM peer ID"):
        from_mapping({"cpm": [one, f"/ip4/127.0.0.1/tcp/4002/p2p/{b}"]})
    with pytest.raises(ConfigError, match="cpm"):
        from_mapping({"cpm": []})
    assert from_mapping({"cpm": one, "cpm_replicas": [two]}) == cfg  # KNEXA_CPM_REPLICAS adds to a file's cpm
    with pytest.raises(ConfigError, match="listed twice"):
        from_mapping({"cpm": [one, two], "cpm_replicas": [two]})
