"""Greedy disjoint matching of (teacher, student, arm) tuples by LinUCB score.

Why three implementations of one rule (highest UCB first, both agents removed, at most
K_p pairs, ties by (t, s, k)): ``naive_match`` is the equivalence oracle, ``exact_match``
scores every candidate (up to a few thousand agents), and ``fast_match`` reaches 10⁴
agents and beyond (design §4) by scoring exactly only shortlisted pairs; all three share
the exact scoring path. The algorithm, what is exact and what approximate, refill and
coverage passes, the one-BLAS-thread default and the measurements: docs/matchmaking.md
§Matching and §Scale.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from cpm import features as F
from cpm.bandit import LinUCB
from cpm.prefilter import _unique_pairs, shortlist
from protocol.profile import N_CATEGORIES

try:  # optional: without it BLAS keeps its own thread count
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover - depends on the environment
    ThreadpoolController = None

log = structlog.get_logger(__name__)

_THREADPOOLS: Any = None
COLLAPSED_PASS = 0.5  # a prefiltered pass forming fewer of the needed pairs → coverage passes


def _blas_limit(n_threads: int | None) -> contextlib.AbstractContextManager[Any]:
    """Context limiting BLAS threads (no-op when ``n_threads`` is None or threadpoolctl
    is missing). The controller is built once: scanning loaded libraries costs ms."""
    global _THREADPOOLS
    if n_threads is None or ThreadpoolController is None:
        return contextlib.nullcontext()
    if _THREADPOOLS is None:
        _THREADPOOLS = ThreadpoolController()
    return _THREADPOOLS.limit(limits=int(n_threads), user_api="blas")


@dataclass(slots=True)
class MatchResult:
    """Indices into the eligible profile matrix; ``score`` is the UCB at match time."""

    teacher: np.ndarray
    student: np.ndarray
    arm: np.ndarray
    score: np.ndarray
    stats: dict[str, int | float] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.teacher.shape[0])

    def total(self) -> float:
        return float(self.score.sum())

    def triples(self) -> list[tuple[int, int, int]]:
        return list(zip(self.teacher.tolist(), self.student.tolist(), self.arm.tolist()))


def _empty(stats: dict[str, int | float] | None = None) -> MatchResult:
    z = np.zeros(0, dtype=np.int64)
    return MatchResult(z, z.copy(), z.copy(), np.zeros(0), stats or {})


def _beta(bandit: LinUCB, beta: float | None) -> float:
    return bandit.beta() if beta is None else float(beta)


class _PairScorer:
    """Exact UCB of (t, s, k) without materialising φ.

    φ = x_t + y_s + r_k(t, s): x_t = [1, p_t] (dims 0..32) depends on the teacher only,
    y_s = p_s (33..64) on the student only, and r_k holds the 17 pair dims (65..81) and
    arm k's 10-dim block. Hence, with A = A⁻¹ and idx_k the 27 dims of r_k::

        θᵀφ    = θ_T·x_t + θ_S·p_s + θ[idx_k]·r
        φᵀAφ   = x_tᵀA_TT x_t + p_sᵀA_SS p_s + 2 (A_ST x_t)·p_s
                 + 2 (A_RT x_t + A_RS p_s)[idx_k]·r + rᵀ A[idx_k, idx_k] r

    All per-agent terms are computed once per call (O(N·d²)); a pair then costs
    O(27² + 32) instead of building a 112-dim φ and an O(d²) quadratic form.
    """

    def __init__(self, P: np.ndarray, bandit: LinUCB, n_arms: int, beta: float) -> None:
        d = F.context_dim(n_arms)
        if bandit.d != d:
            raise ValueError(f"bandit has d={bandit.d}, context for {n_arms} arms has d={d}")
        th, A = bandit.theta, bandit.Ainv
        n = P.shape[0]
        T = np.arange(0, F.OFF_S)
        S = np.arange(F.OFF_S, F.OFF_ABS)
        Rd = np.arange(F.OFF_ABS, d)  # pair dims, then every arm block
        X = np.hstack([np.ones((n, 1)), P])
        self.n_arms = n_arms
        self.beta = float(beta)
        self.m_t = X @ th[T]
        self.m_s = P @ th[S]
        self.q_t = np.einsum("ij,ij->i", X @ A[np.ix_(T, T)], X)
        self.q_s = np.einsum("ij,ij->i", P @ A[np.ix_(S, S)], P)
        self.c_t = X @ A[np.ix_(T, S)]  # cross term 2·c_t·p_s
        self.e_t = X @ A[np.ix_(T, Rd)]
        self.e_s = P @ A[np.ix_(S, Rd)]
        nw = F.OFF_ARM - F.OFF_ABS  # 17
        self.nw = nw
        W = np.arange(F.OFF_ABS, F.OFF_ARM)
        Z = np.arange(F.OFF_ARM, d)
        self.th_w = th[W]
        self.th_z = th[Z].reshape(n_arms, F.ARM_FEATS)
        self.A_ww = A[np.ix_(W, W)]
        self.A_wz = A[np.ix_(W, Z)]
        self.A_zz = [A[np.ix_(Z[F.ARM_FEATS * k : F.ARM_FEATS * (k + 1)], Z[F.ARM_FEATS * k : F.ARM_FEATS * (k + 1)])]
                     for k in range(n_arms)]
        self.P = P
        self.h = P[:, F.HIST]
        self.hn = F._normalize_hist(self.h)
        self.ent = F._entropy_bits(self.hn)
        self.pi = P[:, F.PASS1]
        self.fam = P[:, F.FAMILY]
        self.lin = self.fam @ F.LINEAGE_ONEHOT

    def width_factors(self, sample: int = 4096) -> tuple[np.ndarray, np.ndarray, float]:
        """Per-agent part of φᵀA⁻¹φ as a bilinear form Wt[t]·Ws[s] = q_t + q_s + 2 c_t·p_s
        (float32), and q̄, the median of the pair-dependent rest over a fixed sample of
        pairs, for the prefilter's width estimate β·√(Wt·Ws + q̄)."""
        n = self.P.shape[0]
        Wt = np.hstack([self.q_t[:, None], np.ones((n, 1)), 2.0 * self.c_t]).astype(np.float32)
        Ws = np.hstack([np.ones((n, 1)), self.q_s[:, None], self.P]).astype(np.float32)
        rng = np.random.default_rng(0)  # fixed: the matching must be deterministic
        t = rng.integers(0, n, sample)
        s = (t + rng.integers(1, n, sample)) % n
        full = self.scores(t, s, quad_only=True)
        q_bil = self.q_t[t] + self.q_s[s] + 2.0 * np.einsum("ij,ij->i", self.c_t[t], self.P[s])
        return Wt, Ws, float(np.median(full.max(axis=1) - q_bil))

    def pair_dims(self, t: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The 17 pair dims (|h_t − h_s|, JS, lack, gap, same, lineage) and the 10 arm-block
        values, computed as in ``features.batch_context``."""
        ht, hs = self.h[t], self.h[s]
        M = t.shape[0]
        w = np.empty((M, self.nw))
        np.abs(ht - hs, out=w[:, : F.N_ABS])
        m = 0.5 * (self.hn[t] + self.hn[s])
        hm = -(m * np.log2(np.where(m > 0, m, 1.0))).sum(axis=1)
        w[:, F.N_ABS] = np.clip(hm - 0.5 * (self.ent[t] + self.ent[s]), 0.0, 1.0)
        lack = (ht * (1.0 - hs)).sum(axis=1)
        pit, pis = self.pi[t], self.pi[s]
        same = np.einsum("ij,ij->i", self.fam[t], self.fam[s])
        w[:, F.N_ABS + 1] = lack
        w[:, F.N_ABS + 2] = pit - pis
        w[:, F.N_ABS + 3] = same
        lin = np.einsum("ij,ij->i", self.lin[t], self.lin[s])
        w[:, F.N_ABS + 4] = lin
        return w, F.arm_block(lack, same, pit - pis, pit, pis, lin)

    def scores(self, t: np.ndarray, s: np.ndarray, quad_only: bool = False) -> np.ndarray:
        """Exact UCB for every arm → (M, K) float64 (φᵀA⁻¹φ instead if ``quad_only``)."""
        w, z = self.pair_dims(t, s)
        e = self.e_t[t] + self.e_s[s]
        nw, fz = self.nw, F.ARM_FEATS
        base_m = self.m_t[t] + self.m_s[s] + w @ self.th_w
        base_q = (self.q_t[t] + self.q_s[s] + 2.0 * np.einsum("ij,ij->i", self.c_t[t], self.P[s])
                  + np.einsum("ij,ij->i", w @ self.A_ww, w) + 2.0 * np.einsum("ij,ij->i", e[:, :nw], w))
        wz = w @ self.A_wz  # (M, 8K)
        out = np.empty((t.shape[0], self.n_arms))
        for k in range(self.n_arms):
            blk = slice(fz * k, fz * (k + 1))
            ez = e[:, nw + fz * k : nw + fz * (k + 1)] + wz[:, blk]
            q = base_q + np.einsum("ij,ij->i", 2.0 * ez + z @ self.A_zz[k], z)
            out[:, k] = q if quad_only else base_m + z @ self.th_z[k] + self.beta * np.sqrt(np.maximum(q, 0.0))
        return out

    def scores_chunked(self, t: np.ndarray, s: np.ndarray, chunk: int = 65536) -> np.ndarray:
        out = np.empty((t.shape[0], self.n_arms))
        for a in range(0, t.shape[0], chunk):
            out[a : a + chunk] = self.scores(t[a : a + chunk], s[a : a + chunk])
        return out


def exact_pair_scores(
    profiles: np.ndarray,
    t_idx: np.ndarray,
    s_idx: np.ndarray,
    bandit: LinUCB,
    n_arms: int,
    beta: float,
    chunk: int = 65536,
) -> np.ndarray:
    """Exact UCB for every arm of every (t, s) pair → (M, K) float64.

    Equal (to round-off) to ``bandit.ucb(batch_context(...))``; see ``_PairScorer`` for
    why it is computed per agent first.
    """
    P = np.asarray(profiles, dtype=float)
    sc = _PairScorer(P, bandit, n_arms, beta)
    return sc.scores_chunked(np.asarray(t_idx, dtype=np.int64), np.asarray(s_idx, dtype=np.int64), chunk)


def greedy_disjoint(
    t: np.ndarray, s: np.ndarray, k: np.ndarray, score: np.ndarray, n_agents: int, k_pairs: int
) -> MatchResult:
    """Greedy on candidates given in canonical (t, s, k) order: sort once, walk once."""
    if k_pairs <= 0 or t.size == 0:
        return _empty()
    order = np.argsort(-score, kind="stable")
    used = np.zeros(n_agents, dtype=bool)
    out: list[int] = []
    max_pairs = min(k_pairs, n_agents // 2)
    tl, sl = t[order].tolist(), s[order].tolist()
    for pos, (ti, si) in enumerate(zip(tl, sl)):
        if used[ti] or used[si]:
            continue
        used[ti] = used[si] = True
        out.append(pos)
        if len(out) >= max_pairs:
            break
    sel = order[np.asarray(out, dtype=np.int64)]
    return MatchResult(t[sel].astype(np.int64), s[sel].astype(np.int64), k[sel].astype(np.int64), score[sel])


def _best_arm(t: np.ndarray, s: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, ...]:
    """Reduce (M, K) to the best arm per pair: greedy would take it first anyway."""
    k = np.argmax(scores, axis=1)
    return t, s, k, scores[np.arange(len(k)), k]


def _all_pairs(m: int) -> tuple[np.ndarray, np.ndarray]:
    """Every ordered (t, s), t ≠ s, in canonical (t, s) order."""
    t = np.repeat(np.arange(m), m - 1)
    s = np.tile(np.arange(m - 1), m)
    s += s >= t  # skip the diagonal
    return t, s


def _exact_greedy(scorer: _PairScorer, agents: np.ndarray, k_pairs: int) -> MatchResult:
    """Greedy over all ordered pairs of ``agents`` (indices into the scorer), scored
    exactly; returned indices are local to ``agents``."""
    m = agents.size
    t, s = _all_pairs(m)
    sc = scorer.scores_chunked(agents[t], agents[s])
    res = greedy_disjoint(*_best_arm(t, s, sc), n_agents=m, k_pairs=k_pairs)
    res.stats = {"candidates": int(t.size * scorer.n_arms), "passes": 1}
    return res


def exact_match(
    profiles: np.ndarray, bandit: LinUCB, n_arms: int, k_pairs: int, *, beta: float | None = None
) -> MatchResult:
    """Greedy over *all* N(N−1)K candidates, each scored exactly (vectorized)."""
    P = np.asarray(profiles, dtype=float)
    n = P.shape[0]
    if n < 2 or k_pairs <= 0:
        return _empty()
    return _exact_greedy(_PairScorer(P, bandit, n_arms, _beta(bandit, beta)), np.arange(n), k_pairs)


def _arm_surrogates(P: np.ndarray, theta: np.ndarray, n_arms: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear surrogate of the mean term per arm, mean_k(t, s) ≈ L[k, t]·R[s] (float32).

    R is shared by all arms, so the arm-averaged surrogate is mean_k(L[k])·R and the
    best-arm surrogate max_k L[k, t]·R[s] is cheap to evaluate on a few candidates.
    Exact here: bias, p_t, p_s, lack, gap, same, lineage (= f_t·G f_s with G the
    same-lineage matrix of the family slots), gap·same, gap·lineage, lack·π_t, lack·π_s.
    Approximate: |x − y| ≈ x + y − 2xy, JS ≈ 1 − h_t·h_s, lack·same ≈ L̄·same with
    L̄ = 1 − h̄·h̄ (mean histogram h̄). Returns L (K, N, 43) and R (N, 43).
    """
    thT = theta[F.OFF_T : F.OFF_T + F.PROFILE_DIM]
    thS = theta[F.OFF_S : F.OFF_S + F.PROFILE_DIM]
    thD = theta[F.OFF_ABS : F.OFF_ABS + F.N_ABS]
    h = P[:, F.HIST]
    pi = P[:, F.PASS1]
    fam = P[:, F.FAMILY]
    famg = fam @ (F.LINEAGE_ONEHOT @ F.LINEAGE_ONEHOT.T)  # f_t·G: same-lineage as a form in f_s
    n = P.shape[0]
    hbar = h.mean(axis=0) if n else np.zeros(N_CATEGORIES)
    lbar = 1.0 - float(hbar @ hbar)
    v0 = P @ thS + h @ thD - theta[F.OFF_GAP] * pi
    R = np.hstack([np.ones((n, 1)), pi[:, None], v0[:, None], h, fam, h * pi[:, None], fam * pi[:, None]])
    Ls = []
    for k in range(n_arms):
        c1, cL, cS, cG, cLS, cGS, cLPt, cLPs, cN, cGN = theta[F.OFF_ARM + F.ARM_FEATS * k :
                                                               F.OFF_ARM + F.ARM_FEATS * (k + 1)]
        lack_coef = theta[F.OFF_JS] + theta[F.OFF_LACK] + cL  # all multiply 1 − h_t·h_s
        gap_coef = theta[F.OFF_GAP] + cG
        u = P @ thT + h @ thD + gap_coef * pi + cLPt * pi
        const = theta[F.OFF_BIAS] + c1 + lack_coef
        same_coef = theta[F.OFF_SAME] + cS + cLS * lbar
        lin_coef = theta[F.OFF_LIN] + cN
        Ls.append(np.hstack([
            (const + u)[:, None], np.full((n, 1), cLPs - cG), np.ones((n, 1)),
            h * (-2.0 * thD - lack_coef - cLPt * pi[:, None]),
            fam * (same_coef + cGS * pi[:, None]) + famg * (lin_coef + cGN * pi[:, None]),
            h * (-cLPs),
            fam * (-cGS) + famg * (-cGN),
        ]))
    return np.stack(Ls).astype(np.float32), R.astype(np.float32)


def _surrogate_factors(
    P: np.ndarray, theta: np.ndarray, n_arms: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Arm-averaged surrogate L·R (see ``_arm_surrogates``) and its teacher-only (u) and
    student-only (v) linear parts: L[t]·R[s] = c + u[t] + v[s] + interaction(t, s)."""
    La, R = _arm_surrogates(P, theta, n_arms)
    L = La.mean(axis=0)
    u = L[:, 0] - L[:, 0].mean() if L.shape[0] else L[:, 0]
    v = L[:, 1].mean() * R[:, 1] + R[:, 2] if L.shape[0] else R[:, 2]
    return L, R, u.astype(np.float32), v.astype(np.float32)


def coverage_pairs(m: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every agent with its ``k`` cyclic successors, both ways round: (i, i+d) and
    (i+d, i) for d = 1..k (mod m), each pair once — 2·k·m candidates, no prefilter.

    Why: the prefilter ranks partners by a score that every row largely shares. When
    that score carries no information (θ = 0, a new CPM) its ties break identically in
    every row, and when it carries little (a bandit after a few noisy updates) every row
    still prefers the same partners: the shortlists collapse onto a few "hub" agents
    and a pass forms about as many pairs as there are hubs — a new CPM with 2 000 agents
    matched 99 pairs in round 1, one with 10 000 after one update 3 702 of 5 000 in
    4.5 s. A coverage pass gives every agent partners of its own (their order is the
    profiles' order, unrelated to their content), scores them exactly and lets the
    greedy pair nearly everyone; ``fast_match`` switches to it when a pass formed less
    than ``COLLAPSED_PASS`` of what was still needed, and uses it for the last pass."""
    if m < 2:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    k = min(k, m // 2)
    i = np.repeat(np.arange(m), k)
    j = (i + np.tile(np.arange(1, k + 1), m)) % m
    return _unique_pairs(np.concatenate([i, j]), np.concatenate([j, i]), m)


def prefilter_factors(P: np.ndarray, scorer: _PairScorer, theta: np.ndarray,
                      n_arms: int) -> tuple[tuple[np.ndarray, ...], tuple[float, float]]:
    """The per-agent factors ``shortlist`` ranks by — (La, R, Wt, Ws, u, v) — and
    (β, q̄); built once per match, reused by its refill passes (and by the recall
    measurement of benchmarks/matching_scale.py)."""
    La, R = _arm_surrogates(P, theta, n_arms)
    Lm = La.mean(axis=0)
    Wt, Ws, q0 = scorer.width_factors()
    return (La, R, Wt, Ws, Lm[:, 0], Lm[:, 1].mean() * R[:, 1] + R[:, 2]), (scorer.beta, q0)


def fast_match(
    profiles: np.ndarray,
    bandit: LinUCB,
    n_arms: int,
    k_pairs: int,
    *,
    topk: int = 8,
    widen: int = 4,
    block: int = 64,
    beta: float | None = None,
    exact_below: int = 48,
    max_passes: int = 6,
    exact_last: int = 1024,
    blas_threads: int | None = 1,
    ann_above: int = 12000,
    ann_cols: int = 2048,
    ann_cluster: int = 256,
) -> MatchResult:
    """Prefiltered greedy matching (see module docstring); indices into ``profiles``.

    ``topk``: partners kept per agent and list (4 lists); ``widen``: stage 1 keeps
    ``widen·topk`` per row for the per-arm + width re-ranking (docstring step 1);
    ``exact_below``: a pass over at most this many agents scores all their pairs;
    ``exact_last``: so does the last allowed pass when at most this many are left (so
    K_p is filled). ``blas_threads``: BLAS thread cap for the call (None: leave as is).
    ``ann_above``: a prefiltered pass over more agents than this replaces the N² stage 1
    by the clustered one (``cpm.prefilter._row_lists_clustered``: ``ann_cols`` columns
    per list for clusters of ~``ann_cluster`` rows), so the work grows near-linearly.
    """
    P = np.asarray(profiles, dtype=float)
    n = P.shape[0]
    if n < 2 or k_pairs <= 0:
        return _empty()
    with _blas_limit(blas_threads):
        return _fast_match(P, bandit, n_arms, k_pairs, topk, widen, block, _beta(bandit, beta), exact_below,
                           max_passes, exact_last, (ann_above, ann_cols, ann_cluster))


def _fast_match(P: np.ndarray, bandit: LinUCB, n_arms: int, k_pairs: int, topk: int, widen: int, block: int,
                beta: float, exact_below: int, max_passes: int, exact_last: int,
                ann: tuple[int, int, int] = (12000, 2048, 256)) -> MatchResult:
    n = P.shape[0]
    target = min(k_pairs, n // 2)
    scorer = _PairScorer(P, bandit, n_arms, beta)
    factors: tuple[np.ndarray, ...] | None = None  # surrogate, built on first use, reused by refills
    wq = (beta, 0.0)
    agents = np.arange(n)
    parts: list[MatchResult] = []
    stats: dict[str, int | float] = {"candidates": 0, "passes": 0, "shortlisted_pairs": 0, "coverage_pairs": 0}
    used = np.zeros(n, dtype=bool)
    done = 0
    coverage = not np.any(bandit.theta)  # θ = 0: the prefilter ranks nothing (``coverage_pairs``)
    for pass_i in range(max_passes):
        m = agents.size
        need = target - done
        if need <= 0 or m < 2:
            break
        stats["passes"] += 1
        last = pass_i == max_passes - 1
        if m <= exact_below or (last and m <= exact_last):
            res = _exact_greedy(scorer, agents, need)
            stats["candidates"] += int(res.stats["candidates"])
        elif coverage or last:
            t, s = coverage_pairs(m, 2 * topk)
            stats["coverage_pairs"] += int(t.size)
            stats["candidates"] += int(t.size * n_arms)
            res = greedy_disjoint(*_best_arm(t, s, scorer.scores_chunked(agents[t], agents[s])), n_agents=m,
                                  k_pairs=need)
        else:
            if factors is None:
                factors, wq = prefilter_factors(P, scorer, bandit.theta, n_arms)
            La, R, Wt, Ws, u, v = factors
            t, s = shortlist(La[:, agents], R[agents], Wt[agents], Ws[agents], wq, u[agents], v[agents], topk,
                             widen, block, ann[1:] if m > ann[0] else None)
            stats["shortlisted_pairs"] += int(t.size)
            stats["candidates"] += int(t.size * n_arms)
            sc = scorer.scores_chunked(agents[t], agents[s])
            res = greedy_disjoint(*_best_arm(t, s, sc), n_agents=m, k_pairs=need)
        if len(res) == 0:
            break
        coverage = coverage or len(res) < need * COLLAPSED_PASS  # the shortlist collapsed onto hubs
        res.teacher, res.student = agents[res.teacher], agents[res.student]
        parts.append(res)
        done += len(res)
        used[res.teacher] = True
        used[res.student] = True
        agents = np.flatnonzero(~used)
    if not parts:
        return _empty(stats)
    out = MatchResult(
        np.concatenate([p.teacher for p in parts]),
        np.concatenate([p.student for p in parts]),
        np.concatenate([p.arm for p in parts]),
        np.concatenate([p.score for p in parts]),
        stats,
    )
    log.debug("cpm.match.done", agents=n, pairs=len(out), **stats)
    return out
