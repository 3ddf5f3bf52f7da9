"""Teacher quarantine with the system's own strategy (``linucb``), ``random`` and ``heuristic``:
16 SyntheticAgents through the real ``RoundEngine``, several seeds, poisoned and honest
worlds (the fast ``heuristic`` version is tests/unit/test_poison_quarantine.py).

Claims checked per seed:

* poisoned world — the poisoner (the strongest agent) teaches in at most B(u) rounds
  (cpm/reputation.py) and in no round after its quarantine; if it taught B(u) times it
  is quarantined;
* honest world — every quarantine the CPM makes is *justified by the world's truth*: the
  noise-free expected gain of that teacher's deliveries up to its quarantine was
  negative on average (its teaching really harmed). No teacher whose knowledge helped
  on average is ever quarantined by noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.reliability.summary import record
from tests.unit.quarantine_world import EngineWorld, WorldLog, strongest
from tests.unit.test_poison_quarantine import N, bound, db_dir  # noqa: F401  (fixture)

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(900)]

ROUNDS = 40
CASES = [("linucb", s) for s in range(5)] + [(k, s) for k in ("random", "heuristic") for s in range(3)]


def _poisoner_checks(log: WorldLog, poisoner: int) -> tuple[int, bool]:
    taught = log.taught_rounds(poisoner)
    gains = [d.gain for d in log.deliveries if d.teacher == poisoner]
    u = sum(g >= 0 for g in gains)
    assert len(taught) <= bound(u), (len(taught), u, gains)
    quarantined = poisoner in log.quarantined
    if quarantined:
        assert all(r <= log.quarantined[poisoner] for r in taught), (log.quarantined[poisoner], taught)
    else:
        assert len(taught) < bound(u), "taught B(u) times yet not quarantined"
    return len(taught), quarantined


def _justified(log: WorldLog) -> list[tuple[int, int, float]]:
    """(teacher, quarantine round, mean noise-free gain before it) for every quarantine."""
    out = []
    for t, r in sorted(log.quarantined.items()):
        truth = [d.true_gain for d in log.deliveries if d.teacher == t and d.round <= r]
        out.append((t, r, float(np.mean(truth))))
    return out


@pytest.mark.parametrize("strategy, seed", CASES, ids=[f"{s}-{k}" for s, k in CASES])
def test_poisoner_stopped_and_honest_quarantines_justified(strategy: str, seed: int, db_dir: Path) -> None:
    poisoner = strongest(N, seed)
    bad = EngineWorld(db_dir / "p", n=N, seed=seed, strategy=strategy, poisoned=(poisoner,)).run(ROUNDS)
    taught, quarantined = _poisoner_checks(bad, poisoner)
    good = EngineWorld(db_dir / "h", n=N, seed=seed, strategy=strategy).run(ROUNDS)
    for world in (bad, good):
        for t, r, truth in _justified(world):
            if world is bad and t == poisoner:
                continue
            assert truth < 0, f"honest teacher {t} quarantined in round {r} although its mean true gain was {truth}"
    honest_q = [t for t in bad.quarantined if t != poisoner]
    record("knowledge", f"poisoned teacher quarantined ({strategy}, seed {seed})",
           detail=f"N={N}, {ROUNDS} rounds: poisoner taught {taught} rounds, quarantined={quarantined}; "
                  f"harmful honest teachers stopped (all justified): {len(honest_q)} / honest world "
                  f"{len(good.quarantined)}")

