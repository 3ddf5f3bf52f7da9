"""Pair context φ(teacher, student, protocol) for the matchmaker (design §4).

Why not the paper's [p_t, p_s]: a linear model over a concatenation is *separable*,
score(t, s) = f(t) + g(s), so it can learn "good teachers" and "needy students" but never
"this teacher has what this student lacks". φ therefore adds pairwise terms (histogram
distance, JS, "lack" mass, same family, same lineage, pass@1 gap) and a per-arm block, so
the value of a protocol can depend on the pair. The profile layout is the contract's
(``protocol.profile``). The context layout index by index, why each term (lineage, arm
block) and what each was measured to add: docs/matchmaking.md §Pair context φ.
"""

from __future__ import annotations

import numpy as np

from protocol.profile import (
    FAMILY,
    FAMILY_LINEAGE,
    HIST,
    LINEAGES,
    PASS1,
    PROFILE_DIM,
)

N_LINEAGES = len(LINEAGES)
LINEAGE_ONEHOT = np.eye(N_LINEAGES)[list(FAMILY_LINEAGE)]  # (8, 3): family slot → lineage

OFF_BIAS = 0
OFF_T = 1
OFF_S = OFF_T + PROFILE_DIM  # 33
OFF_ABS = OFF_S + PROFILE_DIM  # 65
ABS_DIMS = HIST
N_ABS = 12
OFF_JS = OFF_ABS + N_ABS  # 77
OFF_LACK = OFF_JS + 1  # 78
OFF_GAP = OFF_LACK + 1  # 79
OFF_SAME = OFF_GAP + 1  # 80
OFF_LIN = OFF_SAME + 1  # 81
OFF_ARM = OFF_LIN + 1  # 82
ARM_FEATS = 10  # per arm: [1, lack, same, gap, lack·same, gap·same, lack·π_t, lack·π_s, lin, gap·lin]

DEFAULT_N_ARMS = 3

# Numbered context layouts, for a saved bandit: 1 = before the lineage flag (d = 81 + 8K:
# no dim 81, 8 values per arm — the first 8 of today's 10), 2 = this one.
LAYOUT = 2
V1_ARM_FEATS = 8


def context_dim(n_arms: int = DEFAULT_N_ARMS) -> int:
    return OFF_ARM + ARM_FEATS * n_arms


def v1_context_dim(n_arms: int = DEFAULT_N_ARMS) -> int:
    return OFF_LIN + V1_ARM_FEATS * n_arms


def v1_dims(n_arms: int = DEFAULT_N_ARMS) -> np.ndarray:
    """Position in today's φ of every dim of a layout-1 φ (all of them still exist, with
    the same meaning): bias … same family in place, arm k's 8 values at the start of its
    new block. The dims not listed (lineage) are the ones layout 1 did not have."""
    arms = OFF_ARM + ARM_FEATS * np.arange(n_arms)[:, None] + np.arange(V1_ARM_FEATS)
    return np.concatenate([np.arange(OFF_LIN), arms.ravel()])


def _entropy_bits(p: np.ndarray) -> np.ndarray:
    """Shannon entropy (bits) along the last axis, with 0·log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0)
    return -terms.sum(axis=-1)


def _normalize_hist(p: np.ndarray) -> np.ndarray:
    """Clip at 0 and renormalise (uniform if empty): a slightly-off peer histogram must
    not produce NaN."""
    p = np.clip(np.asarray(p, dtype=float), 0.0, None)
    ps = p.sum(axis=-1, keepdims=True)
    return np.where(ps > 0, p / np.where(ps > 0, ps, 1.0), 1.0 / p.shape[-1])


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen–Shannon divergence in bits along the last axis (broadcasting), in [0, 1]."""
    p = _normalize_hist(p)
    q = _normalize_hist(q)
    js = _entropy_bits(0.5 * (p + q)) - 0.5 * (_entropy_bits(p) + _entropy_bits(q))
    return np.clip(js, 0.0, 1.0)


def lack_mass(h_t: np.ndarray, h_s: np.ndarray) -> np.ndarray:
    """Σ_c h_t[c]·(1 − h_s[c]): teacher data mass the student does not hold."""
    h_t = np.asarray(h_t, dtype=float)
    h_s = np.asarray(h_s, dtype=float)
    return (h_t * (1.0 - h_s)).sum(axis=-1)


def batch_context(
    profiles: np.ndarray,
    t_idx: np.ndarray,
    s_idx: np.ndarray,
    k_idx: np.ndarray,
    n_arms: int = DEFAULT_N_ARMS,
) -> np.ndarray:
    """φ for many (teacher, student, arm) index triples at once → (M, d) float64."""
    P = np.asarray(profiles, dtype=float)
    t_idx = np.asarray(t_idx, dtype=np.int64)
    s_idx = np.asarray(s_idx, dtype=np.int64)
    k_idx = np.asarray(k_idx, dtype=np.int64)
    if P.ndim != 2 or P.shape[1] != PROFILE_DIM:
        raise ValueError(f"profiles must be (N, {PROFILE_DIM})")
    if np.any((k_idx < 0) | (k_idx >= n_arms)):
        raise ValueError("arm index out of range")
    pt = P[t_idx]
    ps = P[s_idx]
    M = pt.shape[0]
    X = np.zeros((M, context_dim(n_arms)))
    X[:, OFF_BIAS] = 1.0
    X[:, OFF_T : OFF_T + PROFILE_DIM] = pt
    X[:, OFF_S : OFF_S + PROFILE_DIM] = ps
    X[:, OFF_ABS : OFF_ABS + N_ABS] = np.abs(pt[:, ABS_DIMS] - ps[:, ABS_DIMS])
    ht = pt[:, HIST]
    hs = ps[:, HIST]
    # JS = H(m) − (H(h_t) + H(h_s))/2: per-agent entropies once, only H(m) per pair.
    hn = _normalize_hist(P[:, HIST])
    ent = _entropy_bits(hn)
    m = 0.5 * (hn[t_idx] + hn[s_idx])
    X[:, OFF_JS] = np.clip(_entropy_bits(m) - 0.5 * (ent[t_idx] + ent[s_idx]), 0.0, 1.0)
    lack = lack_mass(ht, hs)
    X[:, OFF_LACK] = lack
    X[:, OFF_GAP] = pt[:, PASS1] - ps[:, PASS1]
    X[:, OFF_SAME] = (pt[:, FAMILY] * ps[:, FAMILY]).sum(axis=1)
    X[:, OFF_LIN] = same_lineage(pt[:, FAMILY], ps[:, FAMILY])
    Z = arm_block(lack, X[:, OFF_SAME], X[:, OFF_GAP], pt[:, PASS1], ps[:, PASS1], X[:, OFF_LIN])
    cols = OFF_ARM + ARM_FEATS * k_idx[:, None] + np.arange(ARM_FEATS)
    X[np.arange(M)[:, None], cols] = Z
    return X


def same_lineage(fam_t: np.ndarray, fam_s: np.ndarray) -> np.ndarray:
    """Σ lineage(f_t)·lineage(f_s) for family one-hot rows: 1 when both families belong to
    the same lineage (``FAMILY_LINEAGE``), bilinear in the one-hots."""
    return np.einsum("ij,ij->i", np.asarray(fam_t, dtype=float) @ LINEAGE_ONEHOT,
                     np.asarray(fam_s, dtype=float) @ LINEAGE_ONEHOT)


def arm_block(lack: np.ndarray, same: np.ndarray, gap: np.ndarray, pi_t: np.ndarray, pi_s: np.ndarray,
              lin: np.ndarray) -> np.ndarray:
    """The 10 values placed in the chosen arm's block → (M, ARM_FEATS)."""
    return np.stack([np.ones_like(lack), lack, same, gap, lack * same, gap * same, lack * pi_t, lack * pi_s,
                     lin, gap * lin], axis=1)


def pair_context(p_t: np.ndarray, p_s: np.ndarray, arm: int, n_arms: int = DEFAULT_N_ARMS) -> np.ndarray:
    """φ for one pair → (d,). Same numbers as ``batch_context`` (one code path)."""
    P = np.stack([np.asarray(p_t, dtype=float), np.asarray(p_s, dtype=float)])
    return batch_context(P, np.array([0]), np.array([1]), np.array([arm]), n_arms)[0]


def batch_concat_context(profiles: np.ndarray, t_idx: np.ndarray, s_idx: np.ndarray) -> np.ndarray:
    """The paper's context [p_t, p_s, 1] per pair — kept to show why it is not enough
    (tests/unit/test_features.py): it cannot rank one teacher's students."""
    P = np.asarray(profiles, dtype=float)
    M = len(t_idx)
    return np.hstack([P[np.asarray(t_idx)], P[np.asarray(s_idx)], np.ones((M, 1))])
