"""CPM matching at scale: fast (prefiltered, vectorized) vs naive O(N²) Python loop.

    python benchmarks/cpm_scale.py --agents 10000
    python benchmarks/cpm_scale.py --agents 100,1000,10000 --json

The population is random (Dirichlet(0.3) histograms, random families and performance)
and the bandit is "trained-ish": a few thousand updates on a compatibility-driven reward,
so θ has realistic structure (``--bandit fresh`` / ``once``: θ = 0, or one update — a
new CPM's first rounds, where shortlists collapse without coverage passes). The naive loop is timed in full when N ≤ ``--naive-full``;
above that it is timed on a subsample of teachers and extrapolated linearly in the
number of teachers (its cost is exactly proportional to it), and the output says so.
For N ≤ ``--exact-max`` the vectorized exact greedy also runs and the ratio of total
scores is printed (fast can exceed 1: greedy is not optimal). fast_match runs
``--repeat`` times; the median wall time and the median CPU time (process_time, and
getrusage user+sys in the JSON) are reported with the 1-minute load average before and
after, because on a shared machine wall time mostly measures the other jobs. Peak
memory is tracemalloc's peak for one extra run (numpy allocations are traced).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import structlog

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpm import features as F  # noqa: E402
from cpm.bandit import LinUCB  # noqa: E402
from cpm.matching import exact_match, fast_match  # noqa: E402
from cpm.matching_naive import naive_match  # noqa: E402
from protocol import profile  # noqa: E402

N_ARMS = 3


def population(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    P = np.zeros((n, F.PROFILE_DIM))
    P[np.arange(n), rng.integers(0, profile.N_FAMILY, n)] = 1.0
    P[:, profile.PERF_AND_DELTA] = rng.random((n, profile.N_PERF))
    P[:, profile.HIST] = rng.dirichlet(np.full(profile.N_CAT, 0.3), n)
    return P


def trained_bandit(seed: int = 0, updates: int = 3000) -> LinUCB:
    """A bandit fit on a compatibility-driven reward (lack × pass@1 gap, family, arm)."""
    rng = np.random.default_rng(seed + 1)
    P = population(400, seed + 2)
    b = LinUCB(F.context_dim(N_ARMS))
    t = rng.integers(0, 400, updates)
    s = (t + rng.integers(1, 400, updates)) % 400
    k = rng.integers(0, N_ARMS, updates)
    X = F.batch_context(P, t, s, k, N_ARMS)
    r = (X[:, F.OFF_LACK] * (0.5 + X[:, F.OFF_GAP]) + 0.3 * X[:, F.OFF_SAME] + 0.1 * k
         + 0.1 * rng.standard_normal(updates))
    for x, ri in zip(X, r):
        b.update(x, float(ri))
    return b


def _clock() -> tuple[float, float, float]:
    """(wall, process CPU, rusage user+sys) — on a shared machine wall time is inflated
    by other jobs, so both CPU measures are reported next to it."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), time.process_time(), ru.ru_utime + ru.ru_stime


def bench_one(n: int, bandit: LinUCB, naive_full: int = 300, naive_teachers: int = 20, seed: int = 0,
              repeat: int = 3, exact_max: int = 2000) -> dict[str, Any]:
    P = population(n, seed)
    k_pairs = n // 2
    fast_match(P[: min(n, 64)], bandit, N_ARMS, 32)  # warm-up (imports, BLAS threads)
    walls, cpus, rus = [], [], []
    load0 = os.getloadavg()[0]
    for _ in range(max(1, repeat)):
        w0, c0, r0 = _clock()
        res = fast_match(P, bandit, N_ARMS, k_pairs)
        w1, c1, r1 = _clock()
        walls.append(w1 - w0)
        cpus.append(c1 - c0)
        rus.append(r1 - r0)
    load1 = os.getloadavg()[0]
    tracemalloc.start()
    fast_match(P, bandit, N_ARMS, k_pairs)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    quality_exact = float("nan")
    if n <= exact_max:
        ex = exact_match(P, bandit, N_ARMS, k_pairs)
        quality_exact = res.total() / ex.total() if ex.total() else float("nan")
    if n <= naive_full:
        w0 = time.perf_counter()
        naive = naive_match(P, bandit, N_ARMS, k_pairs)
        naive_s = time.perf_counter() - w0
        mode = "full"
        quality = res.total() / naive.total() if naive.total() else float("nan")
    else:
        teachers = np.random.default_rng(seed).choice(n, size=min(naive_teachers, n), replace=False)
        w0 = time.perf_counter()
        naive_match(P, bandit, N_ARMS, k_pairs, teachers=teachers)
        naive_s = (time.perf_counter() - w0) * n / len(teachers)
        mode = f"extrapolated from {len(teachers)} of {n} teachers (linear in teachers)"
        quality = float("nan")
    fast_wall = float(np.median(walls))
    return {
        "agents": n, "pairs": len(res), "k_pairs": k_pairs, "repeat": len(walls),
        "fast_s": fast_wall, "fast_s_min": min(walls), "fast_cpu_s": float(np.median(cpus)),
        "fast_cpu_s_min": min(cpus), "fast_rusage_s": float(np.median(rus)),
        "load_avg_1min": [load0, load1],
        "naive_s": naive_s, "naive_mode": mode,
        "ratio_naive_over_fast": naive_s / fast_wall if fast_wall > 0 else float("inf"),
        "fast_total_over_naive_total": quality, "fast_total_over_exact_total": quality_exact,
        "fast_total": res.total(),
        "peak_tracemalloc_mb": peak / 2**20,
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "shortlisted_pairs": int(res.stats.get("shortlisted_pairs", 0)), "passes": int(res.stats.get("passes", 0)),
    }


def bandit_for(kind: str) -> LinUCB:
    """``trained`` (the default, above), ``fresh`` (θ = 0: a new CPM's round 1) or
    ``once`` (one noisy update: its round 2) — the last two are where prefiltered
    shortlists collapse onto hub agents (docs/matchmaking.md, coverage passes)."""
    if kind == "trained":
        return trained_bandit()
    b = LinUCB(F.context_dim(N_ARMS))
    if kind == "once":
        P = population(2, 5)
        b.update(F.pair_context(P[0], P[1], 0, N_ARMS), 1.0)
    elif kind != "fresh":
        raise ValueError(f"unknown bandit {kind!r} (trained, fresh, once)")
    return b


def run(agents: list[int], naive_full: int = 300, naive_teachers: int = 20, repeat: int = 3,
        exact_max: int = 2000, bandit_kind: str = "trained") -> dict[str, Any]:
    bandit = bandit_for(bandit_kind)
    rows = [bench_one(n, bandit, naive_full, naive_teachers, repeat=repeat, exact_max=exact_max) for n in agents]
    return {"d": bandit.d, "arms": N_ARMS, "bandit": bandit_kind, "cpus": os.cpu_count(), "blas": _blas_info(),
            "results": rows}


def _blas_info() -> str:
    """Which BLAS and how many threads fast_match will use (it caps them at 1)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl missing: BLAS threads not capped"
    libs = [f"{i.get('internal_api')} {i.get('version')} ({i.get('num_threads')} threads, capped to 1 in fast_match)"
            for i in threadpool_info() if i.get("user_api") == "blas"]
    return "; ".join(libs) or "no BLAS found"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", default="10000", help="comma-separated population sizes")
    ap.add_argument("--naive-full", type=int, default=300, help="largest N timed without extrapolation")
    ap.add_argument("--naive-teachers", type=int, default=20, help="teacher subsample for extrapolation")
    ap.add_argument("--repeat", type=int, default=3, help="fast_match runs per N (median reported)")
    ap.add_argument("--exact-max", type=int, default=2000, help="largest N also matched exactly (quality ratio)")
    ap.add_argument("--bandit", choices=("trained", "fresh", "once"), default="trained",
                    help="bandit state: trained (default), fresh (θ = 0) or once (one update)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if not structlog.is_configured():  # keep stdout for results (and pure JSON)
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr),
                            wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    try:
        agents = [int(x) for x in a.agents.split(",") if x.strip()]
    except ValueError:
        ap.error("--agents must be integers")
    if any(n < 2 for n in agents):
        ap.error("--agents must be ≥ 2")
    out = run(agents, a.naive_full, a.naive_teachers, a.repeat, a.exact_max, a.bandit)
    if a.json:
        print(json.dumps(out))
        return 0
    print(f"LinUCB matching ({out['bandit']} bandit), d={out['d']}, K={out['arms']} arms, K_p = N/2, "
          f"{out['cpus']} CPUs, BLAS: {out['blas']}")
    for r in out["results"]:
        q, qe = r["fast_total_over_naive_total"], r["fast_total_over_exact_total"]
        print(f"N={r['agents']:>6}: fast {r['fast_s']:.3f} s wall (min {r['fast_s_min']:.3f}), "
              f"cpu {r['fast_cpu_s']:.3f} s (min {r['fast_cpu_s_min']:.3f}; median of {r['repeat']}), "
              f"load {r['load_avg_1min'][0]:.1f}→{r['load_avg_1min'][1]:.1f}, pairs {r['pairs']}/{r['k_pairs']}, "
              f"naive {r['naive_s']:.1f} s [{r['naive_mode']}], naive/fast ×{r['ratio_naive_over_fast']:.0f}, "
              + (f"fast/naive total {q:.4f}, " if q == q else "")
              + (f"fast/exact total {qe:.4f}, " if qe == qe else "")
              + f"peak traced {r['peak_tracemalloc_mb']:.0f} MB, maxrss {r['maxrss_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
