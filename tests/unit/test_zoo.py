"""Model zoo: every tiny family builds, tokenizes differently, gets LoRA on the right
modules with a frozen base, and is cached safely. Uses a 3-step pre-training recipe in a
temporary cache so the structure is tested without the real pre-training cost."""

from __future__ import annotations

import dataclasses
import os
import threading

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from knexad.agent import zoo  # noqa: E402

EXPECTED_TARGETS = {
    "tiny-qwen2": ("qwen2", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                             "down_proj"}),
    "tiny-gpt2": ("gpt2", {"c_attn", "c_proj", "c_fc"}),
    "tiny-neox": ("gpt_neox", {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}),
    "tiny-bloom": ("bloom", {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}),
}


@pytest.fixture()
def quick_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KNEXA_CACHE", str(tmp_path))
    for fam, recipe in list(zoo.TINY_RECIPES.items()):
        monkeypatch.setitem(zoo.TINY_RECIPES, fam,
                            dataclasses.replace(recipe, pretrain_steps=3, pretrain_batch=4))
    return tmp_path


@pytest.mark.parametrize("family", zoo.TINY_FAMILIES)
def test_tiny_family_builds_with_lora_on_family_targets(quick_cache, family) -> None:
    lm = zoo.load_model(family, seed=0, device=torch.device("cpu"), dtype=torch.float32)
    hf_family, targets = EXPECTED_TARGETS[family]
    assert lm.family == hf_family
    assert set(lm.lora_targets) == targets
    lora_parents = {name.split(".lora_A")[0].rsplit(".", 1)[-1]
                    for name, _ in lm.model.named_parameters() if ".lora_A" in name}
    assert lora_parents == targets
    for name, p in lm.model.named_parameters():
        assert p.requires_grad == ("lora_" in name), name  # base frozen, LoRA trainable
    assert 0.0 < lm.trainable_share < 0.30
    assert 0.5e6 < lm.total_params - lm.trainable_params < 1.5e6
    assert 450 <= len(lm.tokenizer) <= 720
    assert (zoo.tiny_base_path(family) / "knexa_base.json").exists()


def test_families_tokenize_differently(quick_cache) -> None:
    text = 'def calc_foo(nums):\n    """Return the sum of the numbers in nums plus 47."""\n'
    seen = {}
    for fam in zoo.TINY_FAMILIES:
        tok = zoo.train_tokenizer(zoo.TINY_RECIPES[fam])
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text  # byte-level: lossless round trip
        seen[fam] = (len(tok), tuple(ids))
    assert len({v[0] for v in seen.values()}) == 4  # four vocab sizes
    assert len({v[1] for v in seen.values()}) == 4  # four different encodings


def test_second_load_uses_cache_and_lora_init_is_seeded(quick_cache) -> None:
    zoo.ensure_tiny_base("tiny-gpt2")
    path = zoo.tiny_base_path("tiny-gpt2")
    mtime = (path / "config.json").stat().st_mtime
    def no_build(*args, **kwargs):
        raise AssertionError("a cached base was built again")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(zoo, "pretrain_base", no_build)
        assert zoo.ensure_tiny_base("tiny-gpt2") == path
    assert (path / "config.json").stat().st_mtime == mtime
    a = zoo.load_model("tiny-gpt2", seed=5, device=torch.device("cpu"))
    b = zoo.load_model("tiny-gpt2", seed=5, device=torch.device("cpu"))
    for (na, pa), (nb, pb) in zip(a.model.named_parameters(), b.model.named_parameters(),
                                  strict=True):
        assert na == nb and torch.equal(pa, pb)


def test_concurrent_builds_produce_one_complete_model(quick_cache) -> None:
    results, errors = [], []

    def build() -> None:
        try:
            results.append(zoo.ensure_tiny_base("tiny-neox"))
        except Exception as exc:  # noqa: BLE001 - surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1 and (results[0] / "model.safetensors").exists()
    leftovers = [p.name for p in results[0].parent.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == []


def test_unknown_specs_are_rejected(quick_cache, tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        zoo.resolve_path(str(tmp_path / "nope"))
    with pytest.raises(ValueError):
        zoo.ensure_tiny_base("tiny-nothing")


def test_family_mapping_and_generic_targets(quick_cache) -> None:
    assert zoo.family_of("gpt_neox") == "gpt_neox"
    assert zoo.family_of("phi3") == "phi"
    assert zoo.family_of("mamba") == "other"
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(zoo.ensure_tiny_base("tiny-bloom"))
    generic = zoo.lora_targets_for(base, "other")
    assert {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"} <= set(generic)
    assert "lm_head" not in generic


def test_tiny_models_pin_one_cpu_thread_unless_the_operator_chose(monkeypatch) -> None:
    """Several tiny-model daemons on one machine must not each spin cpu_count OpenMP
    threads (16x slower steps measured with 4 trainers); an explicit OMP_NUM_THREADS wins."""
    before = torch.get_num_threads()
    cpu = torch.device("cpu")
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(2)
        assert zoo.configure_cpu_threads("smollm2", cpu) == 2  # real model: torch's choice
        assert zoo.configure_cpu_threads("tiny-gpt2", torch.device("meta")) == 2  # not the CPU
        assert zoo.configure_cpu_threads("tiny-gpt2", cpu) == 1
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert zoo.configure_cpu_threads("tiny-gpt2", cpu) == 2
    finally:
        torch.set_num_threads(before)


def test_model_loading_leaves_no_library_output(tmp_path) -> None:
    """A daemon's stderr is its JSON log and the harness's is the user's terminal: loading
    a model must print no transformers/peft warning and no progress bar — also when
    TRANSFORMERS_VERBOSITY=error was inherited from the harness (the daemons' case)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import dataclasses
        from knexad.agent import zoo
        for fam, r in list(zoo.TINY_RECIPES.items()):
            zoo.TINY_RECIPES[fam] = dataclasses.replace(r, pretrain_steps=3, pretrain_batch=4)
        zoo.load_model("tiny-gpt2")
    """)
    env = {**os.environ, "KNEXA_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ours = ("agent.zoo.",)  # our own structlog events (default renderer, stdout)
    foreign = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()
               and not any(tag in line for tag in ours)]
    assert foreign == [], foreign
