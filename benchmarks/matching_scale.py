"""Matching at 10k and 100k agents in one run: scaling ratio, prefilter recall, memory.

    python -m benchmarks.matching_scale [--agents 10000,100000] [--recall-sample 500] [--json]

Every agent is in the round (K_p = N/2) and the bandit is ``cpm_scale.trained_bandit``
(3 000 updates on a compatibility-driven reward). For each N, ``fast_match`` runs once
(``--repeat``: more, medians reported) and is timed by wall clock and by CPU
(``time.process_time``: on the shared 2-core machine wall time mostly measures the other
jobs); the headline is t(largest)/t(smallest) in CPU seconds, target ≤ 10× for 10× the
agents (near-linear). Memory: tracemalloc's peak over one more run (numpy's buffers are
traced; the interpreter's baseline is not) — reported as ``peak_traced_mb``.

Recall of the prefilter, at the smallest N (and, with ``--recall-ann``, of the clustered
stage 1 that larger N use, forced at the same N): for a seeded sample of students s,
all N−1 teachers × K arms are scored exactly (``_PairScorer``, the matcher's own exact
UCB, in blocks), and s's exact top-k (teacher, arm) candidates are taken, k = 1, 4 and 8
(fast_match's ``topk`` is 8). Recall@k = the fraction of those candidates whose pair (t, s) is in
the first pass's shortlist (the pairs that reach exact scoring, where every arm of a
pair is scored), averaged over the sample. The same for teachers (their top-k
(student, arm)). Only the first pass counts: refill passes re-run the prefilter on the
agents left, which can only add pairs. Exact scoring of every pair at 10k (10⁸ pairs ×
3 arms) is what the sample avoids; ``--recall-sample 0`` scores all agents.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import tracemalloc
from typing import Any

import numpy as np
import structlog

from benchmarks.cpm_scale import N_ARMS, population, trained_bandit
from cpm.bandit import LinUCB
from cpm.matching import _PairScorer, fast_match, prefilter_factors
from cpm.prefilter import shortlist

TARGET_SCALE = 10.0  # t(100k) / t(10k), issue 20 item 3
TARGET_RECALL = 0.95
TARGET_10K_CPU_S = 2.0
TOPK = 8
RECALL_K = (1, 4, 8)


def _timed(P: np.ndarray, bandit: LinUCB, **kw: Any) -> tuple[float, float, Any]:
    w0, c0 = time.perf_counter(), time.process_time()
    res = fast_match(P, bandit, N_ARMS, P.shape[0] // 2, **kw)
    return time.perf_counter() - w0, time.process_time() - c0, res


def first_pass_shortlist(P: np.ndarray, bandit: LinUCB, ann: tuple[int, int] | None,
                         topk: int = TOPK) -> tuple[np.ndarray, np.ndarray]:
    """The (t, s) pairs fast_match's first pass scores exactly (``ann``: clustered stage 1)."""
    scorer = _PairScorer(P, bandit, N_ARMS, bandit.beta())
    (La, R, Wt, Ws, u, v), wq = prefilter_factors(P, scorer, bandit.theta, N_ARMS)
    return shortlist(La, R, Wt, Ws, wq, u, v, topk, 4, 64, ann)


def recall(P: np.ndarray, bandit: LinUCB, t: np.ndarray, s: np.ndarray, sample: int,
           ks: tuple[int, ...] = RECALL_K, seed: int = 7) -> dict[str, Any]:
    """Mean fraction of each sampled agent's exact top-k (partner, arm) candidates whose
    pair is in the shortlist (t, s), as student and as teacher, for each k in ``ks``
    (module docstring) → {"student": {k: recall}, "teacher": {k: recall}, "sample": n}."""
    n = P.shape[0]
    scorer = _PairScorer(P, bandit, N_ARMS, bandit.beta())
    keys = np.sort(t * n + s)
    agents = np.arange(n) if sample <= 0 or sample >= n else np.sort(
        np.random.default_rng(seed).choice(n, sample, replace=False))
    out: dict[str, Any] = {}
    k = max(ks)
    for role in ("student", "teacher"):
        hits = []
        for a in agents:
            partners = np.delete(np.arange(n), a)
            me = np.full(n - 1, a)
            tt, ss = (partners, me) if role == "student" else (me, partners)
            sc = scorer.scores_chunked(tt, ss)  # (N−1, K) exact UCB
            flat = np.argpartition(sc.ravel(), sc.size - k)[sc.size - k :]
            flat = flat[np.argsort(-sc.ravel()[flat], kind="stable")]  # best first
            rows = flat // N_ARMS
            want = tt[rows] * n + ss[rows]
            pos = np.minimum(np.searchsorted(keys, want), keys.size - 1)
            hits.append(keys[pos] == want)
        H = np.asarray(hits)
        out[role] = {kk: float(H[:, :kk].mean()) for kk in ks}
    out["sample"] = int(agents.size)
    return out


def run(agents: list[int], repeat: int = 1, recall_sample: int = 500, recall_ann: bool = True,
        other_topk: tuple[int, ...] = ()) -> dict[str, Any]:
    """``other_topk``: also time (and, at the smallest N, recall) fast_match with these
    ``topk`` values, alternating with the node's ``TOPK`` in every repeat — the cost and
    the recall of a larger shortlist, side by side (``topk_variants`` in the output)."""
    bandit = trained_bandit()
    fast_match(population(64), bandit, N_ARMS, 32)  # warm-up: imports, BLAS, threadpoolctl
    rows, variants = [], []
    for n in agents:
        P = population(n)
        walls, cpus = [], []
        other: dict[int, list[float]] = {k: [] for k in other_topk}
        load0 = os.getloadavg()[0]
        for _ in range(max(1, repeat)):
            w, c, res = _timed(P, bandit)
            walls.append(w)
            cpus.append(c)
            for k in other_topk:
                _, ck, rk = _timed(P, bandit, topk=k)
                other[k].append(ck)
                if len(other[k]) == 1:
                    variants.append({"agents": n, "topk": k, "total_score": rk.total()})
        for v in variants:
            if v["agents"] == n:
                v["cpu_s"] = float(np.median(other[v["topk"]]))
                v["cpu_over_node_topk"] = v["cpu_s"] / float(np.median(cpus))
        load1 = os.getloadavg()[0]
        tracemalloc.start()
        fast_match(P, bandit, N_ARMS, n // 2)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        rows.append({"agents": n, "wall_s": float(np.median(walls)), "cpu_s": float(np.median(cpus)),
                     "pairs": len(res), "k_pairs": n // 2, "total_score": res.total(),
                     "passes": int(res.stats["passes"]), "shortlisted_pairs": int(res.stats["shortlisted_pairs"]),
                     "coverage_pairs": int(res.stats["coverage_pairs"]), "peak_traced_mb": peak / 2**20,
                     "load_avg_1min": [load0, load1]})
    small, big = rows[0], rows[-1]
    out: dict[str, Any] = {"arms": N_ARMS, "topk": TOPK, "results": rows, "topk_variants": variants,
                           "ratio_cpu_big_over_small": big["cpu_s"] / small["cpu_s"],
                           "ratio_wall_big_over_small": big["wall_s"] / small["wall_s"],
                           "size_ratio": big["agents"] / small["agents"],
                           "cpu_small_over_target": small["cpu_s"] / TARGET_10K_CPU_S,
                           "targets": {"ratio_cpu_big_over_small": f"<= {TARGET_SCALE}",
                                       "recall": f">= {TARGET_RECALL}",
                                       "cpu_small_over_target": f"<= 1 ({TARGET_10K_CPU_S} s CPU at 10k)"}}
    if recall_sample >= 0:
        P = population(small["agents"])
        modes = [("full", None)] + ([("clustered", (2048, 256))] if recall_ann else [])
        out["recall"] = {}
        for name, ann in modes:
            t, s = first_pass_shortlist(P, bandit, ann)
            out["recall"][name] = {"shortlisted_pairs": int(t.size), **recall(P, bandit, t, s, recall_sample)}
        for k in other_topk:
            t, s = first_pass_shortlist(P, bandit, None, k)
            out["recall"][f"full, topk {k}"] = {"shortlisted_pairs": int(t.size),
                                                **recall(P, bandit, t, s, recall_sample)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", default="10000,100000", help="comma-separated sizes; ratio = last / first")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--recall-sample", type=int, default=500, help="agents sampled for recall (0: all, -1: skip)")
    ap.add_argument("--no-recall-ann", action="store_true", help="skip the clustered stage 1's recall")
    ap.add_argument("--topk", default="", help=f"comma-separated topk values timed beside the node's {TOPK}")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr),
                        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    try:
        agents = [int(x) for x in a.agents.split(",") if x.strip()]
    except ValueError:
        ap.error("--agents must be integers")
    if not agents or any(n < 64 for n in agents):
        ap.error("--agents must be ≥ 64")
    try:
        other_topk = tuple(int(x) for x in a.topk.split(",") if x.strip())
    except ValueError:
        ap.error("--topk must be integers")
    if any(k < 1 for k in other_topk):
        ap.error("--topk must be ≥ 1")
    out = run(agents, a.repeat, a.recall_sample, not a.no_recall_ann, other_topk)
    if a.json:
        print(json.dumps(out))
        return 0
    for r in out["results"]:
        print(f"N={r['agents']:>7}: {r['cpu_s']:.2f} s CPU, {r['wall_s']:.2f} s wall, "
              f"pairs {r['pairs']}/{r['k_pairs']}, passes {r['passes']}, peak traced {r['peak_traced_mb']:.0f} MB, "
              f"load {r['load_avg_1min'][0]:.1f}→{r['load_avg_1min'][1]:.1f}")
    big, small = out["results"][-1]["agents"], out["results"][0]["agents"]
    print(f"t({big})/t({small}): CPU ×{out['ratio_cpu_big_over_small']:.2f}, "
          f"wall ×{out['ratio_wall_big_over_small']:.2f} for ×{out['size_ratio']:.0f} agents "
          f"(target ≤ {TARGET_SCALE})")
    for v in out["topk_variants"]:
        print(f"N={v['agents']:>7}, topk {v['topk']}: {v['cpu_s']:.2f} s CPU = ×{v['cpu_over_node_topk']:.3f} "
              f"the topk {TOPK} time in the same repeats; greedy total {v['total_score']:.1f} vs "
              f"{next(r['total_score'] for r in out['results'] if r['agents'] == v['agents']):.1f}")
    for name, r in out.get("recall", {}).items():
        for k in RECALL_K:
            print(f"recall@{k} ({name} stage 1, N={out['results'][0]['agents']}, {r['sample']} agents sampled): "
                  f"as student {r['student'][k]:.4f}, as teacher {r['teacher'][k]:.4f} (target ≥ {TARGET_RECALL})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
