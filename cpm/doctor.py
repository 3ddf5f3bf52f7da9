"""``knexa-cpm doctor`` and ``knexa-cpm config show``: diagnose a CPM home.

Why: the CPM is the one component every organisation depends on; its operator needs a
single command that says whether the config, key and database are sound, whether its
ports are free (or held by this very CPM, which then must answer on
``/knexa/cpm/1.0.0`` with its own key), and how admission is set up. The live probe
uses a throwaway identity and sends a ``PeerLookup``, which every CPM refuses with a
signed ``Error{unauthorized}`` without changing any state — so probing a production node
is safe. Exit code: the first failing check's (3 config/database, 4 a running node that
does not answer, 1 other); warnings exit 0.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import click

from cpm import config as C
from cpm.store import scheme_of
from p2p import checks as K
from protocol.errors import ConfigError

PROBE_LISTEN = "/ip4/127.0.0.1/tcp/0"


def check_database(home: Path) -> K.Check:
    """The store the home's config names exists, is a CPM database in its durable mode
    (SQLite: WAL, so admin commands from another process never block the node for long;
    PostgreSQL: fsync on, a primary), passes its integrity check; which backend it is and
    summary counts. Read-only (``cpm.store.open_home_store(readonly=True)``)."""
    from cpm.store import StoreError, StoreNotFound, StoreUnavailable, open_home_store

    try:
        store = open_home_store(home, readonly=True)
    except ConfigError as exc:  # the config check above reports it
        return K.skip("database", f"needs a valid config (its `store` key names the database): {exc}")
    except StoreNotFound as exc:
        return K.fail("database", str(exc), f"knexa-cpm init --home {home}", K.EXIT_CONFIG)
    except StoreUnavailable as exc:
        return K.fail("database", str(exc), "start the database server, or fix `store` in config.toml",
                      K.EXIT_RUNTIME)
    except StoreError as exc:
        return K.fail("database", str(exc), "restore the latest backup (docs/operations.md: backups)", K.EXIT_CONFIG)
    try:
        health = store.health()
    except StoreError as exc:
        return K.fail("database", str(exc), "restore the latest backup (docs/operations.md: backups)", K.EXIT_CONFIG)
    finally:
        store.close()
    where, version = health.location, health.schema_version
    if health.backend:
        where = f"{health.backend} at {where}"
    if version != health.schema_expected:
        return K.fail("database", f"{where}: schema version {'?' if version is None else version}, this build "
                      f"needs {health.schema_expected}", "run the knexa version that wrote it, or restore a backup "
                      "made by this version (docs/operations.md: upgrading)", K.EXIT_CONFIG)
    if health.integrity != "ok":
        return K.fail("database", f"{where}: integrity check says {health.integrity[:200]}",
                      "stop the node and restore the latest backup (docs/operations.md: backups)", K.EXIT_CONFIG)
    counts = health.counts
    detail = (f"{where} ok ({counts.get('admitted', 0)} admitted, {counts.get('revoked', 0)} revoked, "
              f"{counts.get('rounds', 0)} rounds)")
    if health.durability_warning is not None:
        return K.warn("database", f"{detail}; {health.durability_warning}", health.durability_hint)
    return K.ok("database", f"{detail}, {health.durability}")


def check_lease(home: Path) -> K.Check:
    """Replicas (``lease_s > 0``): who holds the round lease, by the database's clock. A
    lapsed or never-taken lease means no replica runs the rounds now (they pause;
    ingest goes on). Read-only; docs/operations.md §13."""
    from cpm.lease import lease_status
    from cpm.store import StoreError, open_home_store

    try:
        store = open_home_store(home, readonly=True)
        try:
            st = lease_status(store)
        finally:
            store.close()
    except StoreError as exc:  # the database check reports the store itself
        return K.skip("lease", f"needs a readable PostgreSQL store: {exc}")
    if st["holder"] is None:
        return K.warn("lease", "no replica has held the round lease yet", "start `knexa-cpm serve --lease S`")
    if not st["live"]:
        return K.warn("lease", f"lapsed {-st['expires_in_s']:.1f} s ago (last holder {st['holder']}, epoch "
                      f"{st['epoch']}): no replica runs the rounds", "start a replica (docs/operations.md §13)")
    return K.ok("lease", f"held by {st['holder']} (epoch {st['epoch']}), {st['expires_in_s']:.1f} s left")


def check_admission(cfg: C.CpmConfig) -> K.Check:
    admins = f"; {len(cfg.admins)} admin key(s) for --remote" if cfg.admins else ""
    if cfg.open_admission:
        return K.warn("admission", f"open_admission = true: every peer that registers is admitted{admins}",
                      "only for a local harness: set open_admission = false and `knexa-cpm admit` each member")
    return K.ok("admission", f"allowlist (knexa-cpm admit/revoke){admins}")


def probe_targets(listen: list[str], extra: tuple[str, ...]) -> list[tuple[str, int]]:
    """Where a running node of this home would answer, with the exit code if it does not:
    our own fixed listen ports (a wildcard host probed via loopback; held by someone
    else → 1, the node cannot start) and the ``--addr`` ones (no answer → 4)."""
    out = []
    for addr in listen:
        parts = addr.strip("/").split("/")
        if len(parts) >= 4 and parts[2] == "tcp" and parts[3] != "0":
            host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(parts[1], parts[1])
            out.append((f"/{parts[0]}/{host}/tcp/{parts[3]}", K.EXIT_RUNTIME))
    return out + [(a.split("/p2p/")[0], K.EXIT_UNREACHABLE) for a in extra]


async def probe_node(addr: str, expected_peer: str, timeout_s: float, code: int = K.EXIT_UNREACHABLE) -> K.Check:
    """Dial ``addr`` as a stranger, ask a ``PeerLookup``, expect a signed refusal."""
    import multiaddr
    import trio
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import PeerInfo

    from p2p.host import build_host, parse_listen_addrs
    from p2p.streams import FramedStream
    from protocol.envelope import Identity, open_envelope, seal
    from protocol.errors import KnexaError
    from protocol.ids import CPM_PROTOCOL, MAX_FRAME_CPM
    from protocol.messages import Error, PeerLookup

    stranger = Identity.generate()
    host = build_host(stranger.seed, dial_timeout_s=timeout_s)
    info = PeerInfo(ID.from_base58(expected_peer), [multiaddr.Multiaddr(addr)])
    name = "running node"
    async with host.run(parse_listen_addrs([PROBE_LISTEN])):
        try:
            with trio.fail_after(timeout_s):
                await host.connect(info)
                stream = await host.new_stream(info.peer_id, [CPM_PROTOCOL])
                framed = FramedStream(stream, MAX_FRAME_CPM)
                try:
                    await framed.write_frame(seal(PeerLookup(peer_id=stranger.peer_id), stranger))
                except KnexaError:
                    pass  # refused before reading: the answer is still buffered
                raw = await framed.read_frame()
                await framed.close()
        except trio.TooSlowError:
            return K.fail(name, f"{addr}: no answer within {timeout_s} s",
                          "the port is held by a process that does not answer as this CPM", code)
        except Exception as exc:  # noqa: BLE001 — any dial failure is the diagnosis itself
            return K.fail(name, f"{addr}: not this CPM ({type(exc).__name__})",
                          "another process (or a CPM with another key) holds this port", code)
    if raw is None:
        return K.fail(name, f"{addr}: closed without answering", "look at the node's log", code)
    try:
        _env, reply = open_envelope(raw, expected_sender=expected_peer, allowed=(Error,))
    except KnexaError as exc:
        return K.fail(name, f"{addr}: answer not signed by this home's key ({exc.code})",
                      "another CPM holds the port", K.EXIT_RUNTIME)
    assert isinstance(reply, Error)
    return K.ok(name, f"{addr}: answering {CPM_PROTOCOL} as {expected_peer} (Noise + signed reply)")


def run_checks(home: Path, addrs: tuple[str, ...] = ()) -> list[K.Check]:
    import trio

    home = Path(home)
    out = [K.check_home(home)]
    try:
        cfg = C.load_config(home)
        out.append(K.ok("config", f"{C.config_path(home)} valid (strategy={cfg.strategy}, listen={', '.join(cfg.listen)})"))
    except ConfigError as exc:
        hint = (f"knexa-cpm init --home {home}" if exc.key == "home"
                else f"edit {C.config_path(home)} (docs/configuration.md lists every key)")
        out.append(K.fail("config", str(exc), hint, K.EXIT_CONFIG))
        cfg = None

    def peer_of(seed: bytes) -> str:
        from protocol.envelope import Identity

        return Identity(seed).peer_id

    key_path = C.identity_path(home)
    out.append(K.check_key_file(key_path, peer_of))
    out.append(check_database(home))
    if cfg is None:
        return out + [K.skip("listen", "needs a valid config")]
    if cfg.lease_s > 0:
        out.append(check_lease(home))
    out.append(check_admission(cfg))
    seed = K.read_seed(key_path)
    running = False
    binds = K.check_bindable(cfg.listen)
    in_use = [c for c in binds if c.status == K.FAIL and "in use" in c.detail]
    out += [c for c in binds if c not in in_use]
    targets = probe_targets(cfg.listen, addrs) if (in_use or addrs) else []
    if targets and seed is not None:
        for addr, code in targets:
            probe = trio.run(functools.partial(probe_node, addr, peer_of(seed), cfg.request_timeout_s, code))
            running = running or probe.status == K.OK
            out.append(probe)
    else:
        out += in_use
    out.append(K.check_metrics(cfg.metrics_port, running=running, marker="knexa_cpm_round",
                               flag="`serve --metrics-port N`"))
    local = scheme_of(cfg.store) == "sqlite"
    out.append(K.check_disk(home, warn_below=1 * K.GIB, fail_below=100 * K.MIB,
                            purpose="SQLite database + WAL" if local else "home (key, config, logs)"))
    return out


@click.command("doctor")
@click.option("--home", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="CPM home directory to diagnose.")
@click.option("--addr", "addrs", multiple=True, metavar="MADDR",
              help="Also probe a running node at this multiaddr (repeatable), e.g. its ready-file address.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor_command(home: Path, addrs: tuple[str, ...], as_json: bool) -> None:
    """Check config, key, database, admission policy, ports, a running node, disk.

    One line per check (ok / WARN / FAIL / skip) with a fix. Exit code: the first
    failing check's (3 config/database, 4 a running node does not answer, 1 other);
    0 when there are only warnings.
    """
    from p2p.logs import configure_logging

    configure_logging("console", level="error", stream=sys.stderr)
    started = time.monotonic()
    results = run_checks(home, addrs)
    if as_json:
        click.echo(K.to_json(results))
    else:
        K.render(f"knexa-cpm doctor — {home} ({time.monotonic() - started:.1f} s)", results, click.echo)
    sys.exit(K.exit_code(results))


@click.group("config")
def config_group() -> None:
    """Inspect the effective configuration."""


@config_group.command("show")
@click.option("--home", required=True, type=click.Path(file_okay=False, path_type=Path), help="CPM home directory.")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of TOML.")
def config_show(home: Path, as_json: bool) -> None:
    """Print config.toml with every default filled in (the CPM reads no environment
    overrides; `serve` flags override at start). Exit 3 if it is invalid."""
    import tomli_w

    try:
        cfg = C.load_config(home)
    except ConfigError as exc:
        click.echo(f"knexa-cpm: error: {exc}", err=True)
        sys.exit(K.EXIT_CONFIG)
    data = cfg.to_toml()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"# effective configuration of {C.config_path(home)}")
    click.echo(tomli_w.dumps(data), nl=False)


__all__ = ["doctor_command", "config_group", "run_checks"]
