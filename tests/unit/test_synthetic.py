"""The synthetic learning world and SyntheticAgent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from knexad.agent import profile
from knexad.agent_api import Agent, KnowledgeItem, KnowledgePackage, ProtocolArm, TeachRequest
from knexad.synthetic import (
    COMPAT,
    FAMILY_CAPACITY,
    STATE_FILE,
    AgentState,
    SyntheticAgent,
    WorldParams,
    expected_gain,
    expected_gain_matrix,
    make_population,
    package_kb,
)

ARM = ProtocolArm(alpha=0.4, temperature=2.0, n_samples=1)
QUIET = WorldParams(noise=0.0, meas_noise=0.0)
BALANCED = tuple(range(12))


def _agent(cat: int, family: int = 0, poisoned: bool = False, seed: int = 0, n: int = 1500) -> SyntheticAgent:
    hist = np.eye(12)[cat]
    st = AgentState(family, hist, n, 0.9, np.zeros(12), poisoned)
    st.skill = st.data_level(QUIET)
    return SyntheticAgent(st, seed=seed, agent_id=f"c{cat}", params=QUIET)


def test_implements_agent_protocol() -> None:
    a = SyntheticAgent.random(1)
    assert isinstance(a, Agent)
    assert a.family in ("qwen2", "gpt2", "gpt_neox", "bloom", "llama", "mistral", "phi", "other")


def test_profile_layout() -> None:
    for a in make_population(20, alpha=0.1, seed=3):
        p = np.asarray(a.profile())
        assert p.shape == (32,)
        assert p[:8].sum() == 1.0 and set(np.unique(p[:8])) <= {0.0, 1.0}
        assert np.all((p[8:20] >= 0) & (p[8:20] <= 1))
        assert p[20:32].sum() == pytest.approx(1.0) and np.all(p[20:32] >= 0)
        assert p[8] == pytest.approx(a.evaluate()["pass@1"])


def test_population_deterministic_by_seed() -> None:
    a = [x.profile() for x in make_population(6, alpha=0.1, seed=9)]
    b = [x.profile() for x in make_population(6, alpha=0.1, seed=9)]
    c = [x.profile() for x in make_population(6, alpha=0.1, seed=10)]
    assert a == b and a != c


def test_heterogeneity_controls_histograms() -> None:
    hi = np.array([x.profile()[20:32] for x in make_population(30, alpha=0.1, seed=1)])
    lo = np.array([x.profile()[20:32] for x in make_population(30, alpha=10.0, seed=1)])
    assert hi.max(axis=1).mean() > 0.6 > 0.3 > lo.max(axis=1).mean()


def test_teach_package_items_and_size() -> None:
    t = _agent(3)
    pkg = t.teach(TeachRequest("d1", 0, BALANCED, ProtocolArm(n_samples=2)))
    assert len(pkg.items) == 24 and pkg.teacher_family == t.family
    assert {it.category for it in pkg.items} == set(range(12))
    assert all(it.score == pytest.approx(t.state.skill[it.category]) for it in pkg.items)
    per_item = package_kb(pkg) * 1024 / len(pkg.items)
    assert 200 < per_item < 600


def test_complementary_teacher_beats_same_category_teacher() -> None:
    student = _agent(0)
    comp, same = _agent(5), _agent(0)
    g_comp = expected_gain(comp.state, student.state, ARM, QUIET)
    g_same = expected_gain(same.state, student.state, ARM, QUIET)
    assert g_comp > 0.003 and g_same <= 0.0  # a same-data teacher has nothing to add
    s1, s2 = _agent(0, seed=1), _agent(0, seed=2)
    r1 = s1.learn(comp.teach(TeachRequest("x", 0, BALANCED, ARM)), ARM)
    r2 = s2.learn(same.teach(TeachRequest("y", 0, BALANCED, ARM)), ARM)
    assert r1.loss_pre - r1.loss_post > r2.loss_pre - r2.loss_post + 0.003


def test_family_mismatch_shrinks_gain() -> None:
    student = _agent(0, family=0)
    assert expected_gain(_agent(5, family=0).state, student.state, ARM, QUIET) > \
        expected_gain(_agent(5, family=1).state, student.state, ARM, QUIET)


def test_poisoned_teacher_gives_negative_gain() -> None:
    student = _agent(0)
    bad = _agent(5, poisoned=True)
    assert expected_gain(bad.state, student.state, ARM, QUIET) < 0
    pkg = bad.teach(TeachRequest("p", 0, BALANCED, ARM))
    assert all(0 <= it.score <= 1 for it in pkg.items)  # looks normal from the outside
    r = student.learn(pkg, ARM)
    assert r.loss_post > r.loss_pre


def test_learn_matches_expected_gain_without_noise() -> None:
    pop = make_population(5, alpha=0.3, seed=4, params=QUIET)
    for arm in (ARM, ProtocolArm(alpha=0.6, n_samples=2)):
        t, s = pop[0], pop[1]
        g = expected_gain(t.state, s.state, arm, QUIET)
        r = s.learn(t.teach(TeachRequest("z", 0, BALANCED, arm)), arm)
        assert r.loss_pre - r.loss_post == pytest.approx(g, abs=1e-6)


def test_expected_gain_matrix_matches_pairwise() -> None:
    pop = make_population(6, alpha=0.1, seed=5, poisoned=(2,))
    states = [a.state for a in pop]
    G = expected_gain_matrix(states, ARM)
    for i in range(6):
        for j in range(6):
            if i != j:
                assert G[i, j] == pytest.approx(expected_gain(states[i], states[j], ARM), abs=1e-12)
    assert np.all(np.isneginf(np.diag(G)))
    assert np.all(np.delete(G[2], 2) < 0)


def test_learning_ignores_foreign_items() -> None:
    s = _agent(0)
    pkg = KnowledgePackage("qwen2", (KnowledgeItem("i", "p", "def f(): pass", 3, 0.9),))
    r = s.learn(pkg, ARM)
    assert r.items_used == 0 and r.loss_pre == r.loss_post


def test_local_training_and_forgetting() -> None:
    a = _agent(0)
    d = a.state.data_level(QUIET)
    a.state.skill = d.copy()
    a.state.skill[5] = 0.9  # learnt from a peer: decays toward the data level
    a.end_round()
    assert d[5] < a.state.skill[5] < 0.9
    a.state.skill[0] = 0.1  # below data level: local training lifts it
    a.end_round()
    assert a.state.skill[0] > 0.1


def test_save_load_round_trip(tmp_path: Path) -> None:
    a = make_population(2, alpha=0.1, seed=6)[0]
    t = make_population(2, alpha=0.1, seed=6)[1]
    assert not SyntheticAgent.random(0).load(tmp_path / "nothing")
    a.save(tmp_path)
    doc = json.loads((tmp_path / STATE_FILE).read_text())
    assert doc["version"] == 2
    b = SyntheticAgent.random(99)
    assert b.load(tmp_path)
    assert b.profile() == a.profile() and b.agent_id == a.agent_id
    pkg = t.teach(TeachRequest("s", 0, BALANCED, ARM))
    assert a.learn(pkg, ARM) == b.learn(pkg, ARM)  # rng state restored too


def test_transfer_set_hash() -> None:
    h = SyntheticAgent.random(1).transfer_set_hash()
    assert len(h) == 64 and int(h, 16) >= 0
    assert h == SyntheticAgent.random(2).transfer_set_hash()


def test_family_one_hot_uses_the_profile_slots() -> None:
    """The CPM reads the family one-hot with the profile's layout (knexad/agent/profile.py):
    a synthetic mistral must set the slot ``family_index("mistral")`` names — the world
    once kept its own order with mistral and phi swapped."""
    for name in profile.FAMILIES:
        a = SyntheticAgent.random(3, family=profile.family_index(name))
        assert a.family == name
        assert a.profile()[:8] == [float(i == profile.family_index(name)) for i in range(8)]
    mistral = SyntheticAgent.random(3, family=profile.family_index("mistral"))
    assert mistral.profile()[profile.INDEX_MAP["family.mistral"]] == 1.0


def test_family_groups_and_capacities_follow_the_names() -> None:
    """Same lineage 0.8: {qwen2, llama, mistral}, {gpt2, gpt_neox, bloom}, {phi, other}."""
    i = profile.family_index
    assert COMPAT[i("mistral"), i("llama")] == COMPAT[i("qwen2"), i("mistral")] == 0.8
    assert COMPAT[i("phi"), i("other")] == COMPAT[i("gpt2"), i("bloom")] == 0.8
    assert COMPAT[i("phi"), i("mistral")] == COMPAT[i("phi"), i("qwen2")] == 0.5
    assert COMPAT[i("phi"), i("phi")] == 1.0
    assert FAMILY_CAPACITY[i("mistral")] == 0.9 and FAMILY_CAPACITY[i("phi")] == 0.85


def test_state_saved_with_the_old_family_order_keeps_its_family(tmp_path: Path) -> None:
    """A state saved before the fix has no ``family_name``; index 5 was mistral then."""
    a = SyntheticAgent.random(4, family=profile.family_index("mistral"))
    a.save(tmp_path)
    doc = json.loads((tmp_path / STATE_FILE).read_text())
    del doc["state"]["family_name"]
    doc["version"] = 1
    doc["state"]["family"] = 5  # mistral's slot in the old order
    (tmp_path / STATE_FILE).write_text(json.dumps(doc))
    b = SyntheticAgent.random(0)
    assert b.load(tmp_path)
    assert b.family == "mistral" and b.profile() == a.profile()
