"""A cheap numeric learning world and the ``SyntheticAgent`` that lives in it.

Why: matchmaking must be learnable and measurable without training LLMs, and network
and load tests need hundreds of daemons whose agents cost microseconds. The model is
documented in docs/synthetic.md; in short, per agent:

* family f ∈ 0..7 (``FAMILIES``), data histogram h ~ Dirichlet(α) over 12 categories,
  data size n, capacity cap (family-dependent, ±5 %);
* data-supported skill d_c = b + (cap − b)(1 − exp(−n·h_c/κ)); initial skill
  s = b + 0.6·(d − b) (partly trained);
* validation loss L = Σ_c w_c (1 − s_c), w uniform (the shared test mix); pass@1 = 1 − L;
* local training each round moves s toward d (up with rate η_loc; knowledge above d —
  learnt from peers — is forgotten at rate ρ: LoRA drift towards the local data);
* distillation from teacher t with arm (α_k, n_samples) raises category c by
  ρ⁺·max(0, q_c − s_c) and lowers it by ρ⁻·max(0, s_c − q_c), where q_c is the quality
  of the teacher's items in c (its skill s_t[c]) and
  ρ⁺ = η·C[f_t, f_s]·e(n)·α_k,   ρ⁻ = η·C[f_t, f_s]·e(n)·ν·α_k²,   e(n) = 2(1 − 2⁻ⁿ):
  a strong KD weight pays when the teacher knows what the student lacks and costs when
  it overwrites what the student already does better (negative transfer);
* a *poisoned* teacher's items have negative quality; the student then loses
  ρ⁺·½·s_c in every category the package covers. ``poison_from`` > 0 makes a
  "sleeper": honest until it has completed that many rounds, poisoned afterwards;
* realised change = expected change × max(0, 1 + σ·ε), ε ~ N(0, 1) per exchange; the
  measured loss adds N(0, σ_m) measurement noise;
* *misspecified world* (``WorldParams.hidden_compat`` = w > 0, ``MISSPECIFIED``): every
  agent also has a hidden latent u ∈ [0, 1) (a circle), drawn from its own random stream
  and independent of everything in the profile, and every exchange is further scaled by
  H(t, s) = 1 − w·d(u_t, u_s), d = twice the circular distance ∈ [0, 1]. Why: the CPM's
  same-lineage flag mirrors the world's lineage groups exactly, so the standard world
  cannot show how LinUCB fares when compatibility depends on something φ cannot see.

``expected_gain`` is the pure, noise-free expected loss decrease for a category-balanced
package; the simulator's oracle uses it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from knexad.agent.profile import FAMILIES as PROFILE_FAMILIES  # plain Python, no torch
from knexad.agent.profile import PerfMetrics, build_profile, kd_gain
from p2p.files import atomic_write
from protocol.profile import (
    DEFAULT_TRANSFER_SIZE,
    FAMILY_LINEAGE,
    synthetic_transfer_hash,
    synthetic_transfer_prompts,
)
from knexad.agent_api import (
    N_CATEGORIES,
    KnowledgeItem,
    KnowledgePackage,
    LearnResult,
    ProtocolArm,
    TeachRequest,
)

log = structlog.get_logger(__name__)

# The family index of an agent is its slot in the profile's one-hot, so the world uses the
# profile's order (an own copy once had mistral and phi swapped: a synthetic "mistral"
# advertised the "phi" slot). Group and capacity are given by name for the same reason.
FAMILIES = PROFILE_FAMILIES
# Lineage groups (the contract's LINEAGE_OF): same family 1.0, same lineage 0.8,
# otherwise 0.5 — text KD across tokenizers loses some signal.
_CAPACITY = {"qwen2": 0.95, "gpt2": 0.75, "gpt_neox": 0.8, "bloom": 0.75, "llama": 0.95, "mistral": 0.9,
             "phi": 0.85, "other": 0.7}
FAMILY_GROUP = FAMILY_LINEAGE
FAMILY_CAPACITY = tuple(_CAPACITY[f] for f in FAMILIES)
# Family order of states saved before the fix (no "family_name" key): read them by name.
_V1_FAMILIES = ("qwen2", "gpt2", "gpt_neox", "bloom", "llama", "mistral", "phi", "other")
STATE_FILE = "synthetic_agent.json"
TRANSFER_SET_SIZE = DEFAULT_TRANSFER_SIZE  # the paper's transfer-set size; the CPM's default too


def compat_matrix() -> np.ndarray:
    g = np.asarray(FAMILY_GROUP)
    C = np.where(g[:, None] == g[None, :], 0.8, 0.5)
    np.fill_diagonal(C, 1.0)
    return C


COMPAT = compat_matrix()


@dataclass(frozen=True, slots=True)
class WorldParams:
    eta: float = 0.5  # KD step size
    nu: float = 1.5  # negative-transfer strength (multiplies α²)
    kappa: float = 150.0  # data items per category for 63 % of capacity
    base: float = 0.05  # skill with no data at all
    eta_local: float = 0.1  # local training rate toward data-supported skill
    forget: float = 0.04  # per-round forgetting of skill above data-supported level
    noise: float = 0.25  # relative noise of a realised KD gain
    meas_noise: float = 0.002  # validation-loss measurement noise
    filler_bytes: int = 240  # completion text per item (package size realism)
    hidden_compat: float = 0.0  # w of the hidden compatibility 1 − w·d(u_t, u_s); 0: standard world


# The misspecified world of the benchmark (``harness.sim --world misspecified``): with w = 0.5
# the hidden factor spans 0.5–1 (mean 0.75), the same range as the visible family
# compatibility (0.5 / 0.8 / 1).
MISSPECIFIED = WorldParams(hidden_compat=0.5)
WORLDS = {"standard": WorldParams(), "misspecified": MISSPECIFIED}


@dataclass(slots=True)
class AgentState:
    """Everything numeric about one agent; JSON-serialisable via ``to_dict``."""

    family: int
    hist: np.ndarray
    n_data: int
    capacity: float
    skill: np.ndarray
    poisoned: bool = False
    prev_metrics: tuple[float, ...] | None = None  # last round's PerfMetrics (the profile's Δ slots)
    kd_gain: float = 0.0  # tanh(L_pre − L_post) of the last learn, as the ML agent reports it
    rounds: int = 0
    kd_rounds: int = 0
    gain_ema: float = 0.0
    poison_from: int = 0  # poisoned only once ``rounds`` ≥ this (0: from the start)
    latent: float = 0.0  # hidden compatibility latent u (used only when hidden_compat > 0)

    @property
    def poisoning(self) -> bool:
        """Whether this agent's knowledge is harmful *now*."""
        return self.poisoned and self.rounds >= self.poison_from

    def data_level(self, params: WorldParams) -> np.ndarray:
        return params.base + (self.capacity - params.base) * (1.0 - np.exp(-self.n_data * self.hist / params.kappa))

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family, "family_name": FAMILIES[self.family], "hist": self.hist.tolist(),
            "n_data": self.n_data,
            "capacity": self.capacity, "skill": self.skill.tolist(), "poisoned": self.poisoned,
            "prev_metrics": None if self.prev_metrics is None else list(self.prev_metrics),
            "kd_gain": self.kd_gain, "rounds": self.rounds, "kd_rounds": self.kd_rounds, "gain_ema": self.gain_ema,
            "poison_from": self.poison_from, "latent": self.latent,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AgentState:
        """A state without ``family_name`` was saved with the old slot order: its index
        is looked up there, so a saved mistral stays mistral."""
        name = d["family_name"] if "family_name" in d else _V1_FAMILIES[int(d["family"])]
        return cls(
            family=FAMILIES.index(str(name)), hist=np.asarray(d["hist"], dtype=float), n_data=int(d["n_data"]),
            capacity=float(d["capacity"]), skill=np.asarray(d["skill"], dtype=float),
            poisoned=bool(d["poisoned"]),
            prev_metrics=tuple(float(v) for v in d["prev_metrics"]) if d.get("prev_metrics") else None,
            kd_gain=float(d.get("kd_gain", 0.0)), rounds=int(d["rounds"]), kd_rounds=int(d["kd_rounds"]),
            gain_ema=float(d["gain_ema"]), poison_from=int(d.get("poison_from", 0)),
            latent=float(d.get("latent", 0.0)),
        )


def random_state(rng: np.random.Generator, alpha: float, params: WorldParams = WorldParams(),
                 family: int | None = None, poisoned: bool = False) -> AgentState:
    """One agent: Dirichlet(α) histogram, log-uniform data size 100..2000."""
    fam = int(rng.integers(len(FAMILIES))) if family is None else int(family)
    hist = rng.dirichlet(np.full(N_CATEGORIES, float(alpha)))
    n_data = int(round(math.exp(rng.uniform(math.log(100), math.log(2000)))))
    cap = float(FAMILY_CAPACITY[fam] * rng.uniform(0.95, 1.05))
    st = AgentState(fam, hist, n_data, min(cap, 0.99), np.zeros(N_CATEGORIES), poisoned)
    d = st.data_level(params)
    st.skill = np.clip(params.base + 0.6 * (d - params.base), 0.0, 1.0)
    return st


def _pass1(st: AgentState) -> float:
    return float(st.skill.mean())


def _own(st: AgentState) -> float:
    return float(st.hist @ st.skill)


def _other(st: AgentState) -> float:
    """pass@1 on the categories it lacks (< 5 % of its data, the ML agent's threshold)."""
    lacking = st.hist < 0.05
    return float(st.skill[lacking].mean()) if lacking.any() else _pass1(st)


def _metrics(st: AgentState) -> PerfMetrics:
    """This world's measurements in the contract's six performance slots. Token accuracy
    gives partial credit, so it is above pass@1 and saturates sooner (√skill)."""
    return PerfMetrics(pass1=_pass1(st), pass1_own=_own(st), pass1_other=_other(st),
                       task_score=float(np.mean(np.sqrt(st.skill))), ppl_norm=_ppl(st), kd_gain=st.kd_gain)


def _ppl(st: AgentState) -> float:
    """Perplexity-like score in [0, 1]: mean −log(s + 0.05) / log(20)."""
    return float(np.mean(-np.log(st.skill + 0.05)) / math.log(20.0))


def loss(st: AgentState) -> float:
    """Validation loss on the uniform test mix: Σ_c w_c (1 − s_c)."""
    return float(1.0 - st.skill.mean())


def arm_efficiency(arm: ProtocolArm) -> float:
    """e(n) = 2(1 − 2⁻ⁿ): more samples per prompt help, with diminishing returns."""
    return 2.0 * (1.0 - 0.5 ** max(1, int(arm.n_samples)))


def category_delta(teacher_quality: np.ndarray, student_skill: np.ndarray, compat: float,
                   arm: ProtocolArm, cover: np.ndarray, params: WorldParams) -> np.ndarray:
    """Expected per-category skill change of the student (the learning rule)."""
    e = arm_efficiency(arm) * compat * params.eta
    a = float(arm.alpha)
    up = np.minimum(0.9, e * a * cover)
    down = np.minimum(0.9, e * params.nu * a * a * cover)
    q = teacher_quality
    harm = q < 0
    d = np.where(harm, -np.minimum(0.9, 0.5 * e * a * cover) * student_skill,
                 up * np.maximum(0.0, q - student_skill) - down * np.maximum(0.0, student_skill - q))
    return np.where(cover > 0, d, 0.0)


def hidden_factor(u_t: float | np.ndarray, u_s: float | np.ndarray, params: WorldParams) -> np.ndarray:
    """H = 1 − w·d(u_t, u_s), d = twice the circular distance: the hidden part of the
    compatibility. Exactly 1 in the standard world (w = 0), so that world is unchanged."""
    diff = np.abs(np.subtract(u_t, u_s, dtype=float)) % 1.0
    return 1.0 - params.hidden_compat * 2.0 * np.minimum(diff, 1.0 - diff)


def teacher_quality(st: AgentState) -> np.ndarray:
    """What a teacher's items are worth per category; negative when poisoning."""
    return -np.maximum(st.skill, 0.5) if st.poisoning else st.skill.copy()


def expected_gain(teacher_state: AgentState, student_state: AgentState, arm: ProtocolArm,
                  params: WorldParams = WorldParams()) -> float:
    """Noise-free expected validation-loss decrease for a category-balanced package."""
    c = float(COMPAT[teacher_state.family, student_state.family])
    c *= float(hidden_factor(teacher_state.latent, student_state.latent, params))
    d = category_delta(teacher_quality(teacher_state), student_state.skill, c, arm,
                       np.ones(N_CATEGORIES), params)
    return float(d.mean())


def expected_gain_matrix(states: list[AgentState], arm: ProtocolArm,
                         params: WorldParams = WorldParams()) -> np.ndarray:
    """(N, N) matrix of ``expected_gain`` for all ordered pairs (diagonal = −inf)."""
    S = np.stack([s.skill for s in states])
    Q = np.stack([teacher_quality(s) for s in states])
    fam = np.array([s.family for s in states])
    u = np.array([s.latent for s in states])
    Cm = COMPAT[fam[:, None], fam[None, :]] * hidden_factor(u[:, None], u[None, :], params)
    e = arm_efficiency(arm) * Cm[:, :, None] * params.eta
    a = float(arm.alpha)
    up = np.minimum(0.9, e * a)
    down = np.minimum(0.9, e * params.nu * a * a)
    q = Q[:, None, :]
    s = S[None, :, :]
    d = np.where(q < 0, -np.minimum(0.9, 0.5 * e * a) * s,
                 up * np.maximum(0.0, q - s) - down * np.maximum(0.0, s - q))
    G = d.mean(axis=2)
    np.fill_diagonal(G, -np.inf)
    return G


def transfer_prompts(size: int = TRANSFER_SET_SIZE) -> list[str]:
    """The shared synthetic transfer set (defined by the contract: the CPM's default
    transfer hash is this set's)."""
    return synthetic_transfer_prompts(size)


def transfer_hash(size: int = TRANSFER_SET_SIZE) -> str:
    """Hex SHA-256 of the synthetic transfer set — the CPM's default ``transfer_hash``."""
    return synthetic_transfer_hash(size)


class SyntheticAgent:
    """Implements ``knexad.agent_api.Agent`` over an ``AgentState``."""

    def __init__(self, state: AgentState, *, seed: int = 0, agent_id: str = "syn",
                 params: WorldParams = WorldParams(), transfer_size: int = TRANSFER_SET_SIZE) -> None:
        self.state = state
        self.params = params
        self.agent_id = agent_id
        self.rng = np.random.default_rng(seed)
        self._prompts = transfer_prompts(transfer_size)
        self.family = FAMILIES[state.family]

    @classmethod
    def random(cls, seed: int, *, alpha: float = 0.1, agent_id: str | None = None,
               family: int | None = None, poisoned: bool = False,
               params: WorldParams = WorldParams()) -> SyntheticAgent:
        rng = np.random.default_rng(seed)
        st = random_state(rng, alpha, params, family=family, poisoned=poisoned)
        return cls(st, seed=seed + 7919, agent_id=agent_id or f"syn-{seed}", params=params)

    # ---- Agent protocol ---------------------------------------------------------
    def transfer_set_hash(self) -> str:
        return transfer_hash(len(self._prompts))

    def profile(self) -> list[float]:
        """The contract's 32-d profile (protocol/profile.py), built by the ML agent's own
        builder from this world's measurements, so the CPM sees the same fields from a
        synthetic agent as from a real one."""
        st = self.state
        previous = None if st.prev_metrics is None else PerfMetrics(*st.prev_metrics)
        return build_profile(FAMILIES[st.family], _metrics(st), previous, st.hist.tolist())

    def teach(self, request: TeachRequest) -> KnowledgePackage:
        q = teacher_quality(self.state)
        items = []
        for tid in request.transfer_ids:
            c = int(tid) % N_CATEGORIES
            prompt = self._prompts[int(tid) % len(self._prompts)]
            for j in range(max(1, int(request.arm.n_samples))):
                items.append(KnowledgeItem(
                    item_id=f"{request.directive_id}:{tid}:{j}", prompt=prompt,
                    completion=_completion(c, float(q[c]), int(tid), j, self.params.filler_bytes),
                    category=c, score=float(self.state.skill[c]),
                ))
        meta: dict[str, float | int | str] = {"round": request.round, "agent": self.agent_id}
        if self.params.hidden_compat:  # the world's physics needs it at the student; the CPM never sees packages
            meta["latent"] = float(self.state.latent)
        return KnowledgePackage(self.family, tuple(items), meta)

    def _package_delta(self, package: KnowledgePackage, arm: ProtocolArm) -> tuple[np.ndarray, int]:
        """Noise-free expected per-category skill change from ``package``; items used."""
        cats = np.zeros(N_CATEGORIES)
        qsum = np.zeros(N_CATEGORIES)
        used = 0
        for it in package.items:
            c, qv = _parse_item(it)
            if c is None:
                continue
            cats[c] += 1
            qsum[c] += qv
            used += 1
        if not used:
            return np.zeros(N_CATEGORIES), 0
        cover = cats * N_CATEGORIES / used
        qual = np.where(cats > 0, qsum / np.maximum(cats, 1), 0.0)
        fam = FAMILIES.index(package.teacher_family) if package.teacher_family in FAMILIES else len(FAMILIES) - 1
        compat = float(COMPAT[fam, self.state.family])
        u_t = package.meta.get("latent")
        if self.params.hidden_compat and isinstance(u_t, (int, float)) and math.isfinite(u_t):
            compat *= float(hidden_factor(float(u_t), self.state.latent, self.params))
        d = category_delta(qual, self.state.skill, compat, arm, cover, self.params)
        return d, used

    def expected_learn_gain(self, package: KnowledgePackage, arm: ProtocolArm) -> float:
        """The validation-loss decrease ``learn(package, arm)`` would cause without its
        noise (the world's truth; tests use it to judge the CPM's quarantines)."""
        d, _ = self._package_delta(package, arm)
        s = self.state.skill
        return float(np.mean(np.clip(s + d, 0.0, 1.0) - s))

    def learn(self, package: KnowledgePackage, arm: ProtocolArm) -> LearnResult:
        st = self.state
        pre_true = loss(st)
        d, used = self._package_delta(package, arm)
        if used:
            factor = max(0.0, 1.0 + self.params.noise * float(self.rng.standard_normal()))
            st.skill = np.clip(st.skill + factor * d, 0.0, 1.0)
        post_true = loss(st)
        st.gain_ema = 0.8 * st.gain_ema + 0.2 * (pre_true - post_true)
        st.kd_rounds += 1
        m = self.params.meas_noise
        pre = pre_true + m * float(self.rng.standard_normal())
        post = post_true + m * float(self.rng.standard_normal())
        st.kd_gain = kd_gain(pre, post)
        return LearnResult(loss_pre=pre, loss_post=post, items_used=used, train_seconds=0.0)

    def evaluate(self) -> dict[str, float]:
        return {"pass@1": _pass1(self.state), "loss": loss(self.state)}

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        doc = {"version": 2, "agent_id": self.agent_id, "state": self.state.to_dict(),
               "params": {k: getattr(self.params, k) for k in WorldParams.__dataclass_fields__},
               "rng": self.rng.bit_generator.state, "transfer_size": len(self._prompts)}
        atomic_write(directory / STATE_FILE, json.dumps(doc))

    def load(self, directory: Path) -> bool:
        f = Path(directory) / STATE_FILE
        if not f.exists():
            return False
        doc = json.loads(f.read_text())
        self.agent_id = str(doc["agent_id"])
        self.state = AgentState.from_dict(doc["state"])
        self.params = replace(WorldParams(), **doc["params"])
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = doc["rng"]
        self._prompts = transfer_prompts(int(doc["transfer_size"]))
        self.family = FAMILIES[self.state.family]
        return True

    # ---- world dynamics (not part of the Agent protocol) ------------------------
    def end_round(self) -> None:
        """Local training for one round, then remember metrics for the Δ profile dims.

        The sim calls it once per round for every agent; a daemon running a synthetic
        agent calls it once per round it takes part in.
        """
        st = self.state
        st.prev_metrics = _metrics(st).as_tuple()
        d = st.data_level(self.params)
        s = st.skill
        st.skill = np.where(s < d, s + self.params.eta_local * (d - s), s - self.params.forget * (s - d))
        st.rounds += 1


def _completion(category: int, quality: float, tid: int, sample: int, filler: int) -> str:
    """Synthetic teacher output: a header with the knowledge quality, then filler code.

    The header *is* the knowledge in this world (harmful when negative); the filler only
    gives packages a realistic size (~``filler`` bytes per item).
    """
    head = f"# syn c={category} q={quality:+.5f}\n"
    body = f"    return transform_{category}(x, {tid}, {sample})  # "
    pad = max(0, filler - len(head) - len(body))
    return head + body + ("x" * pad)


def _parse_item(item: KnowledgeItem) -> tuple[int | None, float]:
    first = item.completion.split("\n", 1)[0]
    if not first.startswith("# syn c="):
        return None, 0.0
    try:
        c_part, q_part = first[len("# syn ") :].split(" ")
        c = int(c_part[2:])
        q = float(q_part[2:])
    except ValueError:
        return None, 0.0
    if not 0 <= c < N_CATEGORIES or not math.isfinite(q):
        return None, 0.0
    return c, max(-1.0, min(1.0, q))


_LATENT_STREAM = 0x4C41  # "LA": the hidden latents' own random stream


def make_population(n: int, *, alpha: float, seed: int, poisoned: tuple[int, ...] = (),
                    params: WorldParams = WorldParams(), poison_from: int = 0) -> list[SyntheticAgent]:
    """n agents, deterministic by seed; indices in ``poisoned`` are poisoned teachers
    (from their ``poison_from``-th completed round on; 0 = from the start).

    With ``params.hidden_compat`` > 0 each agent also gets its hidden latent, drawn from a
    stream of its own: the visible agents are then the same as in the standard world with
    the same seed, and the latent is independent of everything in their profiles."""
    ss = np.random.SeedSequence(seed)
    seeds = ss.generate_state(n)
    agents = [SyntheticAgent.random(int(s), alpha=alpha, agent_id=f"a{i:04d}", poisoned=i in poisoned, params=params)
              for i, s in enumerate(seeds)]
    for i in poisoned:
        agents[i].state.poison_from = int(poison_from)
    if params.hidden_compat:
        latents = np.random.default_rng([seed, _LATENT_STREAM]).random(n)
        for a, u in zip(agents, latents):
            a.state.latent = float(u)
    return agents


def package_kb(package: KnowledgePackage) -> float:
    """Bytes of prompt + completion text, in KB: the δ·KB cost term's input."""
    return sum(len(it.prompt.encode()) + len(it.completion.encode()) for it in package.items) / 1024.0


__all__ = [
    "FAMILIES", "COMPAT", "WorldParams", "AgentState", "SyntheticAgent", "expected_gain",
    "expected_gain_matrix", "make_population", "package_kb", "random_state", "loss", "MISSPECIFIED", "WORLDS",
    "hidden_factor",
]
