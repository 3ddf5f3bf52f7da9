"""Pairing strategies behind one interface: the round engine (on a node and in the
simulator) calls ``select`` once per round and ``update(pair, reward)`` once per
feedback, whatever the strategy.

* ``linucb``     — LinUCB over the pair context φ + greedy disjoint matching (the system).
* ``random``     — Random-P2P: random disjoint pairs and roles, the default arm — the arm
                   every other non-learning baseline uses, so random differs from them
                   only in *who* is paired.
* ``heuristic``  — paper's Heuristic-P2P: greedy on the JS divergence of the data
                   histograms, the better performer (pass@1 slot) teaches, default arm.
* ``local-only`` — no pairs.
* ``central-kd`` — **the centralized baseline, not P2P**: one hub (best pass@1) teaches up
                   to k students per round (neediest first). It breaks the "each agent in
                   at most one pair per round" rule on purpose; that rule is P2P's.
* ``fedid-central-kd`` — the paper's sixth baseline, centralized too: a *fixed* hub (the
                   first agent in ID order, like a federation's designated server) and
                   the clients distill interactively within pairwise directives — every
                   round the hub teaches every client but one, and that one (in rotation)
                   teaches the hub. FedID's server-side ensemble of all clients' logits
                   does not exist here (one directive per student per round, text
                   knowledge); this is its closest pairwise form, labelled as such.
* ``oracle``     — the exact per-round optimum on a true expected-reward function
                   (maximum-weight matching, ``cpm/optimum.py``; simulation only).

Variants (``VARIANTS``; ``make_strategy`` and a CPM's ``strategy`` take them, the default
benchmark tables leave them out):

* ``random-arm``    — random pairs *and* a random arm, the strongest (harmful) one
                      included. Why separate: a random arm mixes "random partners" with
                      "random protocol", and in the synthetic world the strongest arm
                      often hurts, so it made Random-P2P look worse than random pairing is.
* ``oracle-greedy`` — greedy (best pair first) on the true expected reward: a myopic
                      ½-approximation of ``oracle``, kept for comparison.
* ``linucb-default-arm`` — LinUCB over *partners* only: every pair gets the default arm,
                      as random and heuristic do, so it differs from random only in who
                      is paired. Why: with 4 pairs a round the bandit sees 48 rewards in
                      12 rounds, and learning three protocols beside the partners spends
                      many of them on arms that teach less (docs/results.md §6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import structlog

from cpm import features as F
from cpm.bandit import LinUCB
from cpm.matching import MatchResult, exact_match, fast_match, greedy_disjoint
from cpm.optimum import optimal_disjoint
from cpm.reward import Reward
from protocol.errors import ConfigError
from protocol.profile import DEFAULT_ARM_INDEX, DEFAULT_ARMS  # noqa: F401 — the contract's arms, re-exported

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Pair:
    teacher: str
    student: str
    arm: int
    score: float
    context: np.ndarray | None = None


@runtime_checkable
class Strategy(Protocol):
    name: str
    centralized: bool

    def select(self, profiles: np.ndarray, agent_ids: list[str], round: int, k_pairs: int,
               rng: np.random.Generator) -> list[Pair]: ...

    def update(self, pair: Pair, reward: float) -> None:
        """Learn from one pair's z-scored reward, the number the round engine computed
        from the student's feedback (``cpm.reward.Reward.observe``: Eq. 3, z-score, a
        failure clipped at 0). A strategy that learns exposes that ``Reward`` as its
        ``reward`` attribute, so the engine scores with the statistics it learns from."""
        ...

    def to_state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...


def _check(profiles: np.ndarray, agent_ids: list[str]) -> np.ndarray:
    P = np.asarray(profiles, dtype=float)
    if P.ndim != 2 or P.shape[1] != F.PROFILE_DIM or P.shape[0] != len(agent_ids):
        raise ValueError(f"profiles must be (len(agent_ids), {F.PROFILE_DIM})")
    return P


def _cap(k_pairs: int, n: int) -> int:
    return max(0, min(int(k_pairs), n // 2))


class _Stateless:
    centralized = False

    def update(self, pair: Pair, reward: float) -> None:
        """Baselines do not learn."""

    def to_state(self) -> dict[str, Any]:
        return {"name": self.name}  # type: ignore[attr-defined]

    def load_state(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""


class StrategyStateError(ConfigError):
    """Saved strategy state that this code cannot use (a context layout it does not know).

    A ``ConfigError`` (exit 3): loading it anyway would either fail at the first match or
    score every pair with weights meant for other features. The operator chooses: keep
    the older release, or start the strategy afresh (another store, or another
    ``strategy`` and back)."""

    def __init__(self, message: str) -> None:
        super().__init__("strategy_state", message)


def _feature_dims(group: str, n_arms: int) -> np.ndarray:
    """Dims of φ that belong to a named feature group (``LinUCBStrategy(drop=…)``).

    ``lineage``: the same-lineage flag and its two terms in every arm block — exactly the
    dims that layout 1 did not have (``features.v1_dims``)."""
    if group == "lineage":
        return np.setdiff1d(np.arange(F.context_dim(n_arms)), F.v1_dims(n_arms))
    raise ValueError(f"unknown feature group {group!r}; known: {list(FEATURE_GROUPS)}")


FEATURE_GROUPS = ("lineage",)


def _arm_scope(arm: int | None) -> str:
    return "every arm" if arm is None else f"arm {arm} only"


class LinUCBStrategy:
    """LinUCB + greedy matching. ``drop`` removes feature groups (``FEATURE_GROUPS``) for
    ablations, exactly: their dims are zeroed in every context the bandit learns from and
    their rows and columns of A⁻¹ are kept at zero, so θ is 0 there and they add nothing
    to any mean or width — the bandit of the smaller φ, without a second code path."""

    name = "linucb"
    centralized = False

    def __init__(self, n_arms: int = len(DEFAULT_ARMS), *, arm: int | None = None, topk: int = 8,
                 exact_below: int = 48, drop: str | tuple[str, ...] | list[str] = (), **bandit_kw: Any) -> None:
        self.n_arms = n_arms
        self._fix_arm(arm)
        self.topk = topk
        self.exact_below = exact_below
        self.bandit = LinUCB(F.context_dim(self._scored_arms), **bandit_kw)
        self._set_drop(drop)

    def _fix_arm(self, arm: int | None) -> None:
        """``arm`` set: every pair gets that arm, and the bandit learns partners only — its
        φ has one arm block (d = context_dim(1)), so no reward is spent on telling arms apart."""
        if arm is not None and not 0 <= int(arm) < self.n_arms:
            raise ConfigError("strategy_params.arm", f"linucb arm {arm} is not one of the {self.n_arms} arms the CPM offers")
        self.fixed_arm = None if arm is None else int(arm)
        self._scored_arms = self.n_arms if arm is None else 1
        if self.fixed_arm is None:
            self.name = "linucb"
        else:
            self.name = "linucb-default-arm" if self.fixed_arm == DEFAULT_ARM_INDEX else f"linucb-arm{self.fixed_arm}"

    def _set_drop(self, drop: str | tuple[str, ...] | list[str]) -> None:
        names = [d.strip() for d in (drop.split("+") if isinstance(drop, str) else drop) if d.strip()]
        self.drop = tuple(sorted(set(names)))
        dims = [_feature_dims(g, self._scored_arms) for g in self.drop]
        self._dropped = np.unique(np.concatenate(dims)) if dims else np.zeros(0, dtype=np.int64)
        self._mask_bandit()

    def _mask_bandit(self) -> None:
        """Keep the dropped dims out of A⁻¹ (the bandit's own re-inversion restores them)."""
        if self._dropped.size:
            self.bandit.Ainv[self._dropped, :] = 0.0
            self.bandit.Ainv[:, self._dropped] = 0.0
            self.bandit._theta = None

    def select(self, profiles: np.ndarray, agent_ids: list[str], round: int, k_pairs: int,
               rng: np.random.Generator) -> list[Pair]:
        P = _check(profiles, agent_ids)
        k = _cap(k_pairs, P.shape[0])
        if P.shape[0] <= self.exact_below:
            m = exact_match(P, self.bandit, self._scored_arms, k)
        else:
            m = fast_match(P, self.bandit, self._scored_arms, k, topk=self.topk, exact_below=self.exact_below)
        X = F.batch_context(P, m.teacher, m.student, m.arm, self._scored_arms)
        arms = m.arm if self.fixed_arm is None else np.full(len(m.arm), self.fixed_arm)
        return [Pair(agent_ids[t], agent_ids[s], int(a), float(sc), X[i])
                for i, (t, s, a, sc) in enumerate(zip(m.teacher, m.student, arms, m.score))]

    @property
    def reward(self) -> Reward:
        """The bandit's reward model: the engine scores this strategy's feedback with it."""
        return self.bandit.reward

    def update(self, pair: Pair, reward: float) -> None:
        if pair.context is None:
            raise ValueError("linucb needs the pair context it selected")
        context = np.asarray(pair.context, dtype=float).reshape(-1)
        if context.shape[0] == F.v1_context_dim(self._scored_arms) != self.bandit.d:
            # a directive issued before an upgrade (its context is stored with it): φ is
            # rebuilt exactly from the two profiles it carries, for the arm it chose
            arm = pair.arm if self.fixed_arm is None else 0
            context = F.pair_context(context[F.OFF_T : F.OFF_S], context[F.OFF_S : F.OFF_ABS], arm, self._scored_arms)
            log.info("cpm.strategy.context_upgraded", teacher=pair.teacher, student=pair.student)
        if self._dropped.size:
            context = context.copy()
            context[self._dropped] = 0.0
        self.bandit.update(context, float(reward))
        self._mask_bandit()

    def to_state(self) -> dict[str, Any]:
        state = {"name": self.name, "n_arms": self.n_arms, "topk": self.topk, "layout": F.LAYOUT,
                 "bandit": self.bandit.to_state()}
        if self.drop:
            state["drop"] = list(self.drop)
        if self.fixed_arm is not None:
            state["arm"] = self.fixed_arm
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore a saved state; one saved with the pre-lineage layout 1 (d = 81 + 8K,
        e.g. 105) is migrated exactly (``LinUCB.embed``: what it learnt is kept, the
        lineage dims start at the prior). Anything else raises ``StrategyStateError``.
        ``topk`` is saved for the record but not restored: it is how hard the matcher
        looks, not what the bandit learnt, so ``[strategy_params] topk`` applies on the
        next start (it used to be overwritten by the saved value, silently)."""
        n_arms = int(state["n_arms"])
        saved_arm = state.get("arm")
        if saved_arm != self.fixed_arm:
            log.error("cpm.strategy.state_refused", reason="arm", saved_arm=saved_arm, arm=self.fixed_arm)
            raise StrategyStateError(f"saved LinUCB state learnt {_arm_scope(saved_arm)}, but this strategy "
                                     f"({self.name}) scores {_arm_scope(self.fixed_arm)}: keep the saved "
                                     "strategy or start this one afresh")
        scored = n_arms if saved_arm is None else 1
        bandit = LinUCB.from_state(state["bandit"])
        layout = int(state.get("layout", 0))  # 0: saved before layouts were numbered
        want = F.context_dim(scored)
        if layout in (0, F.LAYOUT) and bandit.d == want:
            pass
        elif layout in (0, 1) and bandit.d == F.v1_context_dim(scored):
            bandit = bandit.embed(F.v1_dims(scored), want)
            log.warning("cpm.strategy.state_migrated", from_layout=1, to_layout=F.LAYOUT, from_d=state["bandit"]["d"],
                        to_d=want, updates=bandit.t)
        else:
            log.error("cpm.strategy.state_refused", layout=layout, d=bandit.d, expected_d=want, n_arms=n_arms)
            raise StrategyStateError(f"saved LinUCB state has layout {layout} and d={bandit.d}; this version "
                                     f"reads layout {F.LAYOUT} (d={want}) and migrates layout 1 "
                                     f"(d={F.v1_context_dim(scored)}) for {scored} arms")
        self.n_arms = n_arms
        self._fix_arm(saved_arm)
        if int(state["topk"]) != self.topk:  # a matching knob, not learnt state: the configured one wins
            log.info("cpm.strategy.topk_changed", saved=int(state["topk"]), configured=self.topk)
        self.bandit = bandit
        self._set_drop(list(state.get("drop", [])))


class RandomStrategy(_Stateless):
    """Random-P2P: random disjoint pairs and roles with the default arm, or with a random
    arm per pair when ``random_arm`` (the ``random-arm`` variant).

    Both draw the arms from ``rng``, so with the same generator they pick the same pairs
    in every round and differ only in the arm: the variant isolates the arm's effect."""

    name = "random"

    def __init__(self, n_arms: int = len(DEFAULT_ARMS), arm: int = DEFAULT_ARM_INDEX, random_arm: bool = False) -> None:
        self.n_arms = n_arms
        self.arm = min(arm, n_arms - 1)
        self.random_arm = bool(random_arm)
        self.name = "random-arm" if self.random_arm else "random"

    def select(self, profiles: np.ndarray, agent_ids: list[str], round: int, k_pairs: int,
               rng: np.random.Generator) -> list[Pair]:
        P = _check(profiles, agent_ids)
        k = _cap(k_pairs, P.shape[0])
        perm = rng.permutation(P.shape[0])
        drawn = rng.integers(self.n_arms, size=k)
        arms = drawn if self.random_arm else np.full(k, self.arm)
        return [Pair(agent_ids[perm[2 * i]], agent_ids[perm[2 * i + 1]], int(arms[i]), 0.0) for i in range(k)]


class HeuristicStrategy(_Stateless):
    """Heuristic-P2P: most different data first; the better performer teaches."""

    name = "heuristic"

    def __init__(self, n_arms: int = len(DEFAULT_ARMS), arm: int = DEFAULT_ARM_INDEX) -> None:
        self.n_arms = n_arms
        self.arm = min(arm, n_arms - 1)

    def select(self, profiles: np.ndarray, agent_ids: list[str], round: int, k_pairs: int,
               rng: np.random.Generator) -> list[Pair]:
        P = _check(profiles, agent_ids)
        n = P.shape[0]
        i, j = np.triu_indices(n, 1)
        js = F.js_divergence(P[i, F.HIST], P[j, F.HIST])
        better = P[i, F.PASS1] >= P[j, F.PASS1]
        t = np.where(better, i, j)
        s = np.where(better, j, i)
        m = greedy_disjoint(t, s, np.full(t.size, self.arm), js, n, _cap(k_pairs, n))
        return [Pair(agent_ids[a], agent_ids[b], int(k), float(sc))
                for a, b, k, sc in zip(m.teacher, m.student, m.arm, m.score)]


class LocalOnlyStrategy(_Stateless):
    name = "local-only"

    def select(self, profiles: np.ndarray, agent_ids: list[str], round: int, k_pairs: int,
               rng: np.random.Generator) -> list[Pair]:
        _check(profiles, agent_ids)
        return []


class CentralKDStrategy(_Stateless):
    """CENTRALIZED BASELINE: the hub (best pass@1) teaches up to k students per round."""

    name = "central-kd"
    centralized = True

    def __init__(self, n_arms: int = len(DEFAULT_ARMS), arm: int = DEFAULT_ARM_INDEX) -> None:
        self.arm = min(arm, n_arms - 1)

    def select(self, profiles: np.ndarray, agent_ids: list[str], round: int, k_pairs: int,
               rng: np.random.Generator) -> list[Pair]:
        P = _check(profiles, agent_ids)
        n = P.shape[0]
        if n < 2 or k_pairs <= 0:
            return []
        hub = int(np.argmax(P[:, F.PASS1]))
        others = [int(x) for x in np.argsort(P[:, F.PASS1], kind="stable") if x != hub]
        return [Pair(agent_ids[hub], agent_ids[s], self.arm, 0.0) for s in others[: min(k_pairs, n - 1)]]


class FedIDCentralKDStrategy(CentralKDStrategy):
    """CENTRALIZED BASELINE (FedID-CentralKD, pairwise form): a fixed hub teaches all
    clients but one per round; that client, in rotation, teaches the hub."""

    name = "fedid-central-kd"

    def select(self, profiles: np.ndarray, agent_ids: list[str], round: int, k_pairs: int,
               rng: np.random.Generator) -> list[Pair]:
        _check(profiles, agent_ids)
        if len(agent_ids) < 2 or k_pairs <= 0:
            return []
        hub, *clients = sorted(agent_ids)
        upward = clients[round % len(clients)]
        pairs = [Pair(upward, hub, self.arm, 0.0)]
        pairs += [Pair(hub, c, self.arm, 0.0) for c in clients if c != upward][: max(0, k_pairs - 1)]
        return pairs


class OracleStrategy(_Stateless):
    """The exact per-round optimum on the true expected reward (simulation only: it needs
    the world's truth); ``solver="greedy"`` is the ``oracle-greedy`` variant.

    ``gain_fn(t, s, k) -> float`` over indices of the current profile matrix; the
    optional ``matrix_fn(k) -> (N, N)`` is the vectorized equivalent (fast path).
    Optimal means: the largest total value of at most ``k_pairs`` disjoint pairs this
    round (``cpm/optimum.py``). It is a per-round ceiling, not a plan over rounds: a
    different choice now changes the agents and so what later rounds can gain.
    """

    name = "oracle"
    needs_world = True  # the true expected reward: simulation only, never a CPM node
    SOLVERS = ("optimal", "greedy")

    def __init__(self, gain_fn: Callable[[int, int, int], float] | None = None, n_arms: int = len(DEFAULT_ARMS),
                 matrix_fn: Callable[[int], np.ndarray] | None = None, solver: str = "optimal") -> None:
        if gain_fn is None and matrix_fn is None:
            raise ValueError("oracle needs gain_fn or matrix_fn")
        if solver not in self.SOLVERS:
            raise ValueError(f"oracle solver must be one of {self.SOLVERS}")
        self.gain_fn = gain_fn
        self.matrix_fn = matrix_fn
        self.n_arms = n_arms
        self.solver = solver
        self.name = "oracle" if solver == "optimal" else "oracle-greedy"

    def match(self, n: int, k_pairs: int) -> MatchResult:
        if self.matrix_fn is not None:
            G = np.stack([np.asarray(self.matrix_fn(k), dtype=float) for k in range(self.n_arms)], axis=2)
        else:
            assert self.gain_fn is not None
            G = np.full((n, n, self.n_arms), -np.inf)
            for t in range(n):
                for s in range(n):
                    if t != s:
                        for k in range(self.n_arms):
                            G[t, s, k] = self.gain_fn(t, s, k)
        tt, ss = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        mask = tt != ss
        sc = G[mask]  # (M, K), canonical (t, s) order
        k = np.argmax(sc, axis=1)
        solve = optimal_disjoint if self.solver == "optimal" else greedy_disjoint
        return solve(tt[mask], ss[mask], k, sc[np.arange(k.size), k], n, _cap(k_pairs, n))

    def select(self, profiles: np.ndarray, agent_ids: list[str], round: int, k_pairs: int,
               rng: np.random.Generator) -> list[Pair]:
        P = _check(profiles, agent_ids)
        return self.pairs(self.match(P.shape[0], k_pairs), agent_ids)

    @staticmethod
    def pairs(m: MatchResult, agent_ids: list[str]) -> list[Pair]:
        """A match result as ``Pair`` s (the simulator reuses the optimum it computed)."""
        return [Pair(agent_ids[a], agent_ids[b], int(k), float(sc))
                for a, b, k, sc in zip(m.teacher, m.student, m.arm, m.score)]


STRATEGIES: dict[str, Callable[..., Any]] = {
    "linucb": LinUCBStrategy,
    "random": RandomStrategy,
    "heuristic": HeuristicStrategy,
    "local-only": LocalOnlyStrategy,
    "central-kd": CentralKDStrategy,
    "fedid-central-kd": FedIDCentralKDStrategy,
    "oracle": OracleStrategy,
}


# Labelled variants: (strategy, the keyword arguments that make the variant).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "random-arm": ("random", {"random_arm": True}),
    "oracle-greedy": ("oracle", {"solver": "greedy"}),
    "linucb-default-arm": ("linucb", {"arm": DEFAULT_ARM_INDEX}),
}


def strategy_class(name: str) -> Callable[..., Any]:
    """The class behind a strategy or variant name (ValueError for unknown names)."""
    base = VARIANTS.get(name, (name, {}))[0]
    if base not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known: {sorted([*STRATEGIES, *VARIANTS])}")
    return STRATEGIES[base]


def make_strategy(name: str, **kw: Any) -> Strategy:
    """Registry: ``make_strategy("linucb", beta0=0.5)``, a ``VARIANTS`` name too;
    unknown names raise ValueError."""
    cls = strategy_class(name)
    return cls(**{**kw, **VARIANTS.get(name, (name, {}))[1]})


# What a CPM node (and so `knexa-harness up/compare`) can run: everything but the
# strategies that need the simulator's ground truth. The one list every CLI offers.
NODE_STRATEGIES: tuple[str, ...] = tuple(
    name for name in (*STRATEGIES, *VARIANTS) if not getattr(strategy_class(name), "needs_world", False)
)
