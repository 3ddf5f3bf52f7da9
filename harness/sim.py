"""Synthetic matchmaking benchmark (the honest version of the paper's Fig. 2).

One process, the real ``cpm`` code (strategies, bandit, matching) and the
``knexad.synthetic`` world. Per seed one population is drawn; every method runs on its
*own deep copy* of that same population, with the same learning rule, the same number of
rounds and pairs. Agents improve (and forget) over rounds, so the best partner changes.
Rewards reach the bandit only the way they would in the system: teacher ``teach`` →
student ``learn`` → ``LearnResult`` + package KB → ``Feedback`` → ``update``.

Every strategy runs inside the CPM's own round engine (``cpm.rounds.RoundEngine`` on a
temp SQLite store, tmpfs when there is one, fake clock, group commit per round as the
node batches): each agent has a deterministic key pair, registers, sends a ``Profile``
each round; the engine matches (quorum), the sim verifies the signed ``Directive``s,
runs teach/learn in the world and returns the student's ``Feedback`` through
``RoundEngine.feedback``. So reward (Eq. 3), z-score, failure clipping and teacher
quarantine are the node's — a teacher whose deliveries really harm (negative transfer,
a poisoner) is quarantined here as on a node (``quarantined_teachers`` in the JSON).
The two oracles read the true world's reward matrix, which no node has, and pick their
pairs directly (no engine, no reputation): they are the ceiling, not a node.

Methods: the strategies of ``cpm.strategies`` by registry name, variants included
(``random-arm``, ``oracle-greedy``). ``oracle`` is the exact per-round optimum
(maximum-weight matching of at most K_p disjoint pairs on the true expected reward,
``cpm/optimum.py``); ``oracle-greedy`` is the greedy matching on the same values.

Worlds (``--world``): ``standard`` (docs/synthetic.md) and ``misspecified``, where part
of the compatibility is a hidden per-agent latent that φ cannot see
(``knexad.synthetic.MISSPECIFIED``).

Metrics per method (mean ± std over seeds):
* cumulative true gain — Σ over rounds and pairs of the student's *true* validation-loss
  decrease (no measurement noise);
* gain over random (%), fraction of oracle — per seed, from cumulative true gain (the
  oracle plays the per-round optimum; it is not a plan over rounds, so a method can
  exceed it in a round, and in principle in total);
* mean JS divergence (bits) of the chosen pairs' data histograms;
* gain curve — per round, the true gain summed over the round's pairs (mean over seeds);
* regret — per round, (value of the optimal matching on *this method's current world*)
  − (expected value of the pairs it chose), values = expected gain − δ·KB; never
  negative for a P2P method (only ``central-kd``, which breaks the one-pair rule, can go
  below); reported cumulatively per round.

Usage: ``python -m harness.sim --clients 32 --rounds 100 --seeds 5 --heterogeneity high``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import tempfile
import time
from typing import Any, Sequence

import click
import numpy as np
import structlog

from cpm import features as F
from cpm.config import CpmConfig
from cpm.reward import DELTA_PER_KB  # the CPM's δ: the oracles' values are the node's rewards
from cpm.rounds import RoundEngine
from cpm.store import open_store
from cpm.strategies import DEFAULT_ARMS, STRATEGIES, VARIANTS, OracleStrategy, Strategy, make_strategy
from knexad.agent_api import N_CATEGORIES, TeachRequest
from knexad.synthetic import (
    TRANSFER_SET_SIZE,
    WORLDS,
    SyntheticAgent,
    expected_gain_matrix,
    loss,
    make_population,
    package_kb,
)
from protocol.directives import verify_directive
from protocol.envelope import Identity
from protocol.messages import Directive, Feedback, Profile, Register

log = structlog.get_logger(__name__)

HETEROGENEITY = {"high": 0.1, "low": 10.0}
DEFAULT_METHODS = ("linucb", "random", "random-arm", "heuristic", "oracle-greedy", "oracle")
ORACLES = {"oracle": "optimal", "oracle-greedy": "greedy"}
T0 = 1_700_000_000_000  # the fake clock's start (ms); each round advances it by 1 s


def _alpha(heterogeneity: str | float) -> float:
    if isinstance(heterogeneity, str):
        if heterogeneity in HETEROGENEITY:
            return HETEROGENEITY[heterogeneity]
        return float(heterogeneity)
    return float(heterogeneity)


def _transfer_ids(round_: int, n_transfer: int) -> tuple[int, ...]:
    """Prompts for one round's packages, rotating through the transfer set.

    Why balanced: the oracle's ``expected_gain`` assumes a category-balanced package. Item
    j takes category j mod 12 (prompt i is category i mod 12) and the round's next prompt
    of that category, so every category appears n_transfer // 12 times when n_transfer is
    a multiple of 12. (A plain window (r·n + j) mod 128 wraps around the 128 prompts —
    128 is not a multiple of 12 — and then repeats some categories and drops others.)
    """
    per_cat = n_transfer // N_CATEGORIES
    ids = []
    for j in range(n_transfer):
        c, rep = j % N_CATEGORIES, j // N_CATEGORIES
        count = len(range(c, TRANSFER_SET_SIZE, N_CATEGORIES))  # prompts of category c
        ids.append(c + N_CATEGORIES * ((round_ * max(1, per_cat) + rep) % count))
    return tuple(ids)


def _arm_kb(agent: SyntheticAgent, n_transfer: int) -> np.ndarray:
    """Package size per arm (KB), measured on a real package: the oracle's cost term."""
    return np.array([
        package_kb(agent.teach(TeachRequest("kb-probe", 0, _transfer_ids(0, n_transfer), arm)))
        for arm in DEFAULT_ARMS
    ])


def _reward_matrices(agents: list[SyntheticAgent], arm_kb: np.ndarray) -> np.ndarray:
    """(K, N, N) expected reward γ·gain − δ·KB for every ordered pair and arm."""
    states = [a.state for a in agents]
    return np.stack([expected_gain_matrix(states, arm, agents[0].params) - DELTA_PER_KB * arm_kb[k]
                     for k, arm in enumerate(DEFAULT_ARMS)])


def _identity(seed: int, name: str) -> Identity:
    """A key pair deterministic by (seed, name): peer IDs order the agents in matching,
    so a run repeats exactly."""
    return Identity(hashlib.sha256(f"knexa-sim/{seed}/{name}".encode()).digest())


def _store_dir() -> str | None:
    """Where the run's SQLite file goes: tmpfs when there is one. The store commits with
    ``synchronous=FULL`` (the node's durability); on tmpfs an fsync costs nothing."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class _EngineRounds:
    """The CPM's own round engine (``cpm.rounds.RoundEngine``) on a temp SQLite store,
    driven with a fake clock: every agent registers, sends its Profile each round (the
    last one reaches quorum and the engine matches, quarantined teachers excluded), the
    sim reads the signed Directives and returns the student's Feedback through
    ``RoundEngine.feedback`` — reward, z-score, failure clipping and reputation are the
    node's."""

    def __init__(self, strategy_name: str, strategy: Strategy, agents: list[SyntheticAgent], seed: int,
                 k_pairs: int, db_dir: str) -> None:
        self.cfg = CpmConfig(strategy=strategy_name, seed=seed, k_pairs=k_pairs, round_timer_s=30.0,
                             directive_ttl_s=60.0)
        self.cpm = _identity(seed, "cpm")
        self.peers = [_identity(seed, f"agent{i}").peer_id for i in range(len(agents))]
        self.index = {p: i for i, p in enumerate(self.peers)}
        self.now = T0
        self.store = open_store(os.path.join(db_dir, "cpm.db"))
        self.engine = RoundEngine(self.store, self.cfg, self.cpm, strategy=strategy)
        self.engine.start(self.now)
        for i, peer in enumerate(self.peers):
            self.store.admit(peer, f"org{i}", self.now)
            self.engine.register(peer, Register(f"org{i}", agents[i].family, (), "sim"), self.now)

    def match(self, P: np.ndarray) -> tuple[int, list[Directive]]:
        """Send every agent's profile; the directives the engine issued, in a fixed order
        (directive IDs are random: the bandit sees feedback in the same order every run)."""
        self.now += 1000
        r = self.engine.current_round()
        with self.store.grouped():  # group commit, as the node's service does (one COMMIT)
            for i, peer in enumerate(self.peers):
                msg = Profile(r, tuple(float(v) for v in P[i]), self.cfg.transfer_hash)
                if self.engine.profile(peer, msg, self.now) is not None:
                    raise RuntimeError(f"sim: the engine refused round {r}'s profile of agent {i}")
        self.store.commit_batch()
        out = []
        for row in self.store.directives_for_round(r):
            blob = self.engine.directive(row.student, r, self.now)
            if not isinstance(blob, bytes):
                raise RuntimeError(f"sim: no directive for a matched student: {blob!r}")
            out.append(verify_directive(blob, cpm_peer_id=self.cpm.peer_id, now_ms=self.now, teacher=row.teacher,
                                        student=row.student, transfer_hash=self.cfg.transfer_hash)[1])
        return r, sorted(out, key=lambda d: (d.teacher, d.student))

    def feedback(self, reports: list[tuple[Directive, float, float, float]]) -> None:
        """The round's Feedback (directive, L_pre, L_post, KB), in one group-commit batch
        as the node's service batches concurrent messages: the strategy state (tens of
        KiB of JSON) is then serialised once per round, not once per feedback."""
        with self.store.grouped():
            for d, loss_pre, loss_post, kb in reports:
                fb = Feedback(d.directive_id, d.round, d.teacher, d.student, loss_pre, loss_post, kb, True, "")
                if not self.engine.feedback(d.student, fb, self.now):
                    raise RuntimeError(f"sim: feedback for {d.directive_id} counted as a duplicate")
        self.store.commit_batch()

    def quarantined(self) -> set[str]:
        return {p for p in self.peers if self.engine.reputation.is_quarantined(p)}

    def close(self) -> None:
        row = self.store.latest_round()
        if row is not None and row.state == "matched":
            raise RuntimeError(f"sim: round {row.round} did not close after its feedback")
        self.store.close()


def run_method(method: str, agents: list[SyntheticAgent], rounds: int, k_pairs: int, seed: int,
               n_transfer: int = 12, strategy_kw: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one method on ``agents`` (mutated in place: pass a deep copy).

    Every strategy runs inside the CPM's ``RoundEngine`` (``_EngineRounds``). The two
    oracles do not: they read the true world's reward matrix, which no node has, and are
    the ceiling the others are measured against, so they pick their pairs directly (no
    reputation: the sim's agents are honest unless a test poisons one)."""
    with tempfile.TemporaryDirectory(prefix="knexa-sim-", dir=_store_dir()) as tmp:
        return _run_method(method, agents, rounds, k_pairs, seed, n_transfer, strategy_kw, tmp)


def _run_method(method: str, agents: list[SyntheticAgent], rounds: int, k_pairs: int, seed: int,
                n_transfer: int, strategy_kw: dict[str, Any] | None, db_dir: str) -> dict[str, Any]:
    n = len(agents)
    arm_kb = _arm_kb(agents[0], n_transfer)
    box: dict[str, np.ndarray] = {}
    optimum = OracleStrategy(matrix_fn=lambda k: box["R"][k], n_arms=len(DEFAULT_ARMS), solver="optimal")
    loop: _EngineRounds | None = None
    if method in ORACLES:
        greedy = OracleStrategy(matrix_fn=lambda k: box["R"][k], n_arms=len(DEFAULT_ARMS), solver=ORACLES[method])
        ids = [str(i) for i in range(n)]
    else:
        loop = _EngineRounds(method, make_strategy(method, **(strategy_kw or {})), agents, seed, k_pairs, db_dir)
    rng = np.random.default_rng([seed, 1])
    gains, regrets, best_values, js_all, n_pairs = [], [], [], [], []
    teachers: list[list[int]] = []
    quarantined: dict[int, int] = {}
    for r in range(rounds):
        P = np.array([a.profile() for a in agents])
        box["R"] = _reward_matrices(agents, arm_kb)
        best = optimum.match(n, k_pairs)
        best_value = float(best.score.sum())
        # (teacher index, student index, arm, the engine's Directive or None)
        plan: list[tuple[int, int, int, Directive | None]]
        if loop is not None:
            _, directives = loop.match(P)
            plan = [(loop.index[d.teacher], loop.index[d.student], d.arm, d) for d in directives]
        else:
            # the oracle plays the optimum just computed (solving again would give the same pairs)
            pairs = OracleStrategy.pairs(best, ids) if method == "oracle" else greedy.select(P, ids, r, k_pairs, rng)
            plan = [(int(p.teacher), int(p.student), int(p.arm), None) for p in pairs]
        chosen_value = 0.0
        round_gain = 0.0
        reports: list[tuple[Directive, float, float, float]] = []
        for i, (t, s, k, d) in enumerate(plan):
            chosen_value += float(box["R"][k, t, s])
            js_all.append(float(F.js_divergence(P[t, F.HIST], P[s, F.HIST])))
            arm = DEFAULT_ARMS[k]
            # the sim's balanced rotation, not the engine's per-arm subset: the oracle's
            # expected gain assumes a category-balanced package (``_transfer_ids``)
            req_id = d.directive_id if d is not None else f"r{r}-{i}"
            pkg = agents[t].teach(TeachRequest(req_id, r, _transfer_ids(r, n_transfer), arm, agents[s].family))
            kb = package_kb(pkg)
            true_pre = loss(agents[s].state)
            res = agents[s].learn(pkg, arm)
            round_gain += true_pre - loss(agents[s].state)
            if d is not None:
                reports.append((d, res.loss_pre, res.loss_post, kb))
        if loop is not None:
            loop.feedback(reports)
            for peer in loop.quarantined():
                quarantined.setdefault(loop.index[peer], r)
        for a in agents:
            a.end_round()
        teachers.append([t for t, _, _, _ in plan])
        gains.append(round_gain)
        regrets.append(best_value - chosen_value)
        best_values.append(best_value)
        n_pairs.append(len(plan))
    if loop is not None:
        loop.close()
    return {
        "cum_gain": float(np.sum(gains)),
        "gain_per_round": gains,
        "regret_per_round": regrets,
        "optimum_per_round": best_values,
        "cum_regret": np.cumsum(regrets).tolist(),
        "mean_js": float(np.mean(js_all)) if js_all else 0.0,
        "mean_pairs": float(np.mean(n_pairs)),
        "final_pass1": float(np.mean([a.evaluate()["pass@1"] for a in agents])),
        "teachers_per_round": teachers,
        "quarantined": quarantined,  # agent index → round (0-based) its quarantine began
    }


def _value_frac(run: dict[str, Any]) -> float:
    """Σ expected value of the chosen pairs / Σ value of the optimum, both on the method's
    own world round by round (1 − the regret's share): unlike the fraction of the
    oracle's cumulative gain it does not compare two different trajectories. When the
    optimum was worth nothing, 1 for a method without regret, else 0."""
    opt, reg = sum(run["optimum_per_round"]), sum(run["regret_per_round"])
    return 1.0 - reg / opt if opt > 0 else float(reg <= 1e-12)


def _ms(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0}


def run_sim(n_clients: int, rounds: int, seeds: int | Sequence[int], heterogeneity: str | float,
            methods: Sequence[str] = DEFAULT_METHODS, k_pairs: int | None = None,
            n_transfer: int = 12, linucb_kw: dict[str, Any] | None = None, world: str = "standard") -> dict[str, Any]:
    """All methods × seeds on copies of the same population per seed → summary dict."""
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    alpha = _alpha(heterogeneity)
    if world not in WORLDS:
        raise ValueError(f"world must be one of {sorted(WORLDS)}")
    methods = list(dict.fromkeys(methods))  # a method named twice would mix two runs per seed
    for m in methods:
        method_spec(m, linucb_kw)  # a bad label fails before any run
    kp = n_clients // 2 if k_pairs is None else int(k_pairs)
    per: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    t0 = time.perf_counter()
    for seed in seed_list:
        base = make_population(n_clients, alpha=alpha, seed=seed, params=WORLDS[world])
        for m in methods:
            name, kw = method_spec(m, linucb_kw)
            per[m].append(run_method(name, copy.deepcopy(base), rounds, kp, seed, n_transfer, kw))
    out: dict[str, Any] = {
        "config": {"clients": n_clients, "rounds": rounds, "seeds": seed_list, "heterogeneity": heterogeneity,
                   "dirichlet_alpha": alpha, "k_pairs": kp, "n_transfer": n_transfer, "world": world,
                   "methods": list(methods), "linucb_kw": linucb_kw or {}},
        "methods": {},
    }
    for m in methods:
        runs = per[m]
        g = [r["cum_gain"] for r in runs]
        res: dict[str, Any] = {
            "cum_gain": _ms(g),
            "mean_js": _ms([r["mean_js"] for r in runs]),
            "final_pass1": _ms([r["final_pass1"] for r in runs]),
            "cum_regret_final": _ms([r["cum_regret"][-1] for r in runs]),
            "cum_regret_curve": np.mean([r["cum_regret"] for r in runs], axis=0).tolist(),
            "min_round_regret": float(min(min(r["regret_per_round"]) for r in runs)),
            "frac_of_optimum_value": _ms([_value_frac(r) for r in runs]),
            "mean_pairs": _ms([r["mean_pairs"] for r in runs]),
            "quarantined_teachers": _ms([len(r["quarantined"]) for r in runs]),  # by the engine's reputation
            "gain_curve": np.mean([r["gain_per_round"] for r in runs], axis=0).tolist(),
            "per_seed_cum_gain": g,
        }
        if "random" in per:
            res["gain_over_random_pct"] = _ms([100.0 * (a["cum_gain"] / b["cum_gain"] - 1.0)
                                               for a, b in zip(runs, per["random"])])
        if "oracle" in per:
            res["frac_of_oracle"] = _ms([a["cum_gain"] / b["cum_gain"] for a, b in zip(runs, per["oracle"])])
        out["methods"][m] = res
    out["seconds"] = time.perf_counter() - t0
    log.info("sim.done", clients=n_clients, rounds=rounds, seeds=len(seed_list), seconds=round(out["seconds"], 2))
    return out


def grid(clients: Sequence[int] = (8, 16, 32, 64), heterogeneity: Sequence[str] = ("high", "low"),
         rounds: int = 100, seeds: int = 5, **kw: Any) -> list[dict[str, Any]]:
    """The Fig. 2 grid: N × heterogeneity."""
    return [run_sim(n, rounds, seeds, h, **kw) for h in heterogeneity for n in clients]


def format_table(result: dict[str, Any]) -> str:
    c = result["config"]
    seeds = c["seeds"]
    first = f" ({seeds[0]}…{seeds[-1]})" if seeds and (seeds[0] != 0 or len(seeds) > 1) else ""
    kw = "".join(f" {k}={v}" for k, v in sorted(c.get("linucb_kw", {}).items()))
    world = c.get("world", "standard")
    w = max(14, 2 + max((len(m) for m in result["methods"]), default=0))
    lines = [f"clients={c['clients']} rounds={c['rounds']} seeds={len(seeds)}{first} "
             f"heterogeneity={c['heterogeneity']} (Dirichlet α={c['dirichlet_alpha']}) k_pairs={c['k_pairs']}"
             + ("" if world == "standard" else f" world={world}") + (f" linucb:{kw}" if kw else ""),
             f"{'method':<{w}}{'cum gain':>18}{'vs random %':>18}{'of oracle':>16}{'value/opt':>11}{'mean JS':>9}"
             f"{'cum regret':>12}"]
    for m, r in result["methods"].items():
        g, v, o = r["cum_gain"], r.get("gain_over_random_pct"), r.get("frac_of_oracle")
        vs = f"{v['mean']:+.1f} ± {v['std']:.1f}" if v else "-"
        of = f"{o['mean']:.3f} ± {o['std']:.3f}" if o else "-"
        lines.append(f"{m:<{w}}{g['mean']:>10.3f} ± {g['std']:<5.3f}{vs:>18}{of:>16}"
                     f"{r['frac_of_optimum_value']['mean']:>11.3f}{r['mean_js']['mean']:>9.3f}"
                     f"{round(r['cum_regret_final']['mean'], 3) + 0.0:>12.3f}")  # + 0.0: no "-0.000"
    return "\n".join(lines)


LINUCB_PARAMS = {"lam": float, "beta0": float, "beta_schedule": str, "tau": float, "decay": float,
                 "discount": float, "drop": str}


def method_spec(label: str, linucb_kw: dict[str, Any] | None = None) -> tuple[str, dict[str, Any] | None]:
    """Method label → (strategy name, keyword arguments).

    ``linucb`` takes ``linucb_kw`` (``--linucb``); ``linucb:KEY=VALUE/KEY=VALUE`` is LinUCB
    with those parameters instead, so variants run side by side on the same seeds and
    populations as the default (a paired comparison, one oracle and one random run for
    all of them). Other labels are strategy or variant names."""
    name, sep, params = label.partition(":")
    if name == "linucb":
        return name, parse_linucb_params(params.split("/")) if sep else linucb_kw
    if sep:
        raise ValueError(f"only linucb takes parameters in a method label, got {label!r}")
    if name not in ORACLES and name not in STRATEGIES and name not in VARIANTS:
        raise ValueError(f"unknown method {label!r}; known: {sorted({*ORACLES, *STRATEGIES, *VARIANTS})}")
    return name, None


def parse_linucb_params(items: Sequence[str]) -> dict[str, Any]:
    """``("lam=0.1", "beta0=2")`` → ``{"lam": 0.1, "beta0": 2.0}``; ValueError on anything else."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in LINUCB_PARAMS:
            raise ValueError(f"--linucb wants KEY=VALUE with KEY in {sorted(LINUCB_PARAMS)}, got {item!r}")
        try:
            out[key] = LINUCB_PARAMS[key](value.strip())
        except ValueError:
            raise ValueError(f"--linucb {key}: bad value {value!r}") from None
    return out


class _StderrLoggerFactory:
    """A ``PrintLogger`` on whatever ``sys.stderr`` is when a logger is made (structlog
    makes one per call unless caching), so a redirected stderr (click's test runner)
    is honoured and a closed earlier one is never written to."""

    def __call__(self, *args: Any) -> structlog.PrintLogger:
        return structlog.PrintLogger(sys.stderr)


def _log_to_stderr() -> None:
    """Send this command's logs to stderr, so ``--json`` stdout is the document only.

    Why here: the command runs under ``knexa-harness`` (whose group configures logging
    only for the commands that start processes, into their OUT/logs) and as
    ``python -m harness.sim``; unconfigured structlog prints to *stdout*. Format ``auto``:
    JSON unless stderr is a terminal."""
    from p2p.logs import configure_logging

    configure_logging("auto", stream=sys.stderr)
    structlog.configure(logger_factory=_StderrLoggerFactory(),
                        processors=[_drop_engine_info, *structlog.get_config()["processors"]])


def _drop_engine_info(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """Drop the round engine's info lines (``cpm.*``: one per profile, directive and
    feedback — over a million for a fresh-seeds table); its warnings (a quarantine)
    and errors stay."""
    if method in ("debug", "info") and str(event.get("event", "")).startswith("cpm."):
        raise structlog.DropEvent
    return event


# -h like every KNEXA command; set here too because click caches a command's help option
# on first use, so standalone use (python -m harness.sim) must not differ from nested.
@click.command("sim", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--clients", type=int, default=32, show_default=True)
@click.option("--rounds", type=int, default=100, show_default=True)
@click.option("--seeds", type=int, default=5, show_default=True)
@click.option("--first-seed", type=int, default=0, show_default=True,
              help="seeds are FIRST-SEED … FIRST-SEED+SEEDS−1 (tune on other seeds than you report)")
@click.option("--heterogeneity", default="high", show_default=True, help="high (α=0.1), low (α=10) or a number")
@click.option("--world", type=click.Choice(sorted(WORLDS)), default="standard", show_default=True,
              help="misspecified: part of the compatibility is a hidden per-agent latent φ cannot see")
@click.option("--methods", default=",".join(DEFAULT_METHODS), show_default=True)
@click.option("--k-pairs", type=int, default=None, help="pairs per round (default clients/2)")
@click.option("--linucb", "linucb_params", multiple=True, metavar="KEY=VALUE",
              help="LinUCB parameter for this run, repeatable: lam, beta0, beta_schedule, tau, decay, discount, "
                   "drop (feature group to ablate: lineage)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output (stdout: the JSON only)")
def sim_command(clients: int, rounds: int, seeds: int, first_seed: int, heterogeneity: str,
                world: str, methods: str, k_pairs: int | None, linucb_params: tuple[str, ...], as_json: bool) -> None:
    """Synthetic matchmaking benchmark: every method on its own copy of the same world."""
    _log_to_stderr()
    if clients < 2 or rounds < 1 or seeds < 1:
        raise click.UsageError("need clients ≥ 2, rounds ≥ 1, seeds ≥ 1")
    ms = tuple(m.strip() for m in methods.split(",") if m.strip())
    try:
        _alpha(heterogeneity)
    except ValueError:
        raise click.UsageError("heterogeneity must be high, low or a number") from None
    try:
        kw = parse_linucb_params(linucb_params)
        res = run_sim(clients, rounds, range(first_seed, first_seed + seeds), heterogeneity, ms, k_pairs,
                      linucb_kw=kw or None, world=world)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    click.echo(json.dumps(res) if as_json else format_table(res))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m harness.sim``; the command itself sends logs to stderr."""
    try:
        sim_command.main(args=list(argv) if argv is not None else None, prog_name="knexa-harness sim",
                         standalone_mode=False)
    except click.UsageError as e:
        e.show()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
