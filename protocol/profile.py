"""The agent↔CPM contract: what the 32 numbers of a Profile mean, the model families and
their lineages, the task categories, and the distillation arms a Directive carries.

One home for all of it (docs/architecture.md §Contract): the ML agent and the synthetic
world build profiles from these names, the CPM's features read them by the same names,
the sim and the benchmarks use the same arms. Two own copies once disagreed (a synthetic
"mistral" advertised the "phi" slot). Stdlib only, like the rest of ``protocol``.

Layout (docs/protocol.md §Profile)::

    0..7    family one-hot, in FAMILIES order
    8..13   perf: pass@1, pass@1_own, pass@1_other, task_score, ppl_norm, kd_gain
            (measured on the agent's own validation split, never on the shared test set:
            the CPM selects partners from these numbers)
    14..19  round-over-round deltas of 8..13, each in [−1, 1] (0 on round 0)
    20..31  category histogram of the private train split (sums to 1)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import MalformedFrame

# -- task categories ---------------------------------------------------------------------
N_CATEGORIES = 12

# -- model families and lineages ---------------------------------------------------------
FAMILIES: tuple[str, ...] = ("qwen2", "gpt2", "gpt_neox", "bloom", "llama", "phi", "mistral", "other")
FAMILY_ALIASES: dict[str, str] = {
    "cerebras": "gpt2", "pythia": "gpt_neox", "qwen": "qwen2", "smollm2": "llama",
    "tiny-qwen2": "qwen2", "tiny-gpt2": "gpt2", "tiny-neox": "gpt_neox", "tiny-bloom": "bloom",
}
# How close two families' tokenizers and architectures are: llama-style decoders,
# GPT-2-style byte-level BPE models, and the rest.
LINEAGES: tuple[str, ...] = ("llama-style", "gpt2-style", "other")
LINEAGE_OF: dict[str, int] = {"qwen2": 0, "llama": 0, "mistral": 0, "gpt2": 1, "gpt_neox": 1, "bloom": 1,
                              "phi": 2, "other": 2}
FAMILY_LINEAGE: tuple[int, ...] = tuple(LINEAGE_OF[f] for f in FAMILIES)  # lineage of each family slot


def family_index(family: str) -> int:
    """One-hot slot of a family name, an alias or an HF ``model_type`` (unknown → other)."""
    name = FAMILY_ALIASES.get(family, family)
    return FAMILIES.index(name) if name in FAMILIES else FAMILIES.index("other")


# -- the profile vector ------------------------------------------------------------------
PERF_FIELDS: tuple[str, ...] = ("pass@1", "pass@1_own", "pass@1_other", "task_score", "ppl_norm", "kd_gain")
N_FAMILY, N_PERF, N_CAT = len(FAMILIES), 2 * len(PERF_FIELDS), N_CATEGORIES
PROFILE_DIM = N_FAMILY + N_PERF + N_CAT

FAMILY = slice(0, N_FAMILY)
PERF = slice(N_FAMILY, N_FAMILY + len(PERF_FIELDS))  # the six measurements
DELTA = slice(PERF.stop, N_FAMILY + N_PERF)  # their round-over-round deltas
PERF_AND_DELTA = slice(N_FAMILY, N_FAMILY + N_PERF)
HIST = slice(N_FAMILY + N_PERF, PROFILE_DIM)

PROFILE_FIELDS: tuple[str, ...] = (
    tuple(f"family.{f}" for f in FAMILIES)
    + tuple(f"perf.{f}" for f in PERF_FIELDS)
    + tuple(f"delta.{f}" for f in PERF_FIELDS)
    + tuple(f"hist.{i}" for i in range(N_CAT))
)
INDEX_MAP: dict[str, int] = {name: i for i, name in enumerate(PROFILE_FIELDS)}
PASS1 = INDEX_MAP["perf.pass@1"]
assert len(PROFILE_FIELDS) == PROFILE_DIM == 32


def check_profile(vector: Sequence[float]) -> None:
    """A Profile's vector must have exactly ``PROFILE_DIM`` entries."""
    if len(vector) != PROFILE_DIM:
        raise MalformedFrame(f"profile vector must have {PROFILE_DIM} entries, got {len(vector)}")


def decode_profile(vector: Sequence[float]) -> dict[str, float]:
    """The profile as named fields (``PROFILE_FIELDS``): what the CPM learns about an agent."""
    check_profile(vector)
    return {name: float(v) for name, v in zip(PROFILE_FIELDS, vector, strict=True)}


def profile_family(vector: Sequence[float]) -> str:
    """The family a profile advertises (its one-hot's largest slot)."""
    onehot = list(vector[FAMILY])
    return FAMILIES[onehot.index(max(onehot))]


# -- distillation arms -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ProtocolArm:
    """Distillation protocol k (Eq. 2 knobs). A Directive carries alpha, temperature and
    n_samples; ``items`` is how many transfer prompts the CPM puts in it (0 = all)."""

    alpha: float = 0.4  # weight of L_KD in L = (1 − α) L_local + α L_KD
    temperature: float = 2.0  # KD temperature where both sides share a tokenizer
    n_samples: int = 1  # completions per transfer prompt
    items: int = 0


# gentle, default, strong-with-two-samples
DEFAULT_ARMS: tuple[ProtocolArm, ...] = (
    ProtocolArm(alpha=0.2, temperature=1.5, n_samples=1, items=64),
    ProtocolArm(alpha=0.4, temperature=2.0, n_samples=1, items=0),
    ProtocolArm(alpha=0.6, temperature=2.5, n_samples=2, items=0),
)
DEFAULT_ARM_INDEX = 1
DEFAULT_ARM = DEFAULT_ARMS[DEFAULT_ARM_INDEX]


# -- the default (synthetic) transfer set ------------------------------------------------
# A CPM and daemons initialised with defaults must agree on the transfer set without
# either side importing the other: its prompts are defined here, by the contract.
DEFAULT_TRANSFER_SIZE = 128  # the paper's transfer-set size; the CPM's default transfer_size


def synthetic_transfer_prompts(size: int = DEFAULT_TRANSFER_SIZE) -> list[str]:
    """The synthetic agents' shared transfer set: prompt i belongs to category i mod 12."""
    return [f'def task_{i}(x):\n    """Category {i % N_CATEGORIES}: transform x (case {i})."""\n' for i in range(size)]


def synthetic_transfer_hash(size: int = DEFAULT_TRANSFER_SIZE) -> str:
    """Hex SHA-256 of the synthetic transfer set — the CPM's default ``transfer_hash``."""
    h = hashlib.sha256()
    for prompt in synthetic_transfer_prompts(size):
        h.update(prompt.encode())
    return h.hexdigest()
