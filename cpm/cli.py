"""``knexa-cpm`` — run and administer the CPM node.

Exit codes (every command; docs/cpm.md):

==== =====================================================
0    ok
1    runtime error (e.g. the listen port is taken)
2    usage error (bad flag, malformed peer ID)
3    configuration error (bad/missing config.toml, key, DB)
4    cannot reach the CPM (``--remote``)
5    not admitted / unauthorized (``--remote`` with a non-admin key)
==== =====================================================

Admin commands act on the home's store (``cpm.store``: its SQLite file in WAL mode, or the
PostgreSQL database its config's ``store`` names),
which the running node re-reads per request, so ``admit``/``revoke`` take effect
without a restart. ``--remote MADDR --key
FILE`` sends the same operation over ``/knexa/admin/1.0.0`` instead. ``release`` is the
exception: the running node holds the teacher reputation in memory and would overwrite
a release written to its file, so it needs ``--remote`` — or ``--offline``, the
operator's statement that the node is stopped (cpm.admin).
"""

from __future__ import annotations

import csv
import functools
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import structlog

from cpm import config as C
from cpm.store import Store, StoreError, StoreUnavailable, open_home_store, open_store, store_location
from p2p.process import ExitCode, HomeLock, exit_code_for, first_leaf, run_cli, version_option
from protocol.errors import ConfigError, KnexaError

log = structlog.get_logger(__name__)


def _exit_code(exc: BaseException) -> int:
    """A store that is unusable is a configuration problem (3); one that is busy or out
    of disk right now is a runtime one (1)."""
    if isinstance(exc, StoreUnavailable):
        return ExitCode.RUNTIME
    return ExitCode.CONFIG if isinstance(exc, StoreError) else exit_code_for(exc)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map typed errors to the exit-code table with one line on stderr."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, click.Abort, BrokenPipeError):
            raise
        except (KnexaError, StoreError, OSError, BaseExceptionGroup) as exc:
            leaf = first_leaf(exc)
            if isinstance(leaf, (click.exceptions.Exit, click.ClickException)):
                raise leaf from None
            code = _exit_code(leaf)
            click.echo(f"knexa-cpm: error: {leaf}", err=True)
            sys.exit(code)

    return wrapper


def _peer_arg(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return C.validate_peer_id(value)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None


def _quiet_logs(fmt: str = "auto") -> None:
    from p2p.logs import configure_logging

    configure_logging(fmt, level="warning", stream=sys.stderr)


def _home_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--home", type=click.Path(file_okay=False, path_type=Path), required=True,
                        help="CPM home directory (config.toml, identity.key, cpm.db).")(fn)


def _remote_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--key", "key_file", type=click.Path(dir_okay=False, path_type=Path),
                      help="32-byte Ed25519 seed of an admin identity (with --remote).")(fn)
    return click.option("--remote", metavar="MADDR", help="Use /knexa/admin/1.0.0 on this CPM (…/p2p/<id>).")(fn)


_wide_option = click.option("--wide", is_flag=True, help="Full peer IDs in the table (--json always has them).")


def _open_store(home: Path) -> Store:
    C.load_config(home)  # a home without a valid config is a config error (exit 3)
    return open_home_store(home)


def _remote(remote: str, key_file: Path | None, message: Any) -> Any:
    import trio

    from cpm.admin import remote_admin

    if key_file is None:
        raise click.UsageError("--remote needs --key KEYFILE")
    ident = C.load_identity_file(key_file, key="key")
    return trio.run(functools.partial(remote_admin, remote, ident, message))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@version_option("knexa-cpm")
def cli() -> None:
    """KNEXA Central Profiler/Matchmaker (non-aggregating, restart-safe)."""


@cli.command()
@_home_option
@click.option("--open/--closed", "open_admission", default=None,
              help="Admit every peer that registers (local harness) / only admitted peers (the default).")
@click.option("--transfer-hash", help="SHA-256 hex of the shared transfer set the daemons use.")
@click.option("--strategy", type=click.Choice(C.STRATEGIES))
@click.option("--max-rounds", type=click.IntRange(min=0))
@click.option("--k-pairs", type=click.IntRange(min=0))
@click.option("--quorum", type=float)
@click.option("--min-agents", type=click.IntRange(min=2))
@click.option("--round-timer", "round_timer_s", type=float)
@click.option("--directive-ttl", "directive_ttl_s", type=float)
@click.option("--transfer-size", type=click.IntRange(min=1))
@click.option("--seed", type=int)
@click.option("--listen", multiple=True, help="Listen multiaddr (repeatable).")
@click.option("--admin", "admins", multiple=True, callback=lambda c, p, v: [_peer_arg(c, p, x) for x in v],
              help="Peer ID allowed on /knexa/admin/1.0.0 (repeatable).")
@click.option("--store", metavar="LOCATION",
              help="Where the state lives (default: <home>/cpm.db): sqlite:PATH or postgresql://user@host/db.")
@click.option("--force", is_flag=True, help="Rewrite config.toml of an existing home (the key is kept).")
@handle_errors
def init(home: Path, open_admission: bool | None, transfer_hash: str | None, force: bool, listen: tuple[str, ...],
         admins: list[str], store: str | None, **overrides: Any) -> None:
    """Create the home: config.toml, identity key (0600) and the store.

    The store is the home's SQLite database, or the tables in the PostgreSQL database
    that --store names (created first: config.toml is written only once that worked)."""
    _quiet_logs()
    existed = C.config_path(home).exists()
    if existed and not force:
        raise ConfigError("home", f"{home} is already initialized (use --force to rewrite config.toml)")
    # --force changes what was asked and keeps the rest: a pinned listen port, the
    # strategy, the admins — members know the CPM by its address
    cfg = C.load_config(home) if existed else C.CpmConfig()
    home.mkdir(parents=True, exist_ok=True)
    if transfer_hash is not None:
        cfg.transfer_hash = transfer_hash.lower()
    if listen:
        cfg.listen = list(listen)
    if admins or not existed:
        cfg.admins = list(admins)
    if open_admission is not None:
        cfg.open_admission = open_admission
    if store is not None:
        cfg.store = C.validate_store(store)
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    if cfg.transfer_hash == C.default_transfer_hash() and cfg.transfer_size != C.DEFAULT_TRANSFER_SIZE:
        cfg.transfer_hash = C.default_transfer_hash(cfg.transfer_size)
    C.validate(cfg)
    open_store(store_location(home, cfg.store)).close()  # created or migrated before the home names it
    C.save_config(home, cfg)
    ident = C.load_identity(home) if C.identity_path(home).exists() else C.create_identity(home)
    click.echo(ident.peer_id)
    if existed:
        click.echo(f"rewrote {C.config_path(home)}; a running `knexa-cpm serve` reads it only at start: "
                   "restart it", err=True)


@cli.command()
@_home_option
@click.option("--listen", multiple=True, help="Override listen multiaddrs (repeatable).")
@click.option("--strategy", type=click.Choice(C.STRATEGIES))
@click.option("--ready-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Written atomically (JSON: peer_id, addrs, pid, metrics_port) once listening.")
@click.option("--log-format", type=click.Choice(C.LOG_FORMATS))
@click.option("--metrics-port", type=click.IntRange(0, 65535))
@click.option("--store", metavar="LOCATION", help="Override the config's store location for this run.")
@click.option("--lease", "lease_s", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Run as one of several replicas on the PostgreSQL store (lease_s; 0 = single node).")
@handle_errors
def serve(home: Path, listen: tuple[str, ...], strategy: str | None, ready_file: Path | None,
          log_format: str | None, metrics_port: int | None, store: str | None, lease_s: float | None) -> None:
    """Run the CPM node until SIGINT/SIGTERM (then exit 0)."""
    import trio

    from p2p.host import parse_listen_addrs
    from p2p.logs import configure_logging

    cfg = C.load_config(home)
    if listen:
        cfg.listen = list(listen)
    if strategy:
        cfg.strategy = strategy
    if log_format:
        cfg.log_format = log_format
    if metrics_port is not None:
        cfg.metrics_port = metrics_port
    if store is not None:
        cfg.store = store
    if lease_s is not None:
        cfg.lease_s = lease_s
    C.validate(cfg)
    parse_listen_addrs(cfg.listen)
    configure_logging(cfg.log_format)
    ident = C.load_identity(home)
    with HomeLock(home, "knexa-cpm serve"):
        db = open_store(store_location(home, cfg.store))
        log.info("cpm.store.opened", location=db.location)
        try:
            trio.run(_serve, cfg, ident, db, ready_file)
        finally:
            db.close()


async def _serve(cfg: C.CpmConfig, ident: Any, store: Store, ready_file: Path | None) -> None:
    import trio

    from cpm.service import CpmService

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        service = CpmService(cfg, ident, store)
        async with trio.open_nursery() as nursery:
            addrs = await nursery.start(service.run)
            for addr in addrs:
                click.echo(addr)
            sys.stdout.flush()
            if ready_file is not None:
                _write_ready(ready_file, {"peer_id": ident.peer_id, "addrs": addrs, "pid": os.getpid(),
                                          "metrics_port": service.metrics_port})
            async for signum in signals:
                log.info("cpm.shutdown", signal=signal.Signals(signum).name)
                break
            nursery.cancel_scope.cancel()


def _write_ready(path: Path, data: dict[str, Any]) -> None:
    from p2p.files import atomic_write

    atomic_write(path, json.dumps(data), mode=0o644, durable=False)  # recreated at every start


@cli.command()
@click.argument("peer_id", callback=_peer_arg)
@click.option("--org", default="", help="Organisation label.")
@_home_option
@_remote_options
@handle_errors
def admit(peer_id: str, org: str, home: Path, remote: str | None, key_file: Path | None) -> None:
    """Admit PEER_ID (takes effect on the running node immediately)."""
    from protocol.envelope import now_ms
    from protocol.messages import AdminAdmit

    _quiet_logs()
    if remote:
        _remote(remote, key_file, AdminAdmit(peer_id=peer_id, org=org))
    else:
        store = _open_store(home)
        store.admit(peer_id, org, now_ms())
        store.close()
    click.echo(f"admitted {peer_id}")


@cli.command()
@click.argument("peer_id", callback=_peer_arg)
@_home_option
@_remote_options
@handle_errors
def revoke(peer_id: str, home: Path, remote: str | None, key_file: Path | None) -> None:
    """Revoke PEER_ID: its next request gets `unauthorized`."""
    from protocol.envelope import now_ms
    from protocol.messages import AdminRevoke

    _quiet_logs()
    if remote:
        _remote(remote, key_file, AdminRevoke(peer_id=peer_id))
    else:
        store = _open_store(home)
        store.revoke(peer_id, now_ms())
        store.close()
    click.echo(f"revoked {peer_id}")


@cli.command()
@click.argument("peer_id", callback=_peer_arg)
@_home_option
@_remote_options
@click.option("--offline", is_flag=True,
              help="The node is stopped: edit its database directly (a running node would overwrite it).")
@handle_errors
def release(peer_id: str, home: Path, remote: str | None, key_file: Path | None, offline: bool) -> None:
    """Lift PEER_ID's teacher quarantine; its evidence starts afresh (docs/cpm.md).
    Exit 1 if it is not quarantined."""
    from protocol.envelope import now_ms
    from protocol.messages import AdminRelease

    _quiet_logs()
    if remote and offline:
        raise click.UsageError("--remote and --offline exclude each other")
    if remote:
        _remote(remote, key_file, AdminRelease(peer_id=peer_id))
    elif offline:
        from cpm.admin import release_offline

        store = _open_store(home)
        try:
            release_offline(store, peer_id, now_ms())
        finally:
            store.close()
    else:
        raise click.UsageError("release changes the running node's memory: use --remote MADDR --key FILE "
                               "(or --offline when the node is stopped)")
    click.echo(f"released {peer_id}")


def _listing(what: str, home: Path, as_json: bool, remote: str | None, key_file: Path | None,
             round_: int = -1, wide: bool = False) -> None:
    from cpm.admin import from_wire_rows, query_rows
    from protocol.messages import AdminQuery

    _quiet_logs()
    if remote:
        rows = from_wire_rows(_remote(remote, key_file, AdminQuery(what=what, round=round_)).rows)
    else:
        store = _open_store(home)
        try:
            rows = query_rows(store, what, round_, max_rounds=C.load_config(home).max_rounds)
        finally:
            store.close()
    if as_json:
        click.echo(json.dumps(rows[0] if what == "stats" and rows else rows, indent=2, default=str))
        return
    if what == "stats":
        for key, value in (rows[0] if rows else {}).items():
            click.echo(f"{key:20} {value}")
        return
    if not rows:
        click.echo("(no quarantined teachers)" if what == "quarantine" else f"(no {what})")
        return
    cols = list(rows[0])
    cells = [{c: _fmt(c, r[c], wide) for c in cols} for r in rows]
    widths = {c: max(len(c), *(len(cell[c]) for cell in cells)) for c in cols}
    click.echo("  ".join(c.ljust(widths[c]) for c in cols))
    for cell in cells:
        click.echo("  ".join(cell[c].ljust(widths[c]) for c in cols))


PEER_ID_PREFIX = "12D3KooW"  # Ed25519 peer IDs, 52 characters


def _fmt(column: str, v: Any, wide: bool = False) -> str:
    """A table cell for people: UTC times (``*_at``, ``last_seen``: epoch ms in the store
    and in ``--json``) instead of milliseconds, peer IDs cut to
    their first 12 and last 4 characters (``--wide`` and ``--json`` keep them whole)."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool) and (column.endswith("_at") or column == "last_seen"):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(v / 1000))
    text = str(v)
    if not wide and text.startswith(PEER_ID_PREFIX) and len(text) > 20:
        return f"{text[:12]}…{text[-4:]}"
    return text


for _what, _doc in (("agents", "List agents and their admission state."),
                    ("rounds", "List rounds with profile/pair/feedback counts."),
                    ("stats", "Totals: current round and state, directives by state, mean reward."),
                    ("quarantine", "Quarantined teachers with the evidence that stopped them.")):

    def _make(what: str, doc: str) -> None:
        @cli.command(name=what, help=doc)
        @_home_option
        @click.option("--json", "as_json", is_flag=True)
        @_wide_option
        @_remote_options
        @handle_errors
        def _cmd(home: Path, as_json: bool, wide: bool, remote: str | None, key_file: Path | None) -> None:
            _listing(what, home, as_json, remote, key_file, wide=wide)

    _make(_what, _doc)


@cli.command()
@click.option("--round", "round_", type=int, default=-1, help="Only this round (default: all).")
@_home_option
@click.option("--json", "as_json", is_flag=True)
@_wide_option
@_remote_options
@handle_errors
def pairs(round_: int, home: Path, as_json: bool, wide: bool, remote: str | None, key_file: Path | None) -> None:
    """Directives (teacher → student, arm) with their feedback and reward."""
    _listing("pairs", home, as_json, remote, key_file, round_, wide=wide)


@cli.command()
@_home_option
@click.option("--interval", "interval_s", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="Seconds between refreshes.")
@click.option("--count", type=click.IntRange(min=0), default=0, help="Stop after N refreshes (0: until Ctrl-C).")
@_remote_options
@handle_errors
def watch(home: Path, interval_s: float, count: int, remote: str | None, key_file: Path | None) -> None:
    """Live view of the federation: rounds, this round's pairs and rewards, agents up or
    down, quarantined teachers — refreshed in place (read-only)."""
    from rich.console import Console

    from cpm.admin import from_wire_rows, query_rows
    from cpm.watch import watch as run_watch
    from protocol.messages import AdminQuery

    _quiet_logs()
    if remote:
        def fetch(what: str, round_: int) -> list[dict[str, Any]]:
            return from_wire_rows(_remote(remote, key_file, AdminQuery(what=what, round=round_)).rows)
    else:
        max_rounds = C.load_config(home).max_rounds

        def fetch(what: str, round_: int) -> list[dict[str, Any]]:
            store = open_home_store(home, readonly=True)  # per refresh: the node commits meanwhile
            try:
                return query_rows(store, what, round_, max_rounds=max_rounds)
            finally:
                store.close()

    try:
        run_watch(fetch, Console(), interval_s=interval_s, count=count)
    except KeyboardInterrupt:
        pass


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["json", "csv"]), required=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@_home_option
@handle_errors
def export(fmt: str, out: Path, home: Path) -> None:
    """Export for analysis. json: agents, rounds, pairs, profiles, stats;
    csv: one row per directive with its feedback and reward."""
    from cpm.admin import query_rows

    _quiet_logs()
    store = _open_store(home)
    try:
        if fmt == "json":
            data = {what: query_rows(store, what) for what in ("agents", "rounds", "pairs")}
            data["profiles"] = store.list_profiles()
            data["stats"] = query_rows(store, "stats", max_rounds=C.load_config(home).max_rounds)[0]
            out.write_text(json.dumps(data, indent=2, default=str))
        else:
            rows = query_rows(store, "pairs")
            with out.open("w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["round", "directive_id"])
                writer.writeheader()
                writer.writerows(rows)
    finally:
        store.close()
    click.echo(str(out))


@cli.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for report.json, rounds.png and pairs_heatmap.png (created).")
@_home_option
@handle_errors
def report(out: Path, home: Path) -> None:
    """Plots of the federation from the CPM's database (read-only, the node may run):
    rounds.png (mean self-reported pass@1 per round, cumulative raw reward),
    pairs_heatmap.png (teacher × student counts), report.json (the numbers they show)."""
    from cpm.report import open_report_store, write_report

    _quiet_logs()
    store, location = open_report_store(home)
    try:
        paths = write_report(store, out, location=location)
    finally:
        store.close()
    for path in paths.values():
        click.echo(str(path))


@cli.command(name="admin-key")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Key file to create (mode 0600; never overwritten).")
@handle_errors
def admin_key(out: Path) -> None:
    """Create an operator key for --remote admin commands; prints its peer ID.

    Allow it on the node with `knexa-cpm init --home H --force --admin <peer-id>` (then
    restart `serve`), and use it as `--remote <cpm-addr> --key FILE`."""
    from p2p.keyfile import create_identity

    click.echo(create_identity(out).peer_id)  # refuses an existing file (exit 3)


@cli.command()
@click.option("--from", "source", required=True, metavar="LOCATION",
              help="The store to copy (read-only), e.g. sqlite:/path/cpm.db. Stop its node first.")
@click.option("--to", "destination", required=True, metavar="LOCATION",
              help="An empty store, e.g. postgresql://user@host/db (created or migrated here).")
@handle_errors
def migrate(source: str, destination: str) -> None:
    """Copy a CPM store into an empty one and verify it (rows, counts, bandit state).

    One transaction on the destination: nothing is written unless every row read back
    equals the source (cpm.storecopy; docs/operations.md, "High availability")."""
    from cpm.storecopy import copy_store
    from protocol.envelope import now_ms

    _quiet_logs()
    C.validate_store(source, "from")
    C.validate_store(destination, "to")
    report = copy_store(source, destination, now_ms=now_ms())
    counts = report.counts
    click.echo(f"copied {report.source} → {report.destination}: agents={counts['agents']} "
               f"profiles={counts['profiles']} rounds={counts['rounds']} directives={counts['directives']} "
               f"feedback={counts['feedback']} bandit_state={'yes' if report.bandit_state else 'none'}; verified")


@cli.command(name="peer-id")
@_home_option
@handle_errors
def peer_id(home: Path) -> None:
    """Print the CPM's peer ID (daemons need it to verify directives)."""
    click.echo(C.load_identity(home).peer_id)


from cpm.doctor import config_group, doctor_command  # noqa: E402 — registered after the core commands

cli.add_command(doctor_command)
cli.add_command(config_group)


def main() -> None:
    run_cli(cli, "knexa-cpm")


if __name__ == "__main__":
    main()
