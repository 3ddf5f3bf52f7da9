"""MLAgent against the Agent protocol, the 32-d profile, and checkpoint round trips.

Runs on a 3-step pre-trained tiny base in a temporary cache and a handful of LoRA steps:
these tests check behaviour of the plumbing, not model quality (test_kd_effect does)."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from knexad.agent import profile, zoo  # noqa: E402
from knexad.agent.ml_agent import DataConfig, MLAgent, StepsConfig  # noqa: E402
from knexad.agent_api import (Agent, KnowledgeItem, KnowledgePackage, ProtocolArm,  # noqa: E402
                              TeachRequest)

STEPS = StepsConfig(local=4, kd=3, batch_size=4, max_new_tokens=12)
DATA = DataConfig(n_train=24, n_val_per_cat=1, n_test_per_cat=1, n_transfer=24,
                  owned=((0, 1), (6, 7)))


@pytest.fixture()
def quick_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KNEXA_CACHE", str(tmp_path_factory.mktemp("cache")))
    for fam, recipe in list(zoo.TINY_RECIPES.items()):
        monkeypatch.setitem(zoo.TINY_RECIPES, fam,
                            dataclasses.replace(recipe, pretrain_steps=3, pretrain_batch=4))


def _agent(index: int = 0, model: str = "tiny-qwen2") -> MLAgent:
    return MLAgent(model, index, 2, seed=3, steps=STEPS, data=DATA, device=torch.device("cpu"))


# -- profile (pure) -------------------------------------------------------------------


def test_profile_index_map_is_complete_and_ordered() -> None:
    assert profile.PROFILE_DIM == 32 == len(profile.INDEX_MAP)
    assert profile.INDEX_MAP["family.qwen2"] == 0
    assert profile.INDEX_MAP["family.other"] == 7
    assert profile.INDEX_MAP["perf.pass@1"] == 8
    assert profile.INDEX_MAP["delta.pass@1"] == 14
    assert profile.INDEX_MAP["hist.0"] == 20 and profile.INDEX_MAP["hist.11"] == 31


def test_build_profile_values() -> None:
    hist = [0.0] * 12
    hist[3], hist[4] = 3.0, 1.0
    now = profile.PerfMetrics(0.5, 0.9, 0.1, 0.8, 0.2, 0.3)
    prev = profile.PerfMetrics(0.25, 0.9, 0.0, 0.7, 0.4, -0.9)
    vec = profile.build_profile("tiny-neox", now, prev, hist)
    assert len(vec) == 32
    assert vec[:8] == [0, 0, 1, 0, 0, 0, 0, 0]
    assert vec[8:14] == [0.5, 0.9, 0.1, 0.8, 0.2, 0.3]
    assert vec[14] == pytest.approx(0.25) and vec[18] == pytest.approx(-0.2)
    assert vec[19] == pytest.approx(1.0)  # 0.3 − (−0.9) clipped to 1
    assert vec[23] == pytest.approx(0.75) and vec[24] == pytest.approx(0.25)
    first = profile.build_profile("mamba", now, None, hist)
    assert first[7] == 1.0 and first[14:20] == [0.0] * 6
    with pytest.raises(ValueError):
        profile.build_profile("qwen2", now, None, [1.0])


def test_profile_helpers() -> None:
    assert profile.family_index("cerebras") == profile.family_index("gpt2") == 1
    assert profile.family_index("pythia") == 2
    assert profile.normalized_perplexity(math.log(512), 512) == pytest.approx(1.0)
    assert profile.normalized_perplexity(0.0, 512) == 0.0
    assert profile.normalized_perplexity(float("nan"), 512) == 1.0
    assert profile.kd_gain(1.0, 0.5) == pytest.approx(math.tanh(0.5))


# -- agent ----------------------------------------------------------------------------


def test_agent_implements_protocol_and_teaches(quick_cache) -> None:
    teacher = _agent(1)
    teacher.verify_knowledge = False  # the shape of what is generated (a 4-step model passes no test)
    assert isinstance(teacher, Agent)
    assert teacher.transfer_set_hash() == _agent(0).transfer_set_hash()
    req = TeachRequest("dir-1", 0, (0, 3, 5, 999), ProtocolArm(n_samples=2))
    pkg = teacher.teach(req)
    assert pkg.teacher_family == "tiny-qwen2"
    assert len(pkg.items) == 6  # 3 valid ids × 2 samples, id 999 ignored
    assert [it.item_id for it in pkg.items] == ["0", "3", "5", "0.1", "3.1", "5.1"]
    for it in pkg.items:
        tid = int(it.item_id.split(".")[0])
        assert it.prompt == teacher.transfer[tid].prompt
        assert it.category == teacher.transfer[tid].category
        assert it.completion.endswith("\n") and it.completion.count("\n") == 1
    assert pkg.meta["round"] == 0 and pkg.meta["transfer_hash"] == teacher.transfer_set_hash()


def test_learn_filters_foreign_and_broken_items(quick_cache) -> None:
    student = _agent(0)
    good = student.transfer[0]
    items = (
        KnowledgeItem("0", good.prompt, good.solution, good.category),
        KnowledgeItem("1", "def evil():\n    pass\n", "    return 1\n"),  # not our transfer
        KnowledgeItem("2", student.transfer[1].prompt, "    return (((\n"),  # syntax error
        KnowledgeItem("3", student.transfer[2].prompt, ""),
    )
    res = student.learn(KnowledgePackage("tiny-gpt2", items, {"round": 2}), ProtocolArm())
    assert res.items_used == 1
    assert math.isfinite(res.loss_pre) and math.isfinite(res.loss_post)
    assert res.train_seconds > 0 and res.steps == STEPS.kd
    # nothing accepted: the round still trains a KD round's steps (on private data), the
    # compute of a LocalOnly round
    empty = student.learn(KnowledgePackage("tiny-gpt2", items[1:2], {}), ProtocolArm())
    assert empty.items_used == 0 and empty.steps == STEPS.kd


def test_execution_verified_distillation_keeps_only_completions_that_pass(quick_cache, monkeypatch) -> None:
    """A parsable but wrong completion is refused by the student's own sandbox run of the
    transfer task's public tests; a teacher sends only what passes there."""
    student = _agent(0)
    t0, t1, t2 = student.transfer[:3]
    wrong = "    return None\n"
    items = (KnowledgeItem("0", t0.prompt, t0.solution, t0.category),
             KnowledgeItem("1", t1.prompt, wrong, t1.category),
             KnowledgeItem("2", t2.prompt, t2.solution, t2.category))
    assert student.learn(KnowledgePackage("tiny-gpt2", items, {"round": 1}), ProtocolArm()).items_used == 2
    trusting = _agent(0)
    trusting.verify_knowledge = False
    assert trusting.learn(KnowledgePackage("tiny-gpt2", items, {"round": 1}), ProtocolArm()).items_used == 3

    teacher = _agent(1)
    answers = {t0.prompt: t0.solution, t1.prompt: wrong, t2.prompt: t2.solution}
    monkeypatch.setattr(teacher, "_generate", lambda prompts, **kw: [answers[p] for p in prompts])
    package = teacher.teach(TeachRequest("d", 1, (0, 1, 2), ProtocolArm(n_samples=1), "tiny-gpt2"))
    assert [it.prompt for it in package.items] == [t0.prompt, t2.prompt]
    teacher.verify_knowledge = False
    assert len(teacher.teach(TeachRequest("d", 1, (0, 1, 2), ProtocolArm(n_samples=1), "tiny-gpt2")).items) == 3


def test_evaluate_uses_sandbox_programs_and_profile_reflects_it(quick_cache, monkeypatch) -> None:
    """Test and validation programs run in one sandbox call; the reported pass@1 is the
    test set's, the profile's perf block the validation split's — the CPM never sees a
    number measured on the test set (nor does a student, in the items' scores)."""
    from knexad.agent import evaluate

    seen: list[list[str]] = []
    n_test = len(_agent(0).split.test)

    def fake_check(programs, timeout_s=5.0, memory_mb=512):
        seen.append(list(programs))
        # test programs: every other one passes; validation programs: all fail
        return [i < n_test and i % 2 == 0 for i in range(len(programs))]

    monkeypatch.setattr(evaluate, "check_programs", fake_check)
    agent = _agent(0)
    metrics = agent.evaluate()
    test, val = agent.split.test, agent.split.val
    assert len(seen) == 1 and len(seen[0]) == len(test) + len(val) and len(test) == 12 and len(val) > 0
    assert all(p.startswith(t.prompt) and p.endswith(t.test) for p, t in zip(seen[0], list(test) + list(val)))
    assert metrics["pass@1"] == pytest.approx(0.5) and metrics["val_pass@1"] == 0.0
    own = {0, 1}
    exp_own = sum(i % 2 == 0 for i, t in enumerate(test) if t.category in own) / 2
    assert metrics["pass@1_own"] == pytest.approx(exp_own)
    for key in ("pass@1_other", "task_score", "ppl_norm", "val_pass@1_own", "val_pass@1_other"):
        assert 0.0 <= metrics[key] <= 1.0
    vec = agent.profile()
    assert len(vec) == 32 and vec[0] == 1.0 and sum(vec[:8]) == 1.0
    assert vec[profile.INDEX_MAP["perf.pass@1"]] == 0.0  # validation, not the test set's 0.5
    assert vec[profile.INDEX_MAP["perf.pass@1_own"]] == 0.0 == vec[profile.INDEX_MAP["perf.pass@1_other"]]
    assert vec[20] == pytest.approx(0.5) and vec[21] == pytest.approx(0.5)
    assert agent.last_evaluation() == metrics
    request = TeachRequest("d", 0, (0, 1, 2), ProtocolArm(), "tiny-gpt2")
    assert all(item.score == 0.0 for item in agent.teach(request).items)  # validation per-category scores


def test_val_pass1_counts_only_validation_programs(quick_cache, monkeypatch) -> None:
    from knexad.agent import evaluate

    n_test = len(_agent(0).split.test)
    monkeypatch.setattr(evaluate, "check_programs",
                        lambda programs, timeout_s=5.0, memory_mb=512: [i >= n_test for i in range(len(programs))])
    agent = _agent(0)
    metrics = agent.evaluate()
    assert metrics["pass@1"] == 0.0 and metrics["val_pass@1"] == 1.0
    assert agent.profile()[profile.INDEX_MAP["perf.pass@1"]] == 1.0


def test_evaluate_reruns_only_after_the_weights_changed(quick_cache, monkeypatch, tmp_path) -> None:
    """A teacher's round changes no weight: its end-of-round evaluation must not pay for
    generation + sandbox again, yet report what a re-run would (deltas 0)."""
    from knexad.agent import evaluate

    calls: list[int] = []

    def counting_check(programs, timeout_s=5.0, memory_mb=512):
        calls.append(len(programs))
        return [len(calls) % 2 == 1] * len(programs)  # differs per call: a stale cache would show

    monkeypatch.setattr(evaluate, "check_programs", counting_check)
    agent = _agent(0)
    agent.verify_knowledge = False  # its sandbox runs would count as evaluations here
    agent.reward_measure = "val_loss"  # so would val_pass's check after a KD round (next test)
    first = agent.evaluate()
    assert len(calls) == 1 and first["pass@1"] == 1.0
    again = agent.evaluate()  # nothing trained since: no generation, no sandbox run
    assert len(calls) == 1 and again == first
    assert agent._state.prev_metrics == agent._state.metrics
    vec = agent.profile()
    assert vec[profile.INDEX_MAP["delta.pass@1"]] == 0.0

    bad = KnowledgePackage("tiny-gpt2", (KnowledgeItem("x", "def f():\n", "    pass\n"),), {"round": 0})
    agent.learn(bad, ProtocolArm())  # nothing accepted: a KD round's steps on private data
    assert agent.evaluate()["pass@1"] == 0.0 and len(calls) == 2  # the weights changed

    good = tuple(KnowledgeItem(str(i), t.prompt, t.solution, t.category) for i, t in enumerate(agent.transfer[:4]))
    assert agent.learn(KnowledgePackage("tiny-gpt2", good, {"round": 0}), ProtocolArm()).items_used == 4
    # KD steps changed the weights: must re-evaluate
    after = agent.evaluate()
    assert len(calls) == 3 and after["pass@1"] == 1.0
    agent.save(tmp_path / "ck")  # saved with the metrics of exactly these weights
    agent.local_round(steps=1)
    agent.save(tmp_path / "stale")  # weights changed since the last evaluation
    agent.evaluate()
    assert len(calls) == 4
    restored = _agent(0)
    assert restored.load(tmp_path / "ck") and restored.evaluate() == after and len(calls) == 4
    assert restored.load(tmp_path / "stale")
    restored.evaluate()  # no metrics for these weights: a real evaluation
    assert len(calls) == 5


def test_val_pass_reward_is_the_validation_error_rate_before_and_after_kd(quick_cache, monkeypatch) -> None:
    """The default reward measure: L_pre = 1 − val pass@1 of the weights the profile was
    evaluated with (no new run), L_post = the same after the KD steps (one sandbox run of
    the validation programs only); val_loss reports the token cross-entropy instead."""
    from knexad.agent import evaluate

    calls: list[int] = []

    def check(programs, timeout_s=5.0, memory_mb=512):
        calls.append(len(programs))
        return [len(calls) > 1] * len(programs)  # fails everything before KD, passes after

    monkeypatch.setattr(evaluate, "check_programs", check)
    agent = _agent(0)
    agent.verify_knowledge = False
    assert agent.reward_measure == "val_pass"
    assert agent.evaluate()["val_pass@1"] == 0.0 and len(calls) == 1
    good = tuple(KnowledgeItem(str(i), t.prompt, t.solution, t.category) for i, t in enumerate(agent.transfer[:4]))
    res = agent.learn(KnowledgePackage("tiny-gpt2", good, {"round": 0}), ProtocolArm())
    assert (res.loss_pre, res.loss_post) == (1.0, 0.0)
    assert calls == [len(agent.split.test) + len(agent.split.val), len(agent.split.val)]
    assert agent._state.kd_gain == pytest.approx(math.tanh(1.0))  # the profile's kd-gain slot agrees

    calls.clear()
    ce = _agent(0)
    ce.verify_knowledge = False
    ce.reward_measure = "val_loss"
    ce.evaluate()
    res = ce.learn(KnowledgePackage("tiny-gpt2", good, {"round": 0}), ProtocolArm())
    assert len(calls) == 1 and res.loss_pre > 1.0  # cross-entropy of a barely trained model, no extra run
    with pytest.raises(ValueError, match="reward_measure"):
        MLAgent("tiny-qwen2", 0, 2, seed=3, steps=STEPS, data=DATA, reward_measure="vibes")


def test_checkpoint_round_trip_restores_outputs_and_counters(quick_cache, tmp_path) -> None:
    a = _agent(0)
    pkg = _agent(1).teach(TeachRequest("d", 0, tuple(range(8)), ProtocolArm()))
    a.learn(pkg, ProtocolArm())
    prompts = [t.prompt for t in a.split.test]
    before = a._generate(prompts)
    a.save(tmp_path / "ckpt")
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {
        "adapter.safetensors", "optimizer.safetensors", "state.json"}

    b = _agent(0)
    assert b.load(tmp_path / "empty") is False
    assert b.load(tmp_path / "ckpt") is True
    assert b._state.trained and b._state.round == 1 and b._state.step == a._state.step
    assert b._generate(prompts) == before
    sa = a._lm.model.state_dict()
    sb = b._lm.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if "lora_" in k)
    opt_a, opt_b = a._opt.state_dict()["state"], b._opt.state_dict()["state"]
    assert opt_a.keys() == opt_b.keys()
    assert all(torch.equal(opt_a[i]["exp_avg"], opt_b[i]["exp_avg"]) for i in opt_a)
    # training continues identically from the restored state
    assert a.learn(pkg, ProtocolArm()).loss_post == pytest.approx(
        b.learn(pkg, ProtocolArm()).loss_post, rel=1e-5)

    other = MLAgent("tiny-gpt2", 0, 2, seed=3, steps=STEPS, data=DATA)
    with pytest.raises(ValueError):
        other.load(tmp_path / "ckpt")


def test_local_round_is_the_fair_local_only_twin(quick_cache) -> None:
    agent = _agent(0)
    res = agent.local_round(steps=2)
    assert res.items_used == 0 and math.isfinite(res.loss_post)
    assert agent._state.step == STEPS.local + 2


def test_replay_keeps_accepted_items_and_rehearses_them_in_local_rounds(quick_cache, monkeypatch, tmp_path) -> None:
    """``replay_knowledge``: the verified items a student accepted become the L_KD term of
    its later local rounds (same steps), survive a checkpoint, and are bounded; off, a
    local round trains on private data only and nothing is kept."""
    from knexad.agent import distill, ml_agent

    seen: list[int] = []
    real = distill.distill
    monkeypatch.setattr(distill, "distill", lambda *a, **kw: seen.append(len(kw["kd"])) or real(*a, **kw))
    student = _agent(0)
    assert student.replay_knowledge  # the default since the tuning seeds (docs/results.md §6)
    t0, t1 = student.transfer[:2]
    items = (KnowledgeItem("0", t0.prompt, t0.solution, t0.category),
             KnowledgeItem("1", t1.prompt, "    return None\n", t1.category))  # fails its tests
    assert student.learn(KnowledgePackage("tiny-gpt2", items, {"round": 1}), ProtocolArm()).items_used == 1
    assert student._state.kept == [[t0.prompt, t0.solution]]
    seen.clear()
    res = student.local_round()
    assert seen == [1] and res.steps == STEPS.kd and res.items_used == 0
    student.save(tmp_path / "ck")
    again = _agent(0)
    assert again.load(tmp_path / "ck") and again._state.kept == [[t0.prompt, t0.solution]]

    student._keep([KnowledgeItem(str(i), f"p{i}", "c", 0) for i in range(ml_agent.KEEP_MAX + 5)])
    assert len(student._state.kept) == ml_agent.KEEP_MAX and student._state.kept[-1] == [f"p{ml_agent.KEEP_MAX + 4}", "c"]

    plain = _agent(0)
    plain.replay_knowledge = False
    plain.learn(KnowledgePackage("tiny-gpt2", items, {"round": 1}), ProtocolArm())
    seen.clear()
    plain.local_round()
    assert plain._state.kept == [] and seen == [0]


def test_bad_agent_index_rejected() -> None:
    with pytest.raises(ValueError):
        MLAgent("tiny-qwen2", 2, 2)


def test_step_seconds_measures_and_sets_the_thread_count(quick_cache) -> None:
    from knexad.agent.ml_agent import step_seconds

    before = torch.get_num_threads()
    try:
        assert step_seconds("tiny-qwen2", steps=1, threads=1) > 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
