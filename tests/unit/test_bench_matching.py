"""benchmarks/matching_scale.py's recall measurement and run_all's ratio table (no timing
asserted: only that the numbers are computed from the right sets)."""

from __future__ import annotations

import numpy as np

from benchmarks import matching_scale as ms
from benchmarks import run_all
from benchmarks.cpm_scale import N_ARMS, population, trained_bandit
from cpm.matching import _all_pairs, _PairScorer

N = 120


def test_recall_is_one_for_every_pair_and_counts_exactly_the_missing_best() -> None:
    P, bandit = population(N, 4), trained_bandit()
    t, s = _all_pairs(N)
    full = ms.recall(P, bandit, t, s, sample=0)
    assert full["sample"] == N
    assert all(full[role][k] == 1.0 for role in ("student", "teacher") for k in ms.RECALL_K)
    # drop each agent's single best (teacher, arm) pair as student: recall@1 as student → 0
    sc = _PairScorer(P, bandit, N_ARMS, bandit.beta()).scores_chunked(t, s).max(axis=1)
    M = np.full((N, N), -np.inf)
    M[t, s] = sc
    best_teacher = M.argmax(axis=0)  # per student
    drop = set(zip(best_teacher.tolist(), range(N)))
    keep = np.array([(a, b) not in drop for a, b in zip(t.tolist(), s.tolist())])
    part = ms.recall(P, bandit, t[keep], s[keep], sample=0)
    assert part["student"][1] == 0.0
    assert part["student"][8] <= 7 / 8 + 1e-12  # at least the best of 8 is gone


def test_run_all_ratios_carry_targets_and_directions() -> None:
    doc = {"quick": False, "matching": {"results": [{"agents": 10000}, {"agents": 100000}],
                                        "ratio_cpu_big_over_small": 6.7, "cpu_small_over_target": 1.5,
                                        "recall": {"full": {"student": {1: 1.0, 4: 0.97, 8: 0.86},
                                                            "teacher": {1: 1.0, 4: 0.96, 8: 0.86}}}},
           "dial": {"ratio_ours_vs_bare": 0.98}, "stream": {"error": "boom"}}
    by_name = {r["name"]: r for r in run_all.ratios(doc)}
    assert by_name["matching cpu t(100000)/t(10000)"] == {"name": "matching cpu t(100000)/t(10000)", "value": 6.7,
                                                         "target": 10.0, "better": "lower"}
    assert by_name["connection setup ours/bare"]["target"] == 1.2
    assert by_name["recall@8 student (full, 10000)"]["value"] == 0.86
    assert by_name["stream knexa/bare"]["value"] is None  # failed benchmark: not measured
    quick = {r["name"]: r for r in run_all.ratios({**doc, "quick": True})}
    assert quick["matching cpu t(100000)/t(10000)"]["target"] is None  # no target on quick sizes


def test_other_topk_is_timed_beside_the_node_topk_and_recalls_at_least_as_much() -> None:
    """``--topk 12``: the variant is timed in the same repeats, and its larger shortlist
    holds every pair the node's holds, so its recall cannot be lower."""
    out = ms.run([300], repeat=1, recall_sample=10, recall_ann=False, other_topk=(12,))
    (variant,) = out["topk_variants"]
    assert variant["agents"] == 300 and variant["topk"] == 12 and variant["cpu_over_node_topk"] > 0
    node, wide = out["recall"]["full"], out["recall"]["full, topk 12"]
    assert wide["shortlisted_pairs"] > node["shortlisted_pairs"]
    assert all(wide[role][k] >= node[role][k] for role in ("student", "teacher") for k in ms.RECALL_K)
