"""Build py-libp2p hosts that speak only Noise + yamux, with sane connection settings.

py-libp2p's ``new_host()`` default offers Noise, TLS, SECIO **and plaintext**; we pass
``sec_opt``/``muxer_opt`` explicitly so a plaintext (or mplex) dial fails. Default
``max_connections_per_peer=3`` costs a fixed ~250 ms happy-eyeballs wait per dial and
``min_connections=50`` makes the auto-connector redial departed peers forever; both are
set here (design.md §8). Connections that are not upgraded yet are bounded in bytes,
number and time by ``p2p.preauth`` (GHSA-hmjq-g7pp-rw3x, unfixed in py-libp2p 0.8.1).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import multiaddr
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from p2p.preauth import PreauthLimits, install
from protocol.errors import ConfigError

# py-libp2p logs through stdlib `libp2p.*` loggers with no handler; keep them quiet
# unless the operator asks (KNEXA's own logs go through structlog).
logging.getLogger("libp2p").addHandler(logging.NullHandler())
logging.getLogger("libp2p").propagate = False


def key_pair_from_seed(seed: bytes) -> KeyPair:
    private = Ed25519PrivateKey.from_bytes(seed)
    return KeyPair(private, private.get_public_key())


def connection_config(dial_timeout_s: float = 10.0, max_connections: int | None = None,
                      inbound_upgrade_timeout_s: float = 10.0) -> ConnectionConfig:
    """``max_connections``: None keeps py-libp2p's 300 (it also *prunes* connections
    above its high watermark of 300); a server expecting more peers raises both.
    ``inbound_upgrade_timeout_s``: py-libp2p's own limit on an inbound upgrade, kept
    above our handshake deadline so that ours (logged, ``p2p.preauth``) fires first."""
    extra = {} if max_connections is None else {"max_connections": max_connections,
                                                "high_watermark": max_connections}
    return ConnectionConfig(
        max_connections_per_peer=1,
        min_connections=0,
        low_watermark=0,
        dial_timeout=dial_timeout_s,
        inbound_upgrade_timeout=inbound_upgrade_timeout_s,
        outbound_stream_protocol_negotiation_timeout=dial_timeout_s,
        inbound_stream_protocol_negotiation_timeout=dial_timeout_s,
        **extra,
    )


def resource_manager(max_inbound: int) -> object:
    """py-libp2p's default resource manager caps established inbound connections at
    256 (``new_connection_limits_with_defaults``) and its swarm at 300 connections
    (``ConnectionConfig``): the 257th agent of a CPM is refused silently and retries
    forever (found by benchmarks/load.py). A server that expects many peers raises the
    per-direction caps here; per-peer limits stay the default."""
    from libp2p.rcmgr import new_resource_manager
    from libp2p.rcmgr.connection_limits import ConnectionLimits

    return new_resource_manager(connection_limits=ConnectionLimits(
        max_pending_inbound=max(64, max_inbound // 4), max_pending_outbound=64,
        max_established_inbound=max_inbound, max_established_outbound=256,
        max_established_per_peer=8, max_established_total=max_inbound + 256,
    ))


def build_host(seed: bytes, *, dial_timeout_s: float = 10.0, negotiate_timeout_s: int = 10,
               max_inbound: int | None = None, preauth: PreauthLimits | None = None) -> IHost:
    """A host whose identity key is ``seed`` (the same key signs our envelopes).

    ``max_inbound``: established inbound connections allowed (None = py-libp2p's
    default of 256; the CPM passes its expected population). ``preauth``: bounds on
    connections before their upgrade (None = ``PreauthLimits()``: 64 KiB, 8 per
    address, 64 in all, 10 s)."""
    kp = key_pair_from_seed(seed)
    limits = preauth or PreauthLimits()
    noise = NoiseTransport(kp, noise_privkey=create_x25519_key_pair().private_key)
    sec_opt = {NOISE_PROTOCOL_ID: noise}
    muxer_opt = {YAMUX_PROTOCOL_ID: Yamux}
    extra = {} if max_inbound is None else {"resource_manager": resource_manager(max_inbound)}
    host = new_host(
        key_pair=kp,
        sec_opt=sec_opt,
        muxer_opt=muxer_opt,
        connection_config=connection_config(dial_timeout_s, None if max_inbound is None else max_inbound + 256,
                                            inbound_upgrade_timeout_s=limits.handshake_deadline_s + 5.0),
        negotiate_timeout=negotiate_timeout_s,
        enable_mDNS=False,
        enable_upnp=False,
        **extra,
    )
    install(host, sec_opt, muxer_opt, negotiate_timeout_s, limits)
    return host


def parse_listen_addrs(addrs: Sequence[str]) -> list[multiaddr.Multiaddr]:
    out = []
    for addr in addrs:
        try:
            out.append(multiaddr.Multiaddr(addr))
        except (ValueError, TypeError, multiaddr.exceptions.Error) as exc:
            raise ConfigError("listen", f"invalid multiaddr {addr!r}: {exc}") from None
    return out


def parse_peer_addr(addr: str, key: str = "cpm") -> PeerInfo:
    """``/ip4/…/tcp/…/p2p/<id>`` → PeerInfo; a ConfigError naming ``key`` otherwise."""
    try:
        return info_from_p2p_addr(multiaddr.Multiaddr(addr))
    except (ValueError, TypeError, KeyError, multiaddr.exceptions.Error) as exc:
        raise ConfigError(key, f"not a /p2p/ multiaddr {addr!r}: {exc}") from None


def full_addrs(host: IHost) -> list[str]:
    """Listen addresses with the /p2p/<peer-id> suffix, as operators paste them."""
    pid = host.get_id().to_base58()
    out = []
    for addr in host.get_addrs():
        text = str(addr)
        out.append(text if "/p2p/" in text else f"{text}/p2p/{pid}")
    return out


def listening_addrs(host: IHost, listen: Sequence[str]) -> list[str]:
    """``full_addrs`` of a host that has just started listening; an ``OSError`` when it
    listens nowhere. py-libp2p logs a failed bind (port taken) and carries on with no
    address, so both binaries check here and exit with one clear line."""
    addrs = full_addrs(host)
    if not addrs:
        raise OSError(f"could not listen on {', '.join(listen)} (address in use?)")
    return addrs


def peer_id_of(peer: str) -> ID:
    return ID.from_base58(peer)
