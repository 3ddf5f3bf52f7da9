"""``knexa-harness``: try, test and compare KNEXA on one machine with real processes.

Subcommands (docs/harness.md):

* ``up``      — a CPM node + N daemons as real subprocesses on 127.0.0.1, R rounds,
                results.json / rounds.csv / plots; ``--topology nat`` puts each daemon
                behind its own NAT in network namespaces (``harness.topology``);
* ``compare`` — the same population under several strategies and seeds, side by side;
* ``demo``    — what ``make demo`` runs: the same 4-daemon population (two tiny model
                families, or synthetic agents when the ML stack is missing — it says
                which) twice, LinUCB then LocalOnly, and one side-by-side comparison;
* ``sim``     — synthetic matchmaking benchmark (``harness/sim.py``), registered only
                when that module exists, and imported only when used.

Heavy imports (libp2p, torch, matplotlib) happen inside the commands, so ``--help`` and
usage errors are instant.

Exit codes: 0 ok, 1 runtime error (a node crashed with ``--on-crash abort``, rounds did
not finish before ``--timeout``, a compare run failed), 2 usage, 3 config error (a CLI
it ran exited 3), 4 a node never became ready (cannot reach CPM), 5 a daemon was refused
by the CPM, 130/143 interrupted by SIGINT/SIGTERM (children stopped, partial results
written).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import click

from knexad.config import AGENT_BUDGETS as BUDGETS  # a light module: no torch, no libp2p
from cpm.strategies import NODE_STRATEGIES as STRATEGIES  # what a real CPM runs
from harness.netlab.testbed import NAT_MODES  # stdlib only
from p2p.process import run_cli, version_option

TINY = ("tiny-qwen2", "tiny-gpt2", "tiny-neox", "tiny-bloom")
_BUDGET_HELP = ("--agent ml: training budget of every daemon ([agent] budget): fast = 100 local LoRA "
                "/ 60 KD steps, standard = 200 / 150, thorough = 400 / 300. Same tasks under each.")


class HarnessGroup(click.Group):
    """Adds ``sim`` from ``harness.sim`` lazily, and only when that module exists."""

    _lazy = {"sim": ("harness.sim", "sim_command")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = set(super().list_commands(ctx))
        names.update(n for n, (mod, _) in self._lazy.items() if _module_exists(mod))
        return sorted(names)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self._lazy:
            mod, attr = self._lazy[cmd_name]
            if not _module_exists(mod):
                return None
            return getattr(importlib.import_module(mod), attr)
        return super().get_command(ctx, cmd_name)


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _console():
    from rich.console import Console

    # not a terminal (CI, a pipe): wide enough that multiaddrs and tables do not wrap
    return Console(highlight=False, width=None if sys.stdout.isatty() else 140)


_LOG_FORMAT = {"value": "json"}  # set by the group's --log-format


def _setup_logging(out: Path) -> None:
    """Harness logs go to <out>/logs/harness.log (JSON unless --log-format console);
    the terminal is for rich output. Child processes always log JSON to their files."""
    from p2p.logs import configure_logging

    (out / "logs").mkdir(parents=True, exist_ok=True)
    # a new file per invocation: an earlier run's lines would read as this run's errors
    fh = open(out / "logs" / "harness.log", "w", buffering=1, encoding="utf-8")  # noqa: SIM115 — process lifetime
    configure_logging(_LOG_FORMAT["value"], stream=fh)


def _models(text: str) -> tuple[str, ...]:
    models = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in models if m not in TINY and not Path(m).expanduser().is_dir()]
    if not models or bad:
        raise click.BadParameter(f"expected tiny families ({', '.join(TINY)}) or model directories, got {text!r}")
    return models


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise click.BadParameter(f"expected non-negative integers, got {text!r}")
    return values


def _strategies(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in values if v not in STRATEGIES]
    if not values or bad:
        raise click.BadParameter(f"unknown strategy {bad or text!r}; known: {', '.join(STRATEGIES)}")
    return values


def _common(fn):
    """Options shared by ``up`` and ``compare``."""
    opts = [
        click.option("--nodes", "-n", type=click.IntRange(2, 10_000), default=4, show_default=True,
                     help="Number of daemons."),
        click.option("--rounds", "-r", type=click.IntRange(1, 10_000), default=3, show_default=True),
        click.option("--agent", type=click.Choice(["synthetic", "ml"]), default="synthetic", show_default=True,
                     help="synthetic: cheap numeric agents; ml: tiny LMs with LoRA (torch)."),
        click.option("--model", "models", default="tiny-qwen2,tiny-gpt2", show_default=True,
                     help="--agent ml: comma-separated families, assigned round-robin to nodes."),
        click.option("--budget", type=click.Choice(BUDGETS), default="standard", show_default=True,
                     help=_BUDGET_HELP),
        click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), required=True),
        click.option("--keep-homes", is_flag=True, help="Keep CPM/daemon homes under OUT/homes (else a temp dir)."),
        click.option("--on-crash", type=click.Choice(["continue", "abort"]), default="continue", show_default=True),
        click.option("--per-process", type=click.IntRange(1, 256), default=1, show_default=True,
                     help="Daemons per OS process (each with its own host, key and connection)."),
        click.option("--round-timer", type=click.FloatRange(1.0), default=None,
                     help="CPM round timer in s (default 30 synthetic, 900 ml)."),
        click.option("--ready-timeout", type=click.FloatRange(1.0), default=None, help="Seconds to wait for startup."),
        click.option("--timeout", type=click.FloatRange(1.0), default=None, help="Seconds allowed for all rounds."),
        click.option("--grace", type=click.FloatRange(0.0), default=None,
                     help="Seconds between SIGTERM and SIGKILL at shutdown (default 10 synthetic, 30 ml)."),
        click.option("--no-progress", is_flag=True, help="No live progress bar."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _config(**kw) -> object:
    from harness.federation import UpConfig

    return UpConfig(
        nodes=kw["nodes"], rounds=kw["rounds"], out=kw["out"], strategy=kw.get("strategy", "linucb"),
        agent=kw["agent"], models=_models(kw["models"]), seed=kw.get("seed", 0), keep_homes=kw["keep_homes"],
        on_crash=kw["on_crash"], per_process=kw["per_process"], round_timer_s=kw["round_timer"],
        ready_timeout_s=kw["ready_timeout"], timeout_s=kw["timeout"], grace_s=kw["grace"],
        progress=not kw["no_progress"], budget=kw["budget"],
        topology=kw.get("topology", "loopback"), nat=kw.get("nat") or "rfc5382", **_uplinks(kw),
    )


def _uplinks(kw: dict) -> dict:
    """``--uplink-mbit`` (N and/or NAME=N, repeatable) → UpConfig's uplink_mbit / uplink_caps."""
    from harness.topology import parse_uplinks

    values = kw.get("uplink_mbit") or ()
    if not values:
        return {}
    nodes = [f"node-{i:02d}" for i in range(kw["nodes"])]
    try:
        every, caps = parse_uplinks(values, nodes, [f"org-{i:02d}" for i in range(kw["nodes"])])
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    return {"uplink_mbit": every, "uplink_caps": caps}


@click.group(cls=HarnessGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-format", type=click.Choice(["json", "console"]), default="json", show_default=True,
              help="Format of OUT/logs/harness.log.")
@version_option("knexa-harness")
def main(log_format: str) -> None:
    """KNEXA local multi-node harness (real processes on 127.0.0.1)."""
    _LOG_FORMAT["value"] = log_format


@main.command("up")
@_common
@click.option("--strategy", "-s", type=click.Choice(STRATEGIES), default="linucb", show_default=True)
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True)
@click.option("--topology", type=click.Choice(["loopback", "nat"]), default="loopback", show_default=True,
              help="nat: the CPM on a public segment and each daemon in its own organisation's LAN behind "
                   "a NAT (Linux network namespaces; root, iproute2, nftables). docs/harness.md §Topology nat.")
@click.option("--uplink-mbit", multiple=True, metavar="[NAME=]N",
              help="--topology nat: cap every organisation's upload at N Mbit/s (tc tbf); NAME=N caps one "
                   "node's (node-01=10) or organisation's (org-01=10) only. Repeatable.")
@click.option("--nat", type=click.Choice(NAT_MODES), default=None,
              help="--topology nat: how the NAT routers behave [default: rfc5382: keep the port, drop unsolicited "
                   "inbound — hole punching works]; reset: answer unsolicited SYNs with RST; symmetric: a new port "
                   "per connection (both: exchanges fall back to the relay). docs/networking.md §Hole punching.")
def up_command(**kw) -> None:
    """Run a CPM + N daemons as real processes for R rounds; write results into OUT."""
    from harness.federation import run_up

    _check_topology(kw)
    cfg = _config(**kw)
    _setup_logging(cfg.out)
    console = _console()
    outcome = run_up(cfg, console)
    _finish(console, outcome)


@main.command("compare")
@_common
@click.option("--strategies", default="linucb,random,heuristic,local-only,central-kd", show_default=True)
@click.option("--seeds", default="1,2", show_default=True)
def compare_command(strategies: str, seeds: str, **kw) -> None:
    """Same population and seeds under each strategy (fresh homes each); table + compare.json."""
    from harness.compare import run_compare

    names, seed_list = _strategies(strategies), _int_list(seeds)
    cfg = _config(**kw)
    _setup_logging(cfg.out)
    code, _ = run_compare(cfg, names, seed_list, _console())
    sys.exit(code)


def _check_topology(kw: dict) -> None:
    """Option conflicts are usage errors (2); a machine that cannot build namespaces
    is a config error (3) that says why."""
    if kw["topology"] != "nat":
        if kw["uplink_mbit"]:
            raise click.UsageError("--uplink-mbit needs --topology nat")
        if kw.get("nat"):
            raise click.UsageError("--nat needs --topology nat")
        return
    if kw["per_process"] != 1:
        raise click.UsageError("--topology nat runs one daemon per organisation namespace: use --per-process 1")
    from harness.netlab import netns_available

    ok, why = netns_available()
    if not ok:
        click.echo(f"--topology nat: network namespaces unavailable: {why}", err=True)
        sys.exit(3)


DEMO_STRATEGIES = ("linucb", "local-only")


@main.command("demo")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"),
              show_default=True)
@click.option("--rounds", "-r", type=click.IntRange(1, 100), default=4, show_default=True)
@click.option("--agent", type=click.Choice(["auto", "ml", "synthetic"]), default="auto", show_default=True)
@click.option("--budget", type=click.Choice(BUDGETS), default="fast", show_default=True, help=_BUDGET_HELP)
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="The population (both runs).")
@click.option("--no-progress", is_flag=True)
def demo_command(out: Path, rounds: int, agent: str, budget: str, seed: int, no_progress: bool) -> None:
    """The story in small: 4 daemons (tiny-qwen2 + tiny-gpt2) on the embedded task set,
    run twice on the same population — LinUCB matchmaking, then LocalOnly (every agent
    trains on its own data only, same steps) — then one side-by-side table and plot."""
    from harness.compare import print_side_by_side, run_compare
    from harness.federation import UpConfig, ml_available

    console = _console()
    if agent == "auto":
        ok, why = ml_available()
        agent = "ml" if ok else "synthetic"
        if not ok:
            console.print(f"[yellow]ML agent not importable ({why}); running SyntheticAgents instead.[/yellow]")
    what = (f"ML agents: tiny-qwen2 ×2 + tiny-gpt2 ×2, LoRA, embedded Python task set, CPU, budget {budget}"
            if agent == "ml" else "SyntheticAgents (numeric learning model, no torch)")
    console.print(f"[bold]KNEXA demo[/bold]: CPM + 4 daemons as real processes · {what} · {rounds} rounds · "
                  f"the same population (seed {seed}) twice: {' vs '.join(DEMO_STRATEGIES)}", soft_wrap=True)
    cfg = UpConfig(nodes=4, rounds=rounds, out=out, agent=agent, models=("tiny-qwen2", "tiny-gpt2"),
                   progress=not no_progress, budget=budget, seed=seed)
    _setup_logging(out)
    code, doc = run_compare(cfg, DEMO_STRATEGIES, (seed,), console)
    print_side_by_side(console, doc)
    console.print(f"agents used: [bold]{'ML (tiny LMs)' if agent == 'ml' else 'synthetic'}[/bold]")
    sys.exit(code)


@main.command("run-pack", hidden=True)
@click.option("--home", "homes", multiple=True, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--ready-file", required=True, type=click.Path(dir_okay=False, path_type=Path))
def run_pack_command(homes: tuple[Path, ...], ready_file: Path) -> None:
    """(internal) Run several daemons in this one process — see docs/harness.md §Scale."""
    from harness.procs import run_pack

    sys.exit(run_pack(list(homes), ready_file))


def _finish(console, outcome) -> None:
    from harness.results import print_run_summary

    print_run_summary(console, outcome.status, outcome.message, outcome.doc)
    sys.exit(outcome.exit_code)


def entry() -> None:
    """The ``knexa-harness`` console script."""
    run_cli(main, "knexa-harness")


if __name__ == "__main__":
    entry()
