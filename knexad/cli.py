"""``knexad`` — the per-organisation daemon's command line.

Exit codes (docs/knexad.md; the same table for every KNEXA binary):
0 ok · 1 runtime error · 2 usage · 3 config error · 4 cannot reach peer/CPM ·
5 not admitted/unauthorized.

Heavy imports (libp2p ~1 s, torch for ML agents) happen inside the commands that need
them, so ``knexad status`` and ``--help`` stay instant.
"""

from __future__ import annotations

import dataclasses

import json
import sys
from pathlib import Path

import click
import structlog

from knexad.config import (
    AGENT_BUDGETS,
    CONFIG_FILE,
    KEY_FILE,
    LOG_FORMATS,
    DaemonConfig,
    from_mapping,
    load_config,
    write_config,
)
from knexad.identity import create_identity, load_identity
from knexad.state import pid_alive, read_state
from p2p.process import AlreadyRunning, ExitCode, HomeLock, run_cli, version_option
from protocol.errors import ConfigError

log = structlog.get_logger(__name__)

home_option = click.option(
    "--home",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Daemon home directory (config.toml, identity.key, outbox/, state.json).",
)


def _config_error(exc: ConfigError) -> None:
    click.echo(f"config error: {exc}", err=True)
    sys.exit(ExitCode.CONFIG)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@version_option("knexad")
def main() -> None:
    """KNEXA daemon: one organisation's agent on the federation."""


@main.command()
@home_option
@click.option("--cpm", "cpm", required=True, multiple=True,
              help="CPM multiaddr, including /p2p/<peer-id>; repeat for each replica of the CPM.")
@click.option("--model", default="synthetic", show_default=True, help="synthetic | tiny-qwen2 | tiny-gpt2 | tiny-neox | tiny-bloom | PATH")
@click.option("--data", default="builtin", show_default=True, help="Data spec handed to the agent.")
@click.option("--org", default="default", show_default=True, help="Organisation name sent to the CPM.")
@click.option("--listen", multiple=True, help="Listen multiaddr (repeatable); default /ip4/127.0.0.1/tcp/0.")
@click.option("--agent-index", type=int, default=0, show_default=True)
@click.option("--n-agents", type=int, default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--budget", type=click.Choice(AGENT_BUDGETS), default="standard", show_default=True,
              help="ML training budget (local / KD steps): fast 100/60, standard 200/150, thorough 400/300.")
@click.option("--force", is_flag=True, help="Overwrite an existing config.toml (the key is never overwritten).")
def init(home: Path, cpm: tuple[str, ...], model: str, data: str, org: str, listen: tuple[str, ...],
         agent_index: int, n_agents: int, seed: int, budget: str, force: bool) -> None:
    """Write config.toml and a fresh identity key (mode 0600) into HOME."""
    if (home / CONFIG_FILE).exists() and not force:
        click.echo(f"config error: {home / CONFIG_FILE} exists (use --force to overwrite)", err=True)
        sys.exit(ExitCode.CONFIG)
    defaults = DaemonConfig(cpm=cpm[0])
    raw = {
        "cpm": cpm[0] if len(cpm) == 1 else list(cpm),
        "org": org,
        "listen": list(listen) or list(defaults.listen),
        "agent": {"model": model, "data": data, "index": agent_index, "n_agents": n_agents, "seed": seed,
                  "budget": budget},
    }
    try:
        cfg = from_mapping(raw)  # validated before anything is written: a refused init leaves no home
        home.mkdir(parents=True, exist_ok=True)
        key_path = home / KEY_FILE
        identity = load_identity(key_path) if key_path.exists() else create_identity(key_path)
    except ConfigError as exc:
        _config_error(exc)
        return
    write_config(home, cfg)
    click.echo(f"wrote {home / CONFIG_FILE}")
    click.echo(f"peer id: {identity.peer_id}")
    click.echo(f"admit it at the CPM: knexa-cpm admit {identity.peer_id} --org {org} --home <cpm-home>")


@main.command("peer-id")
@home_option
def peer_id(home: Path) -> None:
    """Print this daemon's libp2p peer ID."""
    try:
        identity = load_identity(home / KEY_FILE)
    except ConfigError as exc:
        _config_error(exc)
        return
    click.echo(identity.peer_id)


@main.command()
@home_option
@click.option("--ready-file", type=click.Path(dir_okay=False, path_type=Path), help="Written (atomically) with the full multiaddrs once listening.")
@click.option("--log-format", type=click.Choice(LOG_FORMATS), help="Override log_format from config.toml.")
@click.option("--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--metrics-port", type=click.IntRange(0, 65535), help="Serve Prometheus /metrics on 127.0.0.1:PORT (overrides metrics_port; 0 = off).")
def run(home: Path, ready_file: Path | None, log_format: str | None, log_level: str, metrics_port: int | None) -> None:
    """Run the daemon until SIGINT/SIGTERM; prints its full multiaddr on stdout."""
    from p2p.logs import configure_logging

    try:
        cfg = load_config(home)
        identity = load_identity(home / KEY_FILE)
    except ConfigError as exc:
        _config_error(exc)
        return
    if metrics_port is not None:
        cfg = dataclasses.replace(cfg, metrics_port=metrics_port)
    configure_logging(log_format or cfg.log_format, log_level)
    from p2p.memory import keep_freed_buffers

    keep_freed_buffers()  # knowledge chunks reuse warm pages instead of faulting new ones (p2p/memory.py)
    try:
        with HomeLock(home, "knexad run"):
            code = _run_daemon(home, cfg, identity, ready_file)
    except AlreadyRunning as exc:
        log.error("daemon.already_running", error=str(exc))
        click.echo(f"knexad: error: {exc}", err=True)
        code = ExitCode.RUNTIME
    except (KeyboardInterrupt, BaseExceptionGroup) as exc:  # SIGINT before the signal watcher
        if not _only_interrupts(exc):
            raise
        log.info("daemon.interrupted")
        code = ExitCode.OK
    sys.exit(code)


def _only_interrupts(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_interrupts(e) for e in exc.exceptions)
    return isinstance(exc, KeyboardInterrupt)


def _run_daemon(home: Path, cfg: DaemonConfig, identity, ready_file: Path | None) -> int:
    import trio

    from knexad.agents import build_agent
    from knexad.daemon import Daemon

    try:
        agent = build_agent(cfg)
    except ConfigError as exc:
        log.error("daemon.config_error", key=exc.key, error=str(exc))
        return ExitCode.CONFIG
    except (ImportError, ValueError, OSError) as exc:
        log.error("agent.build_failed", model=cfg.agent.model, error=f"{type(exc).__name__}: {exc}")
        return ExitCode.CONFIG if isinstance(exc, (ValueError, ImportError)) else ExitCode.RUNTIME
    daemon = Daemon(home, cfg, identity, agent, ready_file=ready_file)
    return trio.run(daemon.run)


@main.command()
@home_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(home: Path, as_json: bool) -> None:
    """Show what the daemon in HOME is doing (from its state file)."""
    try:
        cfg = load_config(home)
    except ConfigError as exc:
        _config_error(exc)
        return
    state = read_state(home)
    if state is None:
        if as_json:
            click.echo(json.dumps({"status": "never_run", "cpm": cfg.cpm}))
        else:
            click.echo(f"no state in {home}: the daemon has never run here")
        sys.exit(ExitCode.RUNTIME)
    data = state.to_json()
    alive = pid_alive(state.pid)
    if data["status"] != "stopped" and not alive:
        data["status"] = "dead"  # it did not write "stopped": killed or crashed
    data["alive"] = alive
    data["cpm"] = cfg.cpm
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    click.echo(f"peer      {data['peer_id']}")
    click.echo(f"status    {data['status']} (pid {data['pid']}, {'alive' if alive else 'not running'})")
    click.echo(f"cpm       {cfg.cpm} ({'connected' if data['cpm_connected'] else 'not connected'})")
    click.echo(f"round     {data['round']}  role {data['role']}  completed {data['rounds_completed']}")
    click.echo(f"taught    {data['taught']}  learned {data['learned']}  outbox {data['outbox_size']}")
    relay = (f"reserved ({data['relay_reservations']} reservations)" if data["relay_reserved"]
             else "no reservation" if cfg.network.relay else "off")
    click.echo(f"network   reachability {data['reachability']}  relay {relay}")
    if data["paths"]:
        paths = " ".join(f"{k}={v}" for k, v in sorted(data["paths"].items()))
        click.echo(f"paths     {paths} (last {data['last_path']})")
    if data["last_feedback"]:
        fb = data["last_feedback"]
        click.echo(f"feedback  {fb.get('directive')} ok={fb.get('ok')} loss {_num(fb.get('loss_pre'))} → "
                   f"{_num(fb.get('loss_post'))} {fb.get('failure', '')}")
    for peer, stats in sorted(data["peers"].items()):
        click.echo(f"peer      {peer} in={stats['bytes_in']} out={stats['bytes_out']} exchanges={stats['exchanges']}")
    if data["last_error"]:
        click.echo(f"error     {data['last_error']}")


def _num(value: object) -> str:
    """Losses for people (``--json`` keeps the exact values)."""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


from knexad.doctor import config_group, doctor_command  # noqa: E402 — diagnostics (docs/operations.md)

main.add_command(doctor_command)
main.add_command(config_group)

def entry() -> None:
    """The ``knexad`` console script."""
    run_cli(main, "knexad")


if __name__ == "__main__":
    entry()
