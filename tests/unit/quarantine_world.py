"""A federation of SyntheticAgents driven through the real CPM ``RoundEngine`` (temp
SQLite, fake clock) — the message flow of the node without sockets.

Per round: every agent sends its Profile (the last one reaches quorum and the engine
matches); for each directive the teacher ``teach``es, the student ``learn``s and sends
Feedback(loss_pre, loss_post, KB); the round closes; every agent ``end_round``s. Each
delivery is recorded with the world's noise-free truth (``expected_learn_gain``), so
tests can judge the CPM's quarantines against what the knowledge really did.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cpm.config import CpmConfig
from cpm.rounds import RoundEngine
from cpm.store import open_store
from knexad.agent_api import ProtocolArm, TeachRequest
from knexad.synthetic import make_population, package_kb
from protocol.envelope import Identity
from protocol.messages import Feedback, Profile, Register

T0 = 1_700_000_000_000
ALPHA = 0.1  # Dirichlet concentration of the data histograms (strongly non-IID)


@dataclass(frozen=True, slots=True)
class Delivery:
    round: int
    teacher: int
    student: int
    gain: float  # measured L_pre − L_post, what the CPM sees
    true_gain: float  # noise-free expected loss decrease


@dataclass(slots=True)
class WorldLog:
    deliveries: list[Delivery] = field(default_factory=list)
    quarantined: dict[int, int] = field(default_factory=dict)  # agent index → round it was quarantined

    def taught_rounds(self, agent: int) -> list[int]:
        return [d.round for d in self.deliveries if d.teacher == agent]


def _identity(seed: int, name: str) -> Identity:
    return Identity(hashlib.sha256(f"knexa-test/quarantine/{seed}/{name}".encode()).digest())


def strongest(n: int, seed: int) -> int:
    """Index of the population's best agent (the most attractive teacher: worst case)."""
    return int(np.argmax([a.evaluate()["pass@1"] for a in make_population(n, alpha=ALPHA, seed=seed)]))


class EngineWorld:
    def __init__(self, path: Path, *, n: int, seed: int, strategy: str = "linucb",
                 poisoned: tuple[int, ...] = (), poison_from: int = 0) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path / "cpm.db"
        self.cfg = CpmConfig(strategy=strategy, seed=seed, round_timer_s=30.0, directive_ttl_s=60.0)
        self.cpm = _identity(seed, "cpm")
        self.agents = make_population(n, alpha=ALPHA, seed=seed, poisoned=poisoned, poison_from=poison_from)
        # deterministic keys: peer IDs order the agents in matching, so runs repeat exactly
        self.peers = [_identity(seed, f"agent{i}").peer_id for i in range(n)]
        self.index = {p: i for i, p in enumerate(self.peers)}
        self.now = T0
        self.store = open_store(self.path)
        self.engine = RoundEngine(self.store, self.cfg, self.cpm)
        self.engine.start(self.now)
        for i, peer in enumerate(self.peers):
            self.store.admit(peer, f"org{i}", self.now)
            self.engine.register(peer, Register(f"org{i}", self.agents[i].family, (), "test"), self.now)
        self.log = WorldLog()

    def restart(self) -> None:
        """What ``kill -9`` + restart leaves: a new engine on the same database."""
        self.store.close()
        self.store = open_store(self.path)
        self.engine = RoundEngine(self.store, self.cfg, self.cpm)
        self.engine.start(self.now)

    def run(self, rounds: int) -> WorldLog:
        for _ in range(rounds):
            self.round()
        return self.log

    def round(self) -> None:
        self.now += 1000
        r = self.engine.current_round()
        for i, peer in enumerate(self.peers):
            vec = tuple(float(v) for v in self.agents[i].profile())
            assert self.engine.profile(peer, Profile(r, vec, self.cfg.transfer_hash), self.now) is None
        row = self.store.latest_round()
        assert row is not None and row.round == r and row.state == "matched", row
        # fixed order (directive IDs are random): the bandit sees feedback in the same order every run
        for d in sorted(self.store.directives_for_round(r), key=lambda d: (d.teacher, d.student)):
            t, s = self.index[d.teacher], self.index[d.student]
            arm = ProtocolArm(d.params["alpha"], d.params["temperature"], d.params["n_samples"])
            package = self.agents[t].teach(TeachRequest(d.directive_id, r, self.engine.transfer_ids(r, d.arm), arm,
                                                        self.agents[s].family))
            truth = self.agents[s].expected_learn_gain(package, arm)
            learned = self.agents[s].learn(package, arm)
            fb = Feedback(d.directive_id, r, d.teacher, d.student, learned.loss_pre, learned.loss_post,
                          package_kb(package), True, "")
            assert self.engine.feedback(d.student, fb, self.now) is True
            self.log.deliveries.append(Delivery(r, t, s, learned.loss_pre - learned.loss_post, truth))
            if self.engine.reputation.is_quarantined(d.teacher) and t not in self.log.quarantined:
                self.log.quarantined[t] = r
        row = self.store.latest_round()
        assert row is not None and (row.round > r or row.state == "closed"), row
        for a in self.agents:
            a.end_round()
