"""Teacher quarantine end to end with real processes: a ``knexa-cpm`` and 4 ``knexad``
daemons on loopback, one of which serves poisoned knowledge over the real exchange.

The poisoner is the population's strongest agent and the CPM runs ``heuristic`` (the
best performer teaches): without quarantine it would teach in every round. It is made
poisonous through its own checkpoint (the daemon restores ``synthetic_agent.json`` at
start), so nothing in the daemon knows. Asserted from the CPM's database and log: it
taught in at most B(u) rounds (cpm/reputation.py), ``cpm.teacher.quarantined`` names it,
and no directive of a later round makes it a teacher — while every round still pairs
the others.
"""

from __future__ import annotations

import pytest

from knexad.agents import SYNTHETIC_ALPHA
from knexad.config import CHECKPOINT_DIR
from knexad.synthetic import make_population
from tests.reliability.procfed import federation  # noqa: F401  (fixture)
from tests.reliability.summary import record
from tests.unit.quarantine_world import strongest
from tests.unit.test_poison_quarantine import bound

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(900)]

# Enough rounds for the rule to fire when a few deliveries look harmless: B(u) = 8, 12,
# 15, 18, 21 for u = 0..4 (cpm/reputation.py). Seed 0's poisoner harmed 10 of its first 12
# students since the synthetic world uses the profile's family order, so 12 rounds were
# too few for the sign test (B(2) = 15) — not a weaker rule.
N, SEED, ROUNDS = 4, 0, 24


def test_poisoned_daemon_is_quarantined_by_the_running_cpm(federation) -> None:
    poisoner = strongest(N, SEED)
    fed = federation(N, SEED)
    fed.init("--strategy", "heuristic", "--max-rounds", str(ROUNDS), "--round-timer", "20",
             "--directive-ttl", "30")
    fed.start_cpm()
    fed.init_daemons()
    agent = make_population(N, alpha=SYNTHETIC_ALPHA, seed=SEED, poisoned=(poisoner,))[poisoner]
    agent.save(fed.tmp / f"d{poisoner}" / CHECKPOINT_DIR)
    for i in range(N):
        fed.start_daemon(i)
    fed.wait_for(lambda: fed.db("SELECT COUNT(*) FROM rounds WHERE state = 'closed'")[0][0] == ROUNDS, 600,
                 f"{ROUNDS} rounds closed")

    peer = fed.peers[poisoner]
    assert any(e["restored"] for e in fed.all_events(f"d{poisoner}", "agent.ready"))  # it runs poisoned
    taught = fed.db("SELECT d.round, f.loss_pre - f.loss_post FROM directives d JOIN feedback f "
                    "ON f.directive_id = d.directive_id WHERE d.teacher = ? AND f.ok = 1 ORDER BY d.round",
                    (peer,))
    events = [e for e in fed.all_events("cpm", "cpm.teacher.quarantined") if e["teacher"] == peer]
    assert len(events) == 1, events
    q_round = int(events[0]["round"])
    all_taught = [r for (r,) in fed.db("SELECT round FROM directives WHERE teacher = ?", (peer,))]
    u = sum(g >= 0 for _, g in taught)
    assert max(all_taught) <= q_round < ROUNDS, (all_taught, q_round)
    assert len(all_taught) <= bound(u), (all_taught, u)
    assert sum(g for _, g in taught) < 0  # its knowledge really made students worse
    pairs = dict(fed.db("SELECT round, COUNT(*) FROM directives GROUP BY round"))
    assert all(pairs.get(r, 0) >= 1 for r in range(q_round + 1, ROUNDS + 1)), pairs  # the others go on
    record("knowledge", "poisoned daemon quarantined by running CPM",
           detail=f"{N} daemons + CPM processes, heuristic, {ROUNDS} rounds: taught rounds {all_taught}, "
                  f"quarantined in round {q_round}, never a teacher after")
