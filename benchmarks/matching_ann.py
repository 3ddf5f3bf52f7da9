"""Stage 1 of the prefilter by an ANN library vs ours, at one N, same run (issue 20 item 3).

    PYTHONPATH=/tmp/ann python -m benchmarks.matching_ann [--agents 100000] [--json]

faiss-cpu and usearch are *not* project dependencies: install them beside the venv
(``pip install --no-deps --target /tmp/ann faiss-cpu usearch numkong``) to run this;
a library that does not import is reported as not measured.

What is compared: the first pass's shortlist (``cpm.prefilter.shortlist``: 2 directions
× 2 lists of ``topk`` partners, stage 2 re-ranking included) with stage 1 done by

* ``clustered`` — ours (``_row_lists_clustered``, numpy, one BLAS thread);
* ``faiss_ivf`` — faiss ``IndexIVFFlat`` (inner product, ⌈√N⌉ lists, ``--nprobe``);
* ``usearch_hnsw`` — usearch's HNSW index (inner product, f32).

Each list is a maximum-inner-product search: the S list is Lm[t]·R[s] (queries Lm, base
R), the second list subtracts v[s], i.e. [Lm[t], −1]·[R[s], v[s]]. Each library searches
its own index with one thread (``faiss.omp_set_num_threads(1)``, ``threads=1``; ours caps
BLAS at one), the ``widen·topk`` + 1 nearest, drops the agent itself, and hands the rest
to the same stage 2. Reported per variant: CPU and wall seconds (index build included)
and the recall@k of the resulting shortlist on a sample of agents (as in
``benchmarks.matching_scale``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.cpm_scale import N_ARMS, population, trained_bandit
from benchmarks.matching_scale import TOPK, recall
from cpm.matching import _blas_limit, _PairScorer, prefilter_factors
from cpm.prefilter import _rescore, _unique_pairs, shortlist

WIDEN = 4


def _faiss_search(nprobe: int) -> Callable[[np.ndarray, np.ndarray, int], np.ndarray]:
    import faiss  # optional: not a dependency

    faiss.omp_set_num_threads(1)

    def search(Q: np.ndarray, X: np.ndarray, k: int) -> np.ndarray:
        nlist = max(1, int(np.sqrt(X.shape[0])))
        quant = faiss.IndexFlatIP(X.shape[1])
        index = faiss.IndexIVFFlat(quant, X.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(np.ascontiguousarray(X))
        index.add(np.ascontiguousarray(X))
        index.nprobe = nprobe
        return index.search(np.ascontiguousarray(Q), k)[1]

    return search


def _usearch_search() -> Callable[[np.ndarray, np.ndarray, int], np.ndarray]:
    from usearch.index import Index  # optional: not a dependency

    def search(Q: np.ndarray, X: np.ndarray, k: int) -> np.ndarray:
        index = Index(ndim=X.shape[1], metric="ip", dtype="f32")
        index.add(np.arange(X.shape[0]), np.ascontiguousarray(X), threads=1)
        found = index.search(np.ascontiguousarray(Q), k, threads=1)
        keys = np.asarray(found.keys, dtype=np.int64)
        keys[np.arange(k)[None, :] >= np.asarray(found.counts)[:, None]] = -1  # fewer than k found
        return keys

    return search


def _ann_lists(search: Callable[[np.ndarray, np.ndarray, int], np.ndarray], Xr: np.ndarray, Xc: np.ndarray,
               Wr: np.ndarray, Wc: np.ndarray, wq: tuple[float, float], v: np.ndarray) -> tuple[np.ndarray, ...]:
    n = Xr.shape[1]
    k1 = min(TOPK * WIDEN, n - 1)
    Lm, Rm = Xr.mean(axis=0), Xc.mean(axis=0)
    ones = np.ones((n, 1), dtype=np.float32)
    outs = []
    for Q, X, minus_v in ((Lm, Rm, False), (np.hstack([Lm, -ones]), np.hstack([Rm, v[:, None]]), True)):
        found = search(Q.astype(np.float32), X.astype(np.float32), k1 + 1)
        found = np.where(found == np.arange(n)[:, None], -1, found)  # the agent itself
        keep = np.argsort(found < 0, axis=1, kind="stable")  # the others first, in the library's order
        cand = np.take_along_axis(found, keep, axis=1)[:, :k1]
        out = np.full((n, TOPK), -1, dtype=np.int64)
        for a in range(0, n, 4096):
            _rescore(Xr, Xc, Wr, Wc, wq, v, slice(a, min(n, a + 4096)), cand[a : a + 4096], out, minus_v)
        outs.append(out)
    return tuple(outs)


def _ann_shortlist(search: Callable[..., np.ndarray], f: tuple[np.ndarray, ...],
                   wq: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    La, R, Wt, Ws, u, v = f
    m = R.shape[0]
    st_s, st_i = _ann_lists(search, La, R[None], Wt, Ws, wq, v)
    ts_s, ts_i = _ann_lists(search, R[None], La, Ws, Wt, wq, u)
    ii = np.repeat(np.arange(m), TOPK)
    return _unique_pairs(np.concatenate([ii, ii, ts_s.reshape(-1), ts_i.reshape(-1)]),
                         np.concatenate([st_s.reshape(-1), st_i.reshape(-1), ii, ii]), m)


def run(n: int = 100000, sample: int = 100, nprobe: int = 8, cols: int = 2048, cluster: int = 256) -> dict[str, Any]:
    bandit = trained_bandit()
    P = population(n)
    scorer = _PairScorer(P, bandit, N_ARMS, bandit.beta())
    f, wq = prefilter_factors(P, scorer, bandit.theta, N_ARMS)
    variants: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {
        "clustered": lambda: shortlist(*f[:4], wq, f[4], f[5], TOPK, WIDEN, 64, (cols, cluster))}
    out: dict[str, Any] = {"agents": n, "nprobe": nprobe, "variants": {}}
    for name, make in (("faiss_ivf", lambda: _faiss_search(nprobe)), ("usearch_hnsw", _usearch_search)):
        try:
            search = make()
        except ImportError as exc:
            out["variants"][name] = {"error": f"not measured: {exc}"}
            continue
        variants[name] = lambda s=search: _ann_shortlist(s, f, wq)
    for name, fn in variants.items():
        with _blas_limit(1):
            w0, c0 = time.perf_counter(), time.process_time()
            t, s = fn()
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        out["variants"][name] = {"cpu_s": cpu, "wall_s": wall, "pairs": int(t.size),
                                 "recall": recall(P, bandit, t, s, sample)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=100000)
    ap.add_argument("--recall-sample", type=int, default=100)
    ap.add_argument("--nprobe", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    out = run(a.agents, a.recall_sample, a.nprobe)
    if a.json:
        print(json.dumps(out))
        return 0
    for name, r in out["variants"].items():
        if "error" in r:
            print(f"{name:13s} {r['error']}")
            continue
        rc = r["recall"]
        print(f"{name:13s} {r['cpu_s']:.2f} s CPU, {r['wall_s']:.2f} s wall, {r['pairs']} pairs, recall@1/4/8 "
              f"student {rc['student'][1]:.3f}/{rc['student'][4]:.3f}/{rc['student'][8]:.3f}, "
              f"teacher {rc['teacher'][1]:.3f}/{rc['teacher'][4]:.3f}/{rc['teacher'][8]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
