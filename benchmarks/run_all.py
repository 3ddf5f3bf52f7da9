"""`make bench`: every benchmark with small defaults, one table, benchmarks/results.json.

Each row is a metric, its target, and the ratio measured side by side in the same run
(absolute times are context only — the machine is shared and noisy). Runs in under 10 minutes
on the 2-core machine (about 2 with ``--quick``) before the 10k/100k matching run and its
recall (``matching_scale``), which add about 1–2 minutes of CPU (full run only). Usage: ``python -m benchmarks.run_all [--quick]``.

results.json also carries ``ratios``: every ratio with its target and which way is better,
the input of ``make bench-check`` (``benchmarks/bench_check.py``), which compares them
with the last recorded run of the same machine and mode.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog

from benchmarks import cpm_scale, dial, feedback, ingest, load, matching_scale, stream
from benchmarks import round as round_bench

OUT = Path(__file__).with_name("results.json")


def _scale(quick: bool) -> tuple[dict[str, Any], list[tuple[str, str, str, str]]]:
    # 10k and 100k: _matching (matching_scale); here the naive loop for context
    res = cpm_scale.run([100, 1000], naive_teachers=3, repeat=1 if quick else 3)
    rows = []
    for r in res["results"]:
        n = r["agents"]
        rows.append((f"match {n} agents", f"{r['fast_s']:.2f} s wall / {r['fast_cpu_s']:.2f} s CPU",
                     "—", f"naive/fast ×{r['ratio_naive_over_fast']:.0f}"))
    return res, rows


def _matching(quick: bool) -> tuple[dict[str, Any], list[tuple[str, str, str, str]]]:
    sizes = [1000, 10000] if quick else [10000, 100000]
    res = matching_scale.run(sizes, recall_sample=100 if quick else 300, recall_ann=not quick)
    rows = [(f"match {r['agents']} agents (all in round)", f"{r['cpu_s']:.2f} s CPU / {r['wall_s']:.2f} s wall",
             "≤ 2 s CPU" if r["agents"] == 10000 else "context", f"peak traced {r['peak_traced_mb']:.0f} MB")
            for r in res["results"]]
    rows.append((f"  t({sizes[1]})/t({sizes[0]})", f"CPU ×{res['ratio_cpu_big_over_small']:.2f}",
                 "≤ 10×" if not quick else "context", f"wall ×{res['ratio_wall_big_over_small']:.2f}"))
    for name, r in res.get("recall", {}).items():
        rows.append((f"  recall@1/4/8 at {sizes[0]} ({name})",
                     "/".join(f"{min(r['student'][k], r['teacher'][k]):.3f}" for k in (1, 4, 8)), "≥ 0.95",
                     f"{r['sample']} agents sampled"))
    return res, rows


def _dial(quick: bool) -> tuple[dict[str, Any], list[tuple[str, str, str, str]]]:
    res = dial.run(connections=10 if quick else 40)
    m = res["median_ms"]
    return res, [("connection setup (fresh dial + stream)", f"ours {m['ours']} ms, bare {m['bare']} ms",
                  f"≤ {dial.TARGET}× bare", f"ours/bare {res['ratio_ours_vs_bare']}")]


def ratios(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every ratio of the run with its target (None: context only) and which way is
    better — what ``make bench-check`` guards. A benchmark that failed gives None values."""

    def get(name: str, *path: Any) -> Any:
        cur: Any = doc.get(name)
        for key in path:
            if not isinstance(cur, dict) or key not in cur:
                return None
            cur = cur[key]
        return cur

    quick = bool(doc.get("quick"))
    m = doc.get("matching", {})
    sizes = [r["agents"] for r in m.get("results", [])] or ([1000, 10000] if quick else [10000, 100000])
    out = [
        (f"matching cpu t({sizes[-1]})/t({sizes[0]})", get("matching", "ratio_cpu_big_over_small"),
         None if quick else matching_scale.TARGET_SCALE, "lower"),
        ("stream knexa/bare", get("stream", "ratio_knexa_vs_bare"), 0.8, "higher"),
        ("stream knexa/bare, CPU per MiB", get("stream", f"cpu_ratio_knexa_{stream.DAEMON_WIRE}_vs_bare"), None, "higher"),
        ("connection setup ours/bare", get("dial", "ratio_ours_vs_bare"), dial.TARGET, "lower"),
        ("ingest of target", get("ingest", "ratio_vs_target"), 1.0, "higher"),
        ("ingest group/per-message", get("ingest", "ratio_group_vs_per_message"), None, "higher"),
        ("feedback per-feedback/batched", get("feedback", "ratio_per_feedback_over_batched"), None, "higher"),
    ]
    if not quick:
        out.append(("matching 10k cpu/2 s", get("matching", "cpu_small_over_target"), 1.0, "lower"))
    for r in get("cpm_scale", "results") or []:
        out.append((f"naive/fast {r['agents']}", r.get("ratio_naive_over_fast"), None, "higher"))
    for name in ("full", "clustered"):
        for k in (1, 4, 8):
            for role in ("student", "teacher"):
                val = get("matching", "recall", name, role, str(k)) or get("matching", "recall", name, role, k)
                if val is not None or name == "full":
                    out.append((f"recall@{k} {role} ({name}, {sizes[0]})", val,
                                matching_scale.TARGET_RECALL if name == "full" else None, "higher"))
    rnd = get("round", "metric", "ratio")
    if not quick:
        out.append(("round/target (ml)", rnd, 1.0, "lower"))
    return [{"name": n, "value": v, "target": t, "better": b} for n, v, t, b in out]


def _stream(quick: bool) -> tuple[dict[str, Any], list[tuple[str, str, str, str]]]:
    res = stream.run(mib=16 if quick else 64, repeats=1 if quick else 2)
    rows = [
        ("knowledge stream", f"{res['MB_per_s']['knexa']} MB/s", "≥ 0.8× bare libp2p",
         f"knexa/bare {res['ratio_knexa_vs_bare']}"),
        ("bare libp2p stream", f"{res['MB_per_s']['bare']} MB/s", "context", f"bare/raw TCP {res['ratio_bare_vs_raw_tcp']}"),
        ("stream CPU per MiB (both peers)", f"knexa {res['cpu_ms_per_mib'][f'knexa_{stream.DAEMON_WIRE}']} ms, "
         f"bare {res['cpu_ms_per_mib']['bare']} ms; box seal+open {res['box_cpu_ms_per_mib']['seal']}+"
         f"{res['box_cpu_ms_per_mib']['open']} ms", "context",
         f"bare/knexa CPU {res[f'cpu_ratio_knexa_{stream.DAEMON_WIRE}_vs_bare']}"),
        ("connection setup", f"{res['connect_ms_median']} ms", "≤ 20 ms", "—"),
    ]
    return res, rows


def _load(quick: bool) -> tuple[dict[str, Any], list[tuple[str, str, str, str]]]:
    agents, rounds = (40, 3) if quick else (100, 10)
    with tempfile.TemporaryDirectory(prefix="knexa-bench-load-") as tmp:
        res = load.run(agents, rounds, 2, "linucb", Path(tmp), timeout_s=600)
    rows = [
        (f"CPM load {agents} agents × {rounds} rounds", f"{res['profiles_per_s']} profiles/s",
         "no loss", f"feedback lost {res['feedback_lost']}, dup {res['feedback_duplicates']}"),
        ("CPM directives", f"{res['directives_per_s']} directives/s", "—", "—"),
    ]
    return res, rows


def _ingest(quick: bool) -> tuple[dict[str, Any], list[tuple[str, str, str, str]]]:
    res = ingest.run(profiles=400 if quick else 1000, clients=16)
    best = res.get("best_mode")
    rows = [
        ("CPM ingest (signed profiles)", f"{res[best]['profiles_per_s']} profiles/s ({best})" if best else "—",
         f"≥ {ingest.TARGET_PER_S:,.0f}/s", f"of target {res.get('ratio_vs_target')}"),
        ("  group vs per-message commit", f"fsync {res['commit_ms']} ms", "context",
         f"group/per-message {res.get('ratio_group_vs_per_message')}"),
    ]
    return res, rows


def _feedback(quick: bool) -> tuple[dict[str, Any], list[tuple[str, str, str, str]]]:
    res = feedback.run(agents=500 if quick else 2000)
    b, p = res["batched"], res["per_feedback"]
    return res, [("CPM feedback (state once per batch)", f"{b['cpu_us_per_feedback']:.0f} µs CPU/feedback",
                  "context", f"per-feedback/batched ×{res['ratio_per_feedback_over_batched']} "
                             f"({p['cpu_us_per_feedback']:.0f} µs)")]


def _round(quick: bool) -> tuple[dict[str, Any], list[tuple[str, str, str, str]]]:
    # --quick: SyntheticAgents (no torch) show the protocol phases; the target is for ML daemons
    agent = "synthetic" if quick else "ml"
    res = round_bench.run(nodes=8, rounds=2, budget="fast", agent=agent)
    m = res["metric"]
    value = f"{m['value']:.1f} s ({agent}, 8 daemons)" if m["value"] is not None else f"no round ({res['status']})"
    ratio = f"round/target {m['ratio']:.2f}" if m["value"] is not None and agent == "ml" else "—"
    return res, [("loopback round", value, "≤ 60 s (ml, tiny)" if agent == "ml" else "context", ratio)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a couple of minutes)")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    doc: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_avg": os.getloadavg(),
                           "quick": args.quick}
    table: list[tuple[str, str, str, str]] = []
    for name, fn in (("cpm_scale", _scale), ("matching", _matching), ("stream", _stream), ("dial", _dial),
                     ("load", _load), ("ingest", _ingest), ("feedback", _feedback), ("round", _round)):
        t0 = time.perf_counter()
        # re-applied each time: a benchmark may point logging at a file it has since closed
        structlog.reset_defaults()
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
        try:
            doc[name], rows = fn(args.quick)
        except Exception as exc:  # noqa: BLE001 — one failing benchmark must not hide the others
            doc[name] = {"error": f"{type(exc).__name__}: {exc}"}
            rows = [(name, "FAILED", "—", str(exc)[:60])]
        doc[name + "_seconds"] = round(time.perf_counter() - t0, 1)
        table += rows
    doc["load_avg_end"] = os.getloadavg()
    doc["ratios"] = ratios(doc)
    doc["ratio_names"] = [r["name"] for r in doc["ratios"]]
    OUT.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    width = max(len(r[0]) for r in table)
    print(f"{'metric':{width}}  {'value':34}  {'target':22}  ratio")
    for metric, value, target, ratio in table:
        print(f"{metric:{width}}  {value:34}  {target:22}  {ratio}")
    print(f"\nwritten: {OUT} (ratios for `make bench-check`: {len(doc['ratios'])})")
    return 1 if any(r[1] == "FAILED" for r in table) else 0


if __name__ == "__main__":
    sys.exit(main())
