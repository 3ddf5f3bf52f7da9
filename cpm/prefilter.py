"""The prefilter of ``cpm.matching.fast_match`` (its docstring, steps 1–2): for every
agent, the few partners worth scoring exactly, from the bilinear surrogate of the score.

Two stage-1 variants share stage 2 (``_rescore``): ``_row_lists`` scans all N² pairs in
blocks of 64 rows (one float32 matmul per block; exact top-k of the surrogate, up to
``_group_topk``'s near-tie swaps), and ``_row_lists_clustered`` clusters the rows and
scans only a fixed number of columns per cluster, so its work grows near-linearly with N
(with the N² scan, ``fast_match`` took 14.6 s CPU at 30 000 agents against 2.95 s at
10 000 in one run on the 2-core machine: ×4.95 for ×3 agents).
``fast_match`` uses the second above ``ann_above`` agents in a pass.
"""

from __future__ import annotations

import numpy as np


def _group_topk(S: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """Per row of S (B, chunk·ng): the argmax of each of its ``k`` groups with the
    largest maxima → (B, k) column indices, −1 where not finite.

    Columns are split into ng groups {g, g+ng, g+2ng, …} (strided, so the group maxima
    are an elementwise maximum over ``chunk`` contiguous slices — fast SIMD). This
    returns the row's top-k columns except where two of them share a group (then the
    lower one is replaced by the next group's best): with ng ≫ k that is rare and only
    swaps near-ties of an approximate score, and it saves a second partition over k·chunk
    values. With k ≥ ng (small N) it is the exact top-k.
    """
    B, npad = S.shape
    ng = npad // chunk
    if k >= ng:
        kk = min(k, npad)
        cols = np.argpartition(S, npad - kk, axis=1)[:, npad - kk :]
    else:
        gm = S.reshape(B, chunk, ng).max(axis=1)
        top_g = np.argpartition(gm, ng - k, axis=1)[:, ng - k :]  # (B, k)
        cand = top_g[:, :, None] + np.arange(chunk) * ng  # (B, k, chunk) columns
        vals = np.take(S, cand + (np.arange(B) * npad)[:, None, None])  # flat take: cheapest gather
        cols = top_g + vals.argmax(axis=2) * ng
    cols[~np.isfinite(S[np.arange(B)[:, None], cols])] = -1
    return cols


def _rescore(Xr: np.ndarray, Xc: np.ndarray, Wr: np.ndarray, Wc: np.ndarray, wq: tuple[float, float],
             v: np.ndarray, rows: slice | np.ndarray, cand: np.ndarray, out: np.ndarray, minus_v: bool) -> None:
    """Stage 2 for the rows ``rows`` and their stage-1 candidates ``cand`` (B, k1; −1 =
    none): best-arm surrogate plus the width, minus v[j] for the second list; the best
    ``out.shape[1]`` go to ``out[rows]`` (−1 where fewer are finite)."""
    k1 = cand.shape[1]
    ok = cand >= 0
    c = np.where(ok, cand, 0)
    row = Xr[:, rows, None, :]  # (Kr, B, 1, r)
    sc = np.matmul(row, Xc[:, c].transpose(0, 1, 3, 2))[:, :, 0, :].max(axis=0)  # (B, k1): best arm
    q = np.matmul(Wc[c], Wr[rows, :, None])[:, :, 0]
    q += wq[1]
    sc += wq[0] * np.sqrt(np.maximum(q, 0.0))
    if minus_v:
        sc -= v[c]
    sc[~ok] = -np.inf
    kk = min(out.shape[1], k1)
    sel = np.argpartition(sc, k1 - kk, axis=1)[:, k1 - kk :]
    best = np.take_along_axis(cand, sel, axis=1)
    best[~np.isfinite(np.take_along_axis(sc, sel, axis=1))] = -1
    out[rows, :kk] = best


def _row_lists(
    Xr: np.ndarray, Xc: np.ndarray, Wr: np.ndarray, Wc: np.ndarray, wq: tuple[float, float],
    u: np.ndarray, v: np.ndarray, topk: int, widen: int, block: int, chunk: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """Per row i of the surrogate (diagonal excluded): the ``topk`` best columns by
    max_k Xr[k, i]·Xc[k, j] + β·√(Wr[i]·Wc[j] + q̄) (best-arm mean surrogate plus the
    exploration width with its per-agent part exact), and the ``topk`` best by that minus
    the partner's own linear part v[j]. ``wq`` = (β, q̄).

    Xr / Xc carry a leading arm axis of length K or 1 (the factor shared by all arms).
    The full N² pass uses the arm-averaged product only (one matmul per block); its
    top ``widen·topk`` columns per row (two-stage, ``_group_topk``) are re-scored per arm
    and with the width — the arm-averaged mean alone lost 3.5 % (benchmark bandit) to 16 %
    (a bandit whose best arm depends on the family) of the exact greedy total at N = 2000:
    the best arm differs from pair to pair, and the exploration bonus (≈0.1 here) is of
    the order of the score differences between a row's best partners. The second list
    keeps the shortlist from collapsing onto a few "hub" agents that every row prefers.
    """
    n = Xr.shape[1]
    k1 = min(topk * widen, n - 1)
    npad = -(-n // chunk) * chunk
    Lm = Xr.mean(axis=0)
    Rp = np.zeros((npad, Xc.shape[2]), dtype=np.float32)
    Rp[:n] = Xc.mean(axis=0)
    RT = np.ascontiguousarray(Rp.T)
    vp = np.zeros(npad, dtype=np.float32)
    vp[:n] = v
    top_s = np.full((n, topk), -1, dtype=np.int64)
    top_i = np.full((n, topk), -1, dtype=np.int64)
    buf = np.empty((2, block, npad), dtype=np.float32)
    for a in range(0, n, block):
        b = min(n, a + block)
        B = b - a
        S, Ib = buf[0, :B], buf[1, :B]
        np.matmul(Lm[a:b], RT, out=S)
        S[:, n:] = -np.inf
        S[np.arange(B), np.arange(a, b)] = -np.inf
        np.subtract(S, vp, out=Ib)
        Ib -= u[a:b, None]
        rows = slice(a, b)
        for M, out, minus_v in ((S, top_s, False), (Ib, top_i, True)):
            cand = _group_topk(M, k1, chunk)  # (B, k1), −1 where none
            _rescore(Xr, Xc, Wr, Wc, wq, v, rows, cand, out, minus_v)
    return top_s, top_i


def _kmeans(X: np.ndarray, size: int, iters: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means of the rows of X into ⌈n/size⌉ clusters → (labels, centroids).
    Seeded (the matching must be deterministic); an empty cluster keeps its centroid."""
    n = X.shape[0]
    c = max(1, -(-n // size))
    cent = X[np.sort(np.random.default_rng(0).choice(n, c, replace=False))].astype(np.float32)
    labels = np.zeros(n, dtype=np.int64)
    for it in range(iters + 1):
        half = 0.5 * np.einsum("ij,ij->i", cent, cent)
        for a in range(0, n, 8192):
            labels[a : a + 8192] = np.argmax(X[a : a + 8192] @ cent.T - half, axis=1)
        if it == iters:
            break
        counts = np.bincount(labels, minlength=c)
        sums = np.stack([np.bincount(labels, weights=X[:, j], minlength=c) for j in range(X.shape[1])], axis=1)
        nz = counts > 0
        cent[nz] = (sums[nz] / counts[nz, None]).astype(np.float32)
    return labels, cent


def _row_lists_clustered(
    Xr: np.ndarray, Xc: np.ndarray, Wr: np.ndarray, Wc: np.ndarray, wq: tuple[float, float],
    u: np.ndarray, v: np.ndarray, topk: int, widen: int, cols: int, cluster: int, chunk: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """``_row_lists`` without the N² stage 1 (for large N): rows are clustered (k-means on
    the arm-averaged row factor, ~``cluster`` rows each); a cluster's rows are scored
    against ``cols`` columns only — the best by the centroid's score c·R[j] plus the
    Cauchy–Schwarz slack r̄·|R[j]| (r̄ = the rows' mean distance to c), and the best by
    that minus v[j] — instead of all N. Stage 2 is ``_rescore``, as in ``_row_lists``.
    Work: N·N/cluster for the centroids plus N·2·cols for the rows, i.e. near-linear
    while N/cluster ≪ cols; approximate where a row's best columns are far from its
    centroid's (recall: benchmarks/matching_scale.py, docs/performance.md)."""
    n = Xr.shape[1]
    k1 = min(topk * widen, n - 1)
    m = min(n, max(cols, k1 + 1))
    Lm, Rm = Xr.mean(axis=0), Xc.mean(axis=0)
    labels, cent = _kmeans(Lm, cluster)
    dist = np.linalg.norm(Lm - cent[labels], axis=1)
    rnorm = np.linalg.norm(Rm, axis=1)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(cent.shape[0] + 1))
    top_s = np.full((n, topk), -1, dtype=np.int64)
    top_i = np.full((n, topk), -1, dtype=np.int64)
    for c in range(cent.shape[0]):
        members = order[bounds[c] : bounds[c + 1]]
        if members.size == 0:
            continue
        base = Rm @ cent[c] + dist[members].mean() * rnorm
        pick = [np.argpartition(-base, m - 1)[:m], np.argpartition(v - base, m - 1)[:m]] if m < n else [np.arange(n)]
        cs = np.unique(np.concatenate(pick))
        w = -(-cs.size // chunk) * chunk
        RT = np.zeros((Rm.shape[1], w), dtype=np.float32)
        RT[:, : cs.size] = Rm[cs].T
        csp = np.zeros(w, dtype=np.int64)
        csp[: cs.size] = cs
        for a in range(0, members.size, 256):
            rows = members[a : a + 256]
            S = Lm[rows] @ RT
            S[:, cs.size :] = -np.inf
            pos = np.minimum(np.searchsorted(cs, rows), cs.size - 1)
            hit = cs[pos] == rows
            S[np.flatnonzero(hit), pos[hit]] = -np.inf  # the diagonal
            Ib = S - np.concatenate([v[cs], np.zeros(w - cs.size, dtype=np.float32)])
            Ib -= u[rows, None]
            for M, out, minus_v in ((S, top_s, False), (Ib, top_i, True)):
                loc = _group_topk(M, min(k1, w), chunk)
                cand = np.where(loc >= 0, csp[np.maximum(loc, 0)], -1)
                _rescore(Xr, Xc, Wr, Wc, wq, v, rows, cand, out, minus_v)
    return top_s, top_i


def _unique_pairs(t: np.ndarray, s: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop invalid (−1) and duplicate pairs; canonical (t, s) order (ties break by it)."""
    ok = (t >= 0) & (s >= 0)
    keys = np.sort(t[ok] * m + s[ok])
    if keys.size:
        keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]
    return keys // m, keys % m



def shortlist(La: np.ndarray, R: np.ndarray, Wt: np.ndarray, Ws: np.ndarray, wq: tuple[float, float],
              u: np.ndarray, v: np.ndarray, topk: int, widen: int = 4,
              block: int = 64, ann: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Candidate (t, s) pairs: for every agent its ``topk`` best students (by the
    prefilter score, and by it minus the student's own linear part) and its ``topk``
    best teachers (same two rankings). ``La`` (K, N, r), ``R`` (N, r): ``_arm_surrogates``;
    ``Wt``, ``Ws``, ``wq``: ``_PairScorer.width_factors``. ``ann`` = (cols, cluster):
    stage 1 over clustered rows and ``cols`` columns per list (``_row_lists_clustered``)
    instead of all N² pairs."""
    m = R.shape[0]
    if ann is None:
        st_s, st_i = _row_lists(La, R[None], Wt, Ws, wq, u, v, topk, widen, block)  # as teacher: students
        ts_s, ts_i = _row_lists(R[None], La, Ws, Wt, wq, v, u, topk, widen, block)  # as student: teachers
    else:
        st_s, st_i = _row_lists_clustered(La, R[None], Wt, Ws, wq, u, v, topk, widen, *ann)
        ts_s, ts_i = _row_lists_clustered(R[None], La, Ws, Wt, wq, v, u, topk, widen, *ann)
    ii = np.repeat(np.arange(m), topk)
    t_all = np.concatenate([ii, ii, ts_s.reshape(-1), ts_i.reshape(-1)])
    s_all = np.concatenate([st_s.reshape(-1), st_i.reshape(-1), ii, ii])
    return _unique_pairs(t_all, s_all, m)
