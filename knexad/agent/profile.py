"""The 32-d abstract agent profile (design §4): what the CPM may know about an agent.

Pure functions over plain numbers (no torch), so the ML agent and a synthetic agent
build profiles the same way. Never data, never weights.

How the agent measures each slot (the layout itself is the CPM contract,
``protocol/profile.py``)::

    0..7    family one-hot: qwen2, gpt2 (cerebras), gpt_neox (pythia), bloom, llama,
            phi, mistral, other
    8       pass@1            overall, on the shared test set (all categories)
    9       pass@1_own        on the categories of the agent's private data
    10      pass@1_other      on the categories it lacks
    11      task_score        teacher-forced token accuracy on validation
    12      ppl_norm          ln(perplexity) / ln(vocab size), clipped to [0, 1]
                              (1 = no better than uniform, 0 = perfect)
    13      kd_gain           tanh(L_pre − L_post) of the last learn round (0 if none)
    14..19  round-over-round deltas of 8..13, each clipped to [−1, 1] (0 on round 0)
    20..31  category histogram of the private train split (sums to 1)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# the layout is the contract with the CPM; re-exported for the agent's code
from protocol.profile import (  # noqa: F401
    FAMILIES,
    INDEX_MAP,
    N_CAT,
    N_FAMILY,
    PERF_FIELDS,
    PROFILE_DIM,
    PROFILE_FIELDS,
    family_index,
)


@dataclass(frozen=True, slots=True)
class PerfMetrics:
    """The six measured performance numbers, each already in [0, 1] (kd_gain in [−1, 1])."""

    pass1: float = 0.0
    pass1_own: float = 0.0
    pass1_other: float = 0.0
    task_score: float = 0.0
    ppl_norm: float = 1.0
    kd_gain: float = 0.0

    def as_tuple(self) -> tuple[float, ...]:
        return (self.pass1, self.pass1_own, self.pass1_other, self.task_score,
                self.ppl_norm, self.kd_gain)


def normalized_perplexity(mean_loss: float, vocab_size: int) -> float:
    """ln(ppl)/ln(V) = mean CE / ln(V): comparable across vocabularies, in [0, 1]."""
    if vocab_size < 2 or not math.isfinite(mean_loss):
        return 1.0
    return min(max(mean_loss / math.log(vocab_size), 0.0), 1.0)


def kd_gain(loss_pre: float, loss_post: float) -> float:
    return math.tanh(loss_pre - loss_post) if math.isfinite(loss_pre - loss_post) else 0.0


def build_profile(family: str, metrics: PerfMetrics, previous: PerfMetrics | None,
                  histogram: Sequence[float]) -> list[float]:
    """Assemble the 32-d profile; ``previous`` is last round's metrics (None: round 0)."""
    if len(histogram) != N_CAT:
        raise ValueError(f"histogram must have {N_CAT} entries")
    onehot = [0.0] * N_FAMILY
    onehot[family_index(family)] = 1.0
    now = metrics.as_tuple()
    if previous is None:
        deltas = [0.0] * len(now)
    else:
        deltas = [min(max(a - b, -1.0), 1.0) for a, b in zip(now, previous.as_tuple(), strict=True)]
    total = float(sum(histogram))
    hist = [float(h) / total if total > 0 else 0.0 for h in histogram]
    vec = onehot + [float(v) for v in now] + deltas + hist
    assert len(vec) == PROFILE_DIM
    return vec
