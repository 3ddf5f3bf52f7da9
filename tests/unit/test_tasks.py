"""Built-in task generator and non-IID partition: determinism, disjointness, shape."""

from __future__ import annotations

import random

import pytest

from knexad.agent import tasks
from knexad.agent.tasks import Task


def _exec_ok(source: str) -> bool:
    """Run our *own reference* programs (trusted, generated here) to validate tests."""
    try:
        exec(compile(source, "<task>", "exec"), {})  # noqa: S102 - reference code only
    except AssertionError:
        return False
    return True


def test_generator_is_deterministic_and_large() -> None:
    a = tasks.generate_tasks(250, seed=3)
    b = tasks.generate_tasks(250, seed=3)
    c = tasks.generate_tasks(250, seed=4)
    assert a == b
    assert a != c
    assert len(a) == 3000
    assert len({tasks.prompt_hash(t.prompt) for t in a}) == 3000  # no duplicate prompts


def test_every_category_has_a_correct_reference_and_a_discriminating_test() -> None:
    per_cat = tasks.generate_tasks(8, seed=1)
    for cat in range(tasks.N_CATEGORIES):
        mine = [t for t in per_cat if t.category == cat]
        assert len(mine) == 8
        for t in mine:
            assert t.prompt.startswith(f"def {t.entry_point}(")
            assert t.solution.startswith("    return ") and t.solution.endswith("\n")
            assert t.test.count("assert ") == 3
            assert _exec_ok(t.prompt + t.solution + "\n" + t.test)
        # a body of another category with the same names must fail most tests
        rng = random.Random(cat)
        wrong = 0
        for i, t in enumerate(mine):
            spec = tasks.generate_specs(cat, 8, seed=1)[i]
            body = tasks.render_body(spec, tasks.partner_category(cat, rng))
            try:
                wrong += not _exec_ok(t.prompt + body + "\n" + t.test)
            except Exception:  # noqa: BLE001 - a wrong body may raise anything; that is a fail
                wrong += 1
        assert wrong >= 6, f"category {cat}: tests do not tell operations apart"


def test_pretrain_examples_copy_names_but_never_the_right_operation() -> None:
    rng, twin = random.Random(0), random.Random(0)
    for _ in range(300):
        spec, partner = tasks.pretrain_pair(rng)
        prompt, body = tasks.pretrain_example(twin)
        assert prompt == tasks.render_prompt(spec)
        assert body == tasks.render_body(spec, partner)
        assert partner != spec.category
        assert (partner in tasks.INT_GROUP) == (spec.category in tasks.INT_GROUP)
        assert body != tasks.render_body(spec)  # never the correct mapping
        assert spec.arg in body
        assert (str(spec.k) if spec.category in tasks.INT_GROUP else repr(spec.c)) in body


def test_partition_is_deterministic_and_non_iid() -> None:
    p1 = tasks.partition(6, alpha=0.1, seed=7)
    p2 = tasks.partition(6, alpha=0.1, seed=7)
    p3 = tasks.partition(6, alpha=0.1, seed=8)
    assert p1 == p2
    assert p1.transfer_set_hash() == p2.transfer_set_hash()
    assert p1.transfer_set_hash() != p3.transfer_set_hash()
    for agent in p1.agents:
        hist = agent.histogram()
        assert len(hist) == tasks.N_CATEGORIES and sum(hist) == pytest.approx(1.0)
        assert max(hist) > 0.3  # α = 0.1 concentrates mass
        assert len(agent.train) == 240
        assert {t.category for t in agent.val} == set(range(tasks.N_CATEGORIES))
    # high α spreads it
    flat = tasks.partition(6, alpha=100.0, seed=7)
    assert all(max(a.histogram()) < 0.2 for a in flat.agents)


def test_transfer_and_test_sets_span_all_categories() -> None:
    p = tasks.partition(3, alpha=0.1, seed=0, n_transfer=128, n_test_per_cat=5)
    assert len(p.transfer) == 128
    assert {t.category for t in p.transfer} == set(range(tasks.N_CATEGORIES))
    assert {t.category for t in p.transfer[:12]} == set(range(tasks.N_CATEGORIES))  # mixed
    assert len(p.test) == 60
    assert all(a.test == p.test for a in p.agents)


def test_owned_override_controls_categories() -> None:
    p = tasks.partition(2, seed=0, owned=[(0, 1), (6, 7)])
    assert {t.category for t in p.agents[0].train} == {0, 1}
    assert {t.category for t in p.agents[1].train} == {6, 7}
    assert p.agents[0].own_categories() == (0, 1)


def test_splits_are_disjoint_by_hash() -> None:
    p = tasks.partition(4, alpha=0.5, seed=2)
    p.check_disjoint()  # does not raise
    all_prompts = [t.prompt for a in p.agents for t in a.train + a.val] + \
        [t.prompt for t in p.transfer + p.test]
    assert len(set(map(tasks.prompt_hash, all_prompts))) == len(all_prompts)


def test_assert_disjoint_catches_overlap_even_with_whitespace_changes() -> None:
    t = tasks.generate_tasks(2, seed=0, categories=(3,))
    twin = Task("other-id", 3, t[0].prompt.replace("    ", "\t") + "  ", t[0].solution,
                t[0].test, t[0].entry_point)
    with pytest.raises(ValueError, match="overlap"):
        tasks.assert_disjoint({"train": [t[0]], "test": [t[1], twin]})
    with pytest.raises(ValueError, match="overlap"):
        tasks.assert_disjoint({"train": [t[0], t[0]]})
    tasks.assert_disjoint({"train": [t[0]], "test": [t[1]]})


def test_transfer_hash_depends_on_order_and_content() -> None:
    p = tasks.partition(2, seed=0)
    h = tasks.transfer_set_hash(p.transfer)
    assert len(h) == 64
    assert tasks.transfer_set_hash(tuple(reversed(p.transfer))) != h
    assert tasks.transfer_set_hash(p.transfer[:-1]) != h


def test_partition_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        tasks.partition(0)
    with pytest.raises(ValueError):
        tasks.partition(2, owned=[(0,)])
