"""One contract, two producers: a profile built by the ML agent's builder and one built
by the synthetic world decode to the same named fields (protocol/profile.py), so the
CPM — and the simulator's bandit — see the same meaning in every slot."""

from __future__ import annotations

import pytest

from knexad.agent.profile import PerfMetrics, build_profile
from knexad.agent_api import ProtocolArm, TeachRequest
from knexad.synthetic import make_population
from protocol import profile as contract
from protocol.errors import MalformedFrame


def _check_ranges(fields: dict[str, float]) -> None:
    for name in contract.PERF_FIELDS:
        lo = -1.0 if name == "kd_gain" else 0.0
        assert lo <= fields[f"perf.{name}"] <= 1.0, name
        assert -1.0 <= fields[f"delta.{name}"] <= 1.0, name
    assert sum(fields[f"hist.{i}"] for i in range(contract.N_CATEGORIES)) == pytest.approx(1.0)
    assert sum(fields[f"family.{f}"] for f in contract.FAMILIES) == 1.0


def test_the_ml_builder_and_the_synthetic_world_fill_the_same_fields() -> None:
    hist = [1.0 / contract.N_CATEGORIES] * contract.N_CATEGORIES
    ml = contract.decode_profile(build_profile("tiny-qwen2", PerfMetrics(0.3, 0.6, 0.1, 0.7, 0.4, 0.05), None, hist))
    agent = make_population(3, alpha=0.1, seed=5)[0]
    synthetic = contract.decode_profile(agent.profile())
    assert list(ml) == list(synthetic) == list(contract.PROFILE_FIELDS)
    for fields in (ml, synthetic):
        _check_ranges(fields)
    assert contract.profile_family(agent.profile()) == agent.family
    assert contract.profile_family(build_profile("tiny-qwen2", PerfMetrics(), None, hist)) == "qwen2"
    # the same slot means the same measurement: pass@1 overall vs on its own categories
    st = agent.state
    assert synthetic["perf.pass@1"] == pytest.approx(float(st.skill.mean()))
    assert synthetic["perf.pass@1_own"] == pytest.approx(float(st.hist @ st.skill))


def test_synthetic_deltas_are_round_over_round_changes_of_the_same_fields() -> None:
    teacher, student = make_population(2, alpha=0.1, seed=1)
    before = contract.decode_profile(student.profile())
    assert all(before[f"delta.{name}"] == 0.0 for name in contract.PERF_FIELDS)  # round 0
    arm = ProtocolArm()
    learned = student.learn(teacher.teach(TeachRequest("d", 0, tuple(range(24)), arm, student.family)), arm)
    mid = contract.decode_profile(student.profile())
    student.end_round()
    after = contract.decode_profile(student.profile())
    for name in contract.PERF_FIELDS:
        assert after[f"delta.{name}"] == pytest.approx(
            max(-1.0, min(1.0, after[f"perf.{name}"] - mid[f"perf.{name}"]))), name
    assert after["perf.kd_gain"] != 0.0 and learned.loss_pre != learned.loss_post


def test_a_vector_of_the_wrong_length_is_refused() -> None:
    with pytest.raises(MalformedFrame):
        contract.decode_profile([0.0] * 31)
