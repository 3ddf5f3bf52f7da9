"""The exact per-round optimum of a matching: the simulator's ceiling, not the CPM's matcher.

Why not greedy: ``greedy_disjoint`` takes the best pair first and is a ½-approximation,
so an "oracle" built on it can be beaten by a learner that happens to pick a better
matching (on the synthetic benchmark LinUCB's greedy matching sometimes did). A ceiling
that can be beaten flatters whoever beats it.

Problem (the constraints of Algorithm 1 exactly): candidates are ordered
(teacher, student, arm) tuples with a value; each agent is in at most one pair per round;
at most K_p pairs. Maximise the total value of the chosen pairs.

Reduction, exact:

1. Only one (direction, arm) of an unordered pair {a, b} can be used, so the pair's weight
   is the best value over both directions and all arms (ties: the first candidate in
   the given order). A pair of value ≤ 0 never raises the total of an *at most* K_p
   matching, so it is dropped (the optimum may leave agents unpaired when every pair left
   would hurt; every other method may still fill K_p, which only lowers its value).
2. K_p ≥ ⌊N/2⌋: no cardinality limit binds; a maximum-weight matching of the graph of
   positive pairs is the optimum.
3. K_p < ⌊N/2⌋: every pair on the complete graph gets weight max(w, 0), and N − 2K_p
   dummy vertices are joined to every agent with weight 0 (not to each other). A
   perfect matching of that graph exists, pairs exactly N − 2K_p agents with dummies and
   so exactly K_p pairs of agents; the maximum-weight one among maximum-cardinality
   matchings (``maxcardinality=True``) therefore maximises the clamped total over
   K_p-pair matchings. Dropping its weight-0 pairs gives an at-most-K_p matching with the
   same value, and every at-most-K_p matching extends (by zero-weight pairs of the
   complete graph) to a K_p-pair one of at least its value: the two optima are equal.

Exactness of the solver: networkx's ``max_weight_matching`` (Edmonds' blossom algorithm,
Galil's formulation) is exact and uses only integer arithmetic when all weights are
integers. Values are therefore rounded to multiples of ``resolution`` (1e-12) first: the
matching returned is optimal for the rounded values, so its true value is within
K_p · resolution of the true optimum (K_p · 1e-12, against per-pair values of ~1e-3 in
the synthetic world). networkx is imported here only, so the CPM node never loads it.
"""

from __future__ import annotations

import numpy as np

from cpm.matching import MatchResult, _empty

RESOLUTION = 1e-12


def best_per_pair(t: np.ndarray, s: np.ndarray, k: np.ndarray, score: np.ndarray,
                  n_agents: int) -> tuple[np.ndarray, ...]:
    """One candidate per unordered pair {a, b}: the best (direction, arm), ties to the
    first in the given order. Returns (t, s, k, score) of those candidates."""
    t = np.asarray(t, dtype=np.int64)
    s = np.asarray(s, dtype=np.int64)
    score = np.asarray(score, dtype=float)
    key = np.minimum(t, s) * n_agents + np.maximum(t, s)
    order = np.lexsort((np.arange(t.size), -score, key))  # by pair, best first, stable
    ks = key[order]
    first = order[np.concatenate([[True], ks[1:] != ks[:-1]])] if ks.size else order
    return t[first], s[first], np.asarray(k, dtype=np.int64)[first], score[first]


def optimal_disjoint(t: np.ndarray, s: np.ndarray, k: np.ndarray, score: np.ndarray, n_agents: int,
                     k_pairs: int, resolution: float = RESOLUTION) -> MatchResult:
    """Maximum-total disjoint matching of at most ``k_pairs`` pairs over the candidates
    (same arguments as ``greedy_disjoint``); pairs in decreasing order of value."""
    import networkx as nx  # only the simulator's ceiling needs it

    cap = min(int(k_pairs), n_agents // 2)
    if cap <= 0 or np.asarray(t).size == 0:
        return _empty()
    bt, bs, bk, bsc = best_per_pair(t, s, k, score, n_agents)
    if np.isnan(bsc).any() or np.isposinf(bsc).any():
        raise ValueError("candidate values must be finite or −inf")
    w = np.where(bsc > 0, np.rint(np.where(bsc > 0, bsc, 0.0) / resolution), 0).astype(np.int64)
    G = nx.Graph()
    G.add_nodes_from(range(n_agents))
    limited = cap < n_agents // 2
    if limited:  # step 3: the complete graph at weight 0 (a missing candidate is a 0), dummies
        G.add_edges_from((a, b, {"weight": 0, "idx": -1}) for a in range(n_agents) for b in range(a + 1, n_agents))
        dummies = range(n_agents, 2 * n_agents - 2 * cap)
        G.add_edges_from((d, a, {"weight": 0, "idx": -1}) for d in dummies for a in range(n_agents))
    for i in np.flatnonzero(w > 0).tolist():
        G.add_edge(int(bt[i]), int(bs[i]), weight=int(w[i]), idx=i)
    mate = nx.max_weight_matching(G, maxcardinality=limited, weight="weight")
    sel = [G.edges[a, b]["idx"] for a, b in mate]
    sel = np.asarray(sorted(i for i in sel if i >= 0 and w[i] > 0), dtype=np.int64)
    if sel.size == 0:
        return _empty()
    sel = sel[np.lexsort((bs[sel], bt[sel], -bsc[sel]))]
    return MatchResult(bt[sel], bs[sel], bk[sel], bsc[sel])
