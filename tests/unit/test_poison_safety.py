"""A poisoned teacher earns negative reward and LinUCB stops matching it.

The real ``cpm`` LinUCB strategy and ``SyntheticAgent``s in one process, rewards reaching
the bandit the way harness/sim.py (and the node) deliver them: teacher ``teach`` →
student ``learn`` → (loss_pre, loss_post, KB) → the bandit's ``Reward.observe`` (Eq. 3,
z-score) → ``update``. The population's
strongest agent — the most attractive teacher — is the poisoned one (worst case).

Bounds asserted (8 agents, 60 rounds, seeds 0–7), each one checked below:
- its exchanges earn a negative raw reward on average, and ≥ 75 % of them individually
  (measurement noise can flip a weak one);
- in rounds 30–59 it teaches at most 10 times in any seed and in ≤ 5 % of all those
  rounds (measured: 0–1 per seed except seed 7 with 9, 10 of 240 — since synthetic
  profiles carry the contract's fields (protocol/profile.py) instead of the richer
  world-only ones they had, seed 7's bandit keeps trying the poisoner for longer;
  before: 0–3 per seed, 6 of 240);
- the *same* agent unpoisoned teaches in ≥ 20 of those 30 rounds in every seed
  (measured 26–30), so the avoidance is caused by the poisoning, not by the agent
  being unattractive.
Known limit (docs/threat-model.md): the bandit avoids the poisoner through its profile
features, not its identity; with 16 agents the avoidance was measured to be unreliable
(one seed in 8 kept matching it in 12 of the last 30 rounds) — the CPM's quarantine
(cpm/reputation.py) is what bounds it there.
"""

from __future__ import annotations

import numpy as np

from cpm.strategies import DEFAULT_ARMS, make_strategy
from knexad.agent_api import TeachRequest
from knexad.synthetic import make_population, package_kb

N_AGENTS = 8
ROUNDS = 60


def _run(seed: int, poisoned: bool) -> tuple[list[int], list[float]]:
    """Per round: 1 if the strongest agent taught; and the raw rewards of its exchanges."""
    base = make_population(N_AGENTS, alpha=0.1, seed=seed)
    best = int(np.argmax([a.evaluate()["pass@1"] for a in base]))
    agents = make_population(N_AGENTS, alpha=0.1, seed=seed, poisoned=(best,) if poisoned else ())
    assert agents[best].state.poisoned is poisoned
    ids = [a.agent_id for a in agents]
    index = {aid: i for i, aid in enumerate(ids)}
    strategy = make_strategy("linucb")
    rng = np.random.default_rng([seed, 1])
    taught, rewards = [], []
    for r in range(ROUNDS):
        profiles = np.array([a.profile() for a in agents])
        hit = 0
        for i, pair in enumerate(strategy.select(profiles, ids, r, N_AGENTS // 2, rng)):
            t, s = index[pair.teacher], index[pair.student]
            arm = DEFAULT_ARMS[pair.arm]
            transfer = tuple((r * 12 + j) % 132 for j in range(12))
            package = agents[t].teach(TeachRequest(f"r{r}-{i}", r, transfer, arm, agents[s].family))
            learned = agents[s].learn(package, arm)
            kb = package_kb(package)
            raw, z = strategy.reward.observe(learned.loss_pre, learned.loss_post, kb)
            if t == best:
                hit = 1
                rewards.append(raw)
            strategy.update(pair, z)
        for a in agents:
            a.end_round()
        taught.append(hit)
    return taught, rewards


SEEDS = range(8)
TAIL = slice(30, 60)
MAX_TAIL_PER_SEED = 10  # poisoned: rounds 30-59 in which it still teaches, any seed
MAX_TAIL_RATE = 0.05  # … and over all seeds
MIN_CONTROL_TAIL_PER_SEED = 20  # the same agent, unpoisoned, in every seed


def test_poisoned_teacher_earns_negative_reward_and_is_dropped() -> None:
    tails, controls = [], []
    for seed in SEEDS:
        taught, rewards = _run(seed, poisoned=True)
        assert rewards, "the poisoned teacher was never tried"
        # per exchange the measured reward carries measurement noise (σ ≈ 0.003), so one
        # exchange with a weak student can read slightly positive; on average it is harmful
        assert np.mean(rewards) < 0 and np.mean(np.asarray(rewards) < 0) >= 0.75, (seed, rewards)
        tails.append(sum(taught[TAIL]))
        control, control_rewards = _run(seed, poisoned=False)
        assert np.mean(control_rewards) > 0
        controls.append(sum(control[TAIL]))
    assert max(tails) <= MAX_TAIL_PER_SEED, tails
    assert sum(tails) / (len(SEEDS) * (TAIL.stop - TAIL.start)) <= MAX_TAIL_RATE, tails
    assert min(controls) >= MIN_CONTROL_TAIL_PER_SEED, controls
