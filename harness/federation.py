"""Bring a federation up as real processes, let the CPM drive R rounds, collect results.

Sequence (each step a real subprocess through the public CLIs, in its own process
group under ``harness.procs.Supervisor``; logs in ``<out>/logs/<name>.log``):

1. ``knexa-cpm init --home H/cpm --strategy S --max-rounds R --transfer-hash T --seed S
   --round-timer T --min-agents N`` (a round is matched when all N profiles are in, or
   when the round timer fires with at least two);
2. ``knexa-cpm serve --ready-file`` → the CPM multiaddr (with ``/p2p/<id>``);
3. per node ``knexad init --home H/node-XX --cpm MADDR --model M --agent-index i
   --n-agents N --seed S --org org-XX``, then ``knexa-cpm admit <peer-id>``: the allowlist
   is filled through the admin CLI exactly as an operator would; ``--budget`` goes into
   each node's ``[agent] budget`` the way an operator edits config.toml;
4. ``knexad run --ready-file`` per node (or ``knexa-harness run-pack`` for K nodes per
   process, see docs/harness.md §Scale; ``harness.procs.run_pack``);
5. watch the CPM database read-only (``cpm.store.open_home_store``) until R rounds are
   ``closed``; crashed children are reported and the run continues or aborts
   (``--on-crash``);
6. stop everything (SIGTERM, grace, SIGKILL), then build results from the now-quiescent
   database (``harness.results``).

The transfer-set hash is computed by building node 0's agent exactly as the daemon does
(``knexad.agents.build_agent``) — the ML agent builds its model lazily, so this is cheap.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog

from cpm.report import collect_from_store  # the CPM's rows → pairs and pass@1 per round (one implementation)
from harness import results as R
from harness.netlab.system import NetlabError
from harness.paths import path_section
from harness.procs import Child, ChildFailed, HarnessInterrupted, Supervisor, executable, parse_ready, tail
from harness.topology import topology_for
from p2p.process import ExitCode

log = structlog.get_logger(__name__)

DEFAULT_ML_MODELS = ("tiny-qwen2", "tiny-gpt2")  # the two families whose KD effect is measured (docs/agent.md)
EXIT_OK, EXIT_RUNTIME, EXIT_CONFIG, EXIT_UNREACHABLE, EXIT_UNAUTHORIZED = (
    ExitCode.OK, ExitCode.RUNTIME, ExitCode.CONFIG, ExitCode.UNREACHABLE, ExitCode.UNAUTHORIZED)
EXIT_SIGINT = 130
POLL_S = 0.5


class RunAborted(RuntimeError):
    """The run cannot go on (CPM died, a node crashed with --on-crash abort, timeout)."""

    def __init__(self, status: str, message: str, exit_code: int = EXIT_RUNTIME) -> None:
        super().__init__(message)
        self.status = status
        self.exit_code = exit_code


@dataclass(slots=True)
class UpConfig:
    """Everything ``knexa-harness up`` was asked for (recorded in results.json)."""

    nodes: int
    rounds: int
    out: Path
    strategy: str = "linucb"
    agent: str = "synthetic"  # synthetic | ml
    models: tuple[str, ...] = DEFAULT_ML_MODELS
    seed: int = 0
    keep_homes: bool = False
    on_crash: str = "continue"  # continue | abort
    per_process: int = 1
    round_timer_s: float | None = None  # None: 30 s synthetic, 900 s ml
    ready_timeout_s: float | None = None  # None: scaled with N (and model builds for ml)
    timeout_s: float | None = None  # whole rounds phase; None: scaled with R
    grace_s: float | None = None  # None: 10 s synthetic, 30 s ml
    progress: bool = True
    budget: str = "standard"  # ML agents' training budget (knexad.agent.ml_agent.BUDGETS)
    topology: str = "loopback"  # loopback | nat (harness.topology, docs/harness.md §Topology nat)
    uplink_mbit: float | None = None  # nat: every organisation's upload cap
    uplink_caps: dict[str, float] = field(default_factory=dict)  # nat: org → upload cap (wins over uplink_mbit)
    nat: str = "rfc5382"  # nat: the routers' behaviour (harness.netlab.NAT_MODES)

    def model_for(self, index: int) -> str:
        if self.agent == "synthetic":
            return "synthetic"
        return self.models[index % len(self.models)]

    def effective_round_timer(self) -> float:
        if self.round_timer_s is not None:
            return self.round_timer_s
        return 30.0 if self.agent == "synthetic" else 900.0

    def effective_grace(self) -> float:
        """SIGTERM → SIGKILL. An ML daemon first finishes its running agent call, saves its
        checkpoint, then tears down torch (~2 s CPU): eight of them on two busy cores took
        more than 10 s (docs/harness.md §Processes)."""
        if self.grace_s is not None:
            return self.grace_s
        return 30.0 if self.agent == "ml" else 10.0

    def effective_ready_timeout(self) -> float:
        if self.ready_timeout_s is not None:
            return self.ready_timeout_s
        base = 60.0 + 2.0 * self.nodes  # ~1 s of imports per process, 2 cores shared
        # ML daemons build (pre-train) uncached tiny bases before they listen: minutes
        # once per family, many more on a loaded machine
        return base + (1800.0 if self.agent == "ml" else 0.0)

    def effective_timeout(self) -> float:
        if self.timeout_s is not None:
            return self.timeout_s
        per_round = 60.0 + 0.5 * self.nodes if self.agent == "synthetic" else 900.0
        return 60.0 + self.rounds * (per_round + self.effective_round_timer())

    def child_env(self) -> dict[str, str]:
        """Thread settings for ML children that load non-tiny models: the cores split
        between the processes, so N daemons do not each start ``cpu_count`` OpenMP
        threads (oversubscribed, a step gets many times slower — docs/agent.md §Budgets and speed).
        Tiny models pin themselves to one thread (``zoo.configure_cpu_threads``); an
        ``OMP_NUM_THREADS`` already set by the user is kept."""
        if self.agent != "ml" or "OMP_NUM_THREADS" in os.environ:
            return {}
        if all(self.model_for(i).startswith("tiny-") for i in range(self.nodes)):
            return {}
        procs = -(-self.nodes // max(1, self.per_process))
        return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // procs))}

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["out"] = str(self.out)
        data["models"] = list(self.models) if self.agent == "ml" else ["synthetic"]
        data["round_timer_s"] = self.effective_round_timer()
        data["grace_s"] = self.effective_grace()
        return data


@dataclass(slots=True)
class Node:
    index: int
    name: str
    home: Path
    model: str
    org: str
    peer: str = ""


@dataclass(slots=True)
class RunOutcome:
    status: str  # ok | crashed | timeout | interrupted | failed
    exit_code: int
    message: str
    doc: dict[str, Any] | None
    paths: dict[str, Path] = field(default_factory=dict)


CPM = executable("knexa-cpm", "cpm.cli")
KNEXAD = executable("knexad", "knexad.cli")
HARNESS = [sys.executable, "-m", "harness.cli"]


def set_budget(home: Path, budget: str) -> None:
    """Write ``[agent] budget`` into a node's config.toml, as an operator would edit it;
    the file is re-validated, so an unknown name fails here (ConfigError agent.budget)."""
    import tomllib
    from dataclasses import replace

    from knexad.config import from_mapping, load_config, write_config

    cfg = load_config(home, env={})
    if cfg.agent.budget != budget:
        new = replace(cfg, agent=replace(cfg.agent, budget=budget))
        write_config(home, from_mapping(tomllib.loads(new.to_toml())))


def transfer_hash_for(cfg: UpConfig) -> str:
    """The hash node 0's agent will present (all nodes share the transfer set)."""
    from knexad.agents import build_agent
    from knexad.config import AgentSection, DaemonConfig

    dcfg = DaemonConfig(cpm="", agent=AgentSection(model=cfg.model_for(0), index=0, n_agents=cfg.nodes, seed=cfg.seed))
    return build_agent(dcfg).transfer_set_hash()


class Federation:
    """One ``up`` run. ``run()`` never leaves a child behind, whatever happens."""

    def __init__(self, cfg: UpConfig, console: Any, on_round: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.cfg = cfg
        self.console = console
        self.on_round = on_round
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self._tmp_homes: Path | None = None
        if cfg.keep_homes:
            self.homes = self.out / "homes"
            if self.homes.exists():
                shutil.rmtree(self.homes)  # a previous run's homes: start fresh, never reuse keys
            self.homes.mkdir(parents=True)
        else:
            self._tmp_homes = Path(tempfile.mkdtemp(prefix="knexa-harness-"))
            self.homes = self._tmp_homes
        self.cpm_home = self.homes / "cpm"
        self.nodes = [
            Node(i, f"node-{i:02d}", self.homes / f"node-{i:02d}", cfg.model_for(i), f"org-{i:02d}")
            for i in range(cfg.nodes)
        ]
        self.cpm_addr = ""
        self.net = topology_for(cfg.topology, [n.org for n in self.nodes], cfg.uplink_mbit, cfg.uplink_caps,
                                cfg.nat)
        self.crashed: list[dict[str, Any]] = []
        self.started_at = time.time()

    # -- public -----------------------------------------------------------------------
    def run(self) -> RunOutcome:
        try:
            return self._run()
        finally:
            if self._tmp_homes is not None:
                shutil.rmtree(self._tmp_homes, ignore_errors=True)

    def _run(self) -> RunOutcome:
        from protocol.errors import ConfigError, KnexaError

        status, code, message = "ok", EXIT_OK, ""
        sup = Supervisor(self.out, grace_s=self.cfg.effective_grace(), env=self.cfg.child_env())
        with sup:
            try:
                self._bring_up(sup)
                self._drive(sup)
                self._await_finished()
                self._export(sup)
            except RunAborted as exc:
                status, code, message = exc.status, exc.exit_code, str(exc)
            except ChildFailed as exc:
                status, code = "failed", _exit_for_child(exc)
                message = f"{exc}\n{exc.log_tail}".strip()
            except (KnexaError, ImportError, NetlabError) as exc:  # e.g. the agent cannot be built here
                status, message = "failed", f"{type(exc).__name__}: {exc}"
                code = EXIT_CONFIG if isinstance(exc, (ConfigError, ImportError)) else EXIT_RUNTIME
            except KeyboardInterrupt:
                status, code, message = "interrupted", EXIT_SIGINT, "interrupted (SIGINT)"
            except HarnessInterrupted as exc:
                status, code, message = "interrupted", 128 + exc.signum, f"interrupted ({exc})"
            finally:
                sup.stop_all()
                self.net.close()  # after the children: it kills whatever is left in its namespaces
        try:
            doc, paths = self._collect(status)
        except (OSError, ValueError, RuntimeError) as exc:  # a run that died before the DB existed
            log.error("harness.results.failed", error=str(exc))
            doc, paths = None, {}
            message = f"{message}; results not written: {exc}".strip("; ")
        log.info("harness.run.done", status=status, exit_code=code)
        return RunOutcome(status, code, message, doc, paths)

    # -- bring-up ---------------------------------------------------------------------
    def _bring_up(self, sup: Supervisor) -> None:
        cfg = self.cfg
        self._say(f"homes in {self.homes}; logs in {self.out / 'logs'}")
        if cfg.agent == "ml":  # before the CPM: its round timer must not run meanwhile
            from harness.bases import build_missing_bases

            build_missing_bases([cfg.model_for(i) for i in range(cfg.nodes)], self._say, self.console, cfg.progress)
        thash = transfer_hash_for(cfg)
        self.net.up()
        sup.run("cpm-init", [*CPM, "init", "--home", str(self.cpm_home), "--strategy", cfg.strategy,
                             "--max-rounds", str(cfg.rounds), "--transfer-hash", thash, "--seed", str(cfg.seed),
                             "--round-timer", str(cfg.effective_round_timer()),
                             # a round closes when every directive has feedback or expired:
                             # ML students distill and re-evaluate for minutes on a CPU
                             "--directive-ttl", str(900.0 if cfg.agent == "ml" else 120.0),
                             # every round waits for all N profiles (or the round timer):
                             # otherwise round 1 starts with whichever daemons registered first
                             "--min-agents", str(cfg.nodes)], timeout_s=60)
        cpm = sup.spawn("cpm", self.net.cpm_argv([*CPM, "serve", "--home", str(self.cpm_home), "--ready-file",
                                                  str(self.homes / "cpm.ready"), "--log-format", "json",
                                                  *self.net.cpm_listen()]),
                        role="cpm", ready_file=self.homes / "cpm.ready")
        try:
            ready = sup.wait_ready(cpm, timeout_s=60)
        except ChildFailed as exc:
            raise RunAborted("failed", f"CPM did not start: {exc}\n{exc.log_tail}", _exit_for_child(exc, EXIT_UNREACHABLE)) from None
        self.cpm_addr = parse_ready(ready)
        self._say(f"CPM {cfg.strategy} at {self.cpm_addr}")
        self._init_nodes(sup)
        self._start_nodes(sup)

    def _init_nodes(self, sup: Supervisor) -> None:
        from knexad.config import KEY_FILE
        from knexad.identity import load_identity

        cfg = self.cfg

        def one(node: Node) -> None:
            sup.run(f"{node.name}-init", [*KNEXAD, "init", "--home", str(node.home), "--cpm", self.cpm_addr,
                                          "--model", node.model, "--agent-index", str(node.index),
                                          "--n-agents", str(cfg.nodes), "--seed", str(cfg.seed),
                                          "--org", node.org, *self.net.node_listen(node.index)], timeout_s=120)
            set_budget(node.home, cfg.budget)
            node.peer = load_identity(node.home / KEY_FILE).peer_id
            sup.run(f"{node.name}-admit", [*CPM, "admit", node.peer, "--home", str(self.cpm_home),
                                           "--org", node.org], timeout_s=120)

        self._say(f"initialising and admitting {cfg.nodes} daemons …")
        pool = ThreadPoolExecutor(max_workers=4)
        try:
            for fut in [pool.submit(one, n) for n in self.nodes]:
                fut.result()
        finally:  # on Ctrl-C or a failure: drop queued nodes, wait for the running ones
            pool.shutdown(wait=True, cancel_futures=True)

    def _start_nodes(self, sup: Supervisor) -> None:
        cfg = self.cfg
        children: list[Child] = []
        k = max(1, cfg.per_process)
        for start in range(0, len(self.nodes), k):
            group = self.nodes[start:start + k]
            if k == 1:
                node = group[0]
                ready = node.home / "ready"
                argv = self.net.node_argv(node.index, [*KNEXAD, "run", "--home", str(node.home),
                                                        "--ready-file", str(ready)])
                children.append(sup.spawn(node.name, argv, role="daemon", ready_file=ready))
            else:
                name = f"pack-{start // k:02d}"
                ready = self.homes / f"{name}.ready"
                argv = [*HARNESS, "run-pack", "--ready-file", str(ready)]
                for node in group:
                    argv += ["--home", str(node.home)]
                children.append(sup.spawn(name, argv, role="pack", ready_file=ready))
        what = f"{len(children)} processes" if k > 1 else f"{len(children)} daemons"
        self._say(f"starting {what} (agent={cfg.agent}) …")
        try:
            sup.wait_all_ready(children, timeout_s=cfg.effective_ready_timeout())
        except ChildFailed as exc:
            raise RunAborted("failed", f"a daemon did not start: {exc}\n{exc.log_tail}",
                             _exit_for_child(exc, EXIT_UNREACHABLE)) from None
        self._say(f"all {cfg.nodes} daemons ready")

    # -- rounds -----------------------------------------------------------------------
    def _drive(self, sup: Supervisor) -> None:
        from cpm.store import open_home_store

        cfg = self.cfg
        store = open_home_store(self.cpm_home, readonly=True)
        progress, task = self._progress()
        deadline = time.monotonic() + cfg.effective_timeout()
        reported: set[int] = set()
        try:
            with progress:
                while True:
                    self._check_crashes(sup)
                    snap = snapshot(store, self._homes())
                    for row in snap["closed_rows"]:
                        if row["round"] not in reported:
                            reported.add(row["round"])
                            self._report_round(row)
                    progress.update(task, completed=min(len(snap["closed_rows"]), cfg.rounds), info=snap["info"])
                    if len(snap["closed_rows"]) >= cfg.rounds:
                        return
                    if time.monotonic() > deadline:
                        raise RunAborted("timeout", f"{len(snap['closed_rows'])}/{cfg.rounds} rounds closed after "
                                                    f"{cfg.effective_timeout():.0f}s (--timeout)")
                    time.sleep(POLL_S)
        finally:
            store.close()

    def _await_finished(self) -> None:
        """After the last round closes, wait until every daemon has said it is done
        (state ``finished``: an idle agent trains for the last round first — equal
        compute), so stopping them does not cut that training short."""
        from knexad.state import pid_alive, read_state

        def done(node: Node) -> bool:  # finished, or gone (a crash is reported elsewhere)
            st = read_state(node.home)
            return st is not None and (st.role == "finished" or st.status == "stopped" or not pid_alive(st.pid))

        wait_s = 60.0 if self.cfg.agent == "synthetic" else 900.0
        deadline = time.monotonic() + wait_s
        pending = [n for n in self.nodes if n.peer]
        while pending and time.monotonic() < deadline:
            pending = [n for n in pending if not done(n)]
            if pending:
                time.sleep(POLL_S)
        if pending:
            log.warning("harness.finish.timeout", nodes=[n.name for n in pending], waited_s=wait_s)

    def _progress(self) -> tuple[Any, Any]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        progress = Progress(
            SpinnerColumn(), TextColumn("[bold]rounds"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
            console=self.console, disable=not self.cfg.progress, transient=True,
        )
        task = progress.add_task("rounds", total=self.cfg.rounds, info="waiting for profiles")
        return progress, task

    def _report_round(self, row: dict[str, Any]) -> None:
        self._say(
            f"round {row['round']}/{self.cfg.rounds}: {row['pairs']} pairs, "
            f"{row['feedback']} feedback ({row['failures']} failed), "
            f"mean raw reward {_fmt(row['mean_raw_reward'])}, mean pass@1 {_fmt(row['mean_pass1'])}"
        )
        if self.on_round is not None:
            self.on_round(row)

    def _check_crashes(self, sup: Supervisor) -> None:
        for child in sup.new_crashes():
            code = child.returncode
            if child.role == "cpm":
                raise RunAborted("crashed", f"the CPM exited ({code}):\n{tail(child.log_path)}")
            if code == 0:
                self._say(f"[yellow]{child.name} exited 0 (stopped on its own)[/yellow]")
                continue
            entry = {"name": child.name, "pid": child.pid, "returncode": code, "log": str(child.log_path),
                     "at": time.time() - self.started_at}
            self.crashed.append(entry)
            self._say(f"[red]{child.name} crashed (exit {code}); log: {child.log_path}[/red]")
            if code == EXIT_UNAUTHORIZED:
                raise RunAborted("failed", f"{child.name} was refused by the CPM (exit 5)", EXIT_UNAUTHORIZED)
            if self.cfg.on_crash == "abort":
                raise RunAborted("crashed", f"{child.name} crashed (exit {code}); --on-crash abort")
            alive = [c for c in sup.children if c.role in ("daemon", "pack") and c.alive()]
            alive_nodes = sum(max(1, self.cfg.per_process) for _ in alive)
            if alive_nodes < 2:
                raise RunAborted("crashed", "fewer than 2 daemons left alive")

    def _export(self, sup: Supervisor) -> None:
        """The CPM's own export, through its CLI, kept next to our results."""
        for fmt in ("json", "csv"):
            try:
                sup.run(f"cpm-export-{fmt}", [*CPM, "export", "--format", fmt, "--out",
                                              str(self.out / f"cpm-export.{fmt}"), "--home", str(self.cpm_home)],
                        timeout_s=120)
            except ChildFailed as exc:
                log.warning("harness.export.failed", format=fmt, error=str(exc))

    # -- results ----------------------------------------------------------------------
    def _collect(self, status: str) -> tuple[dict[str, Any], dict[str, Path]]:
        from cpm.store import StoreNotFound, open_home_store

        try:
            store = open_home_store(self.cpm_home, readonly=True)
        except StoreNotFound as exc:
            raise RuntimeError(f"no CPM database: {exc}") from None
        try:
            data = collect_from_store(store)
        finally:
            store.close()
        data["pass1_by_round"] = held_out_pass1(self._homes(), data["rounds"])
        names = {n.peer: n for n in self.nodes if n.peer}
        peers = {
            peer: {"name": n.name, "org": n.org, "family": data["families"].get(peer, n.model), "model": n.model,
                   **training_counts(n.home)}
            for peer, n in names.items()
        }
        rows = R.build_round_rows(data["pairs"], data["pass1_by_round"], data["rounds"])
        finals: dict[str, float] = {}
        if status != "interrupted":  # Ctrl-C means "get out": no model loading after it
            finals = {n.peer: v for n in self.nodes if n.peer and (v := final_eval(n.home)) is not None}
        agents = R.build_agent_finals(peers, data["pairs"], data["pass1_by_round"], finals)
        doc = R.results_document(
            config={**self.cfg.to_json(), "cpm": self.cpm_addr, "cpm_home": str(self.cpm_home)},
            status=status,
            rows=rows,
            agents=agents,
            pairs=data["pairs"],
            rounds_completed=data["closed"],
            crashed=self.crashed,
            extra={"started_at": self.started_at, "finished_at": time.time(),
                   "duration_s": time.time() - self.started_at,
                   "paths": path_section(self._homes(), data["pairs"], {p: n.name for p, n in names.items()})},
        )
        labels = {peer: n.name for peer, n in sorted(names.items(), key=lambda kv: kv[1].index)}
        paths = R.write_run_outputs(self.out, doc, data["pairs"], labels)
        return doc, paths

    def _homes(self) -> dict[str, Path]:
        return {n.peer: n.home for n in self.nodes if n.peer}

    def _say(self, text: str) -> None:
        log.info("harness.say", message=text)
        if self.console is not None:
            self.console.print(text, highlight=False, soft_wrap=True)


def training_counts(home: Path) -> dict[str, int]:
    """Steps a daemon trained (KD + local rounds), from its state file: the equal-compute
    record of a run (docs/results.md §Federation)."""
    from knexad.state import read_state

    state = read_state(home)
    if state is None:
        return {}
    return {"steps_trained": state.steps_trained, "local_rounds": state.local_rounds}


def held_out_pass1(homes: Mapping[str, Path], rounds: Iterable[int] | None = None) -> dict[int, dict[str, float]]:
    """``{round: {peer: test pass@1}}`` from the daemons' own evaluation logs
    (``knexad.evaluations``): the weights each round's profile describes, scored on the
    held-out test set. Not from the CPM's profiles, which carry validation numbers only.
    ``rounds``: keep only these — a daemon also evaluates when it builds the profile
    after the last round (to train its idle steps), a round the CPM never opened."""
    from knexad.evaluations import read_evaluations

    keep = None if rounds is None else set(rounds)
    out: dict[int, dict[str, float]] = {}
    for peer, home in homes.items():
        for rnd, value in read_evaluations(home).items():
            if keep is None or rnd in keep:
                out.setdefault(rnd, {})[peer] = value
    return out


def snapshot(store: Any, homes: Mapping[str, Path] | None = None) -> dict[str, Any]:
    """What the progress bar shows: closed rounds (as rows) and the open round's state;
    pass@1 is the held-out one from the daemons' homes when given."""
    # closed rounds first: a round closes after its feedback is stored, so every round
    # seen closed here has all its feedback in the rows read next (the other order
    # printed "2 pairs, 1 feedback" for a round that closed in between)
    closed_ids = {r.round for r in store.list_rounds() if r.state == "closed"}
    data = collect_from_store(store)
    if homes is not None:
        data["pass1_by_round"] = held_out_pass1(homes, data["rounds"])
    rows = [asdict(r) for r in R.build_round_rows(data["pairs"], data["pass1_by_round"], data["rounds"])]
    latest = store.latest_round()
    closed_rows = [r for r in rows if r["round"] in closed_ids]
    if latest is None:
        info = "waiting for the first round"
    else:
        cur = next((r for r in rows if r["round"] == latest.round), None)
        last = closed_rows[-1] if closed_rows else None
        info = (f"round {latest.round} {latest.state} · pairs {cur['pairs'] if cur else 0} · "
                f"mean reward {_fmt(last['mean_raw_reward'] if last else None)} · "
                f"mean pass@1 {_fmt(cur['mean_pass1'] if cur else None)}")
    return {"closed_rows": closed_rows, "info": info}


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _exit_for_child(exc: ChildFailed, default: int = EXIT_RUNTIME) -> int:
    if exc.returncode in (EXIT_CONFIG, EXIT_UNREACHABLE, EXIT_UNAUTHORIZED):
        return int(exc.returncode)
    return default


def run_up(cfg: UpConfig, console: Any) -> RunOutcome:
    return Federation(cfg, console).run()


# -- final evaluation -------------------------------------------------------------------


def final_eval(home: Path) -> float | None:
    """pass@1 of a stopped daemon's agent, restored from its checkpoint (after the last
    round's exchange, which no CPM profile covers: the CPM takes no profile once the
    last round closed). None when there is no checkpoint or the agent cannot load."""
    from knexad.agents import build_agent
    from knexad.config import CHECKPOINT_DIR, load_config
    from protocol.errors import KnexaError

    ckpt = Path(home) / CHECKPOINT_DIR
    if not ckpt.is_dir() or not any(ckpt.iterdir()):
        return None  # never trained/saved: do not build a model (an ML load builds its base)
    try:
        agent = build_agent(load_config(home))
        if not agent.load(ckpt):
            return None
        value = agent.evaluate().get("pass@1")
    except (KnexaError, OSError, ValueError, KeyError, ImportError, RuntimeError) as exc:
        log.warning("harness.final_eval.failed", home=str(home), error=f"{type(exc).__name__}: {exc}")
        return None
    return None if value is None else float(value)


def ml_available() -> tuple[bool, str]:
    """Can this interpreter build the ML agent? (torch, transformers, peft, the module)."""
    try:
        importlib.import_module("knexad.agent.ml_agent")
        for name in ("transformers", "peft"):
            importlib.import_module(name)
    except ImportError as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""
