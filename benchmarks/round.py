"""Wall time of federation rounds on loopback, broken into phases (issue #8 item 4).

One ``knexa-harness up`` run — a CPM + N daemons as real processes, tiny ML agents on
the CPU by default — then every phase is read back from the processes' own JSON logs
(``<out>/logs/*.log``; all processes share this machine's clock). Per round r, with
each milestone the *last* such event of the round (a round is a barrier: it ends when
its slowest pair does, so the phases add up to the round's wall time):

============  ==========================================================================
phase         from → to (log events)
============  ==========================================================================
profile       ``cpm.round.opened`` → last ``cpm.profile.accepted`` (the daemons'
              end-of-round evaluation + profile; round 1 also holds process start-up,
              model load and the first local LoRA fine-tune: see ``warmup``)
match         → ``cpm.round.matched`` (LinUCB scoring + greedy matching at the CPM)
exchange      → last ``exchange.package.received`` (directive delivery, dial, teacher
              generation, E2E transfer)
learn         → last ``agent.learned`` (KD steps on the student)
feedback      → ``cpm.round.closed`` (signed Feedback, reward, bandit update)
============  ==========================================================================

A milestone with no event (no pair, a failed exchange) takes the previous one's time,
so its phase is 0 and the next phase spans it. The headline metric is the mean wall
time of the *steady* rounds (2 … R): round 1 pays one-time costs that no later round
repeats, reported apart. Target: ≤ 60 s per round with 8 daemons (issue #8).

Usage::

    python -m benchmarks.round                      # 8 tiny ML daemons, 2 rounds, fast budget
    python -m benchmarks.round --budget standard --rounds 3 --json
    python -m benchmarks.round --from-logs demo-out/logs   # phases of an existing run
    python -m benchmarks.round --probe-threads      # 4 trainers at once: 1 thread each vs default
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

TARGET_S = 60.0
_NODE_LOG = re.compile(r"(node|pack)-\d+")  # a daemon's (or a pack's) log, not its -init/-admit
PHASES = ("profile", "match", "exchange", "learn", "feedback")
# milestone → (event, where): the phase named by PHASES[i] ends at MILESTONES[i]
MILESTONES = (
    ("profiles_in", "cpm.profile.accepted", "cpm"),
    ("matched", "cpm.round.matched", "cpm"),
    ("exchanged", "exchange.package.received", "node"),
    ("learned", "agent.learned", "node"),
    ("closed", "cpm.round.closed", "cpm"),
)


# -- log parsing ------------------------------------------------------------------------


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def read_events(log_dir: Path) -> Iterator[dict[str, Any]]:
    """JSON events of every process log in ``log_dir``, each with ``_t`` (epoch s) and
    ``_src`` (``cpm``, ``node`` or ``other``). Non-JSON lines (the harness's command
    header, library warnings, a ready multiaddr) are skipped."""
    for path in sorted(Path(log_dir).glob("*.log")):
        name = path.stem
        src = "cpm" if name == "cpm" else "node" if _NODE_LOG.fullmatch(name) else "other"
        with path.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if not line.startswith("{"):
                    continue
                try:
                    ev = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(ev, dict) or "event" not in ev or "timestamp" not in ev:
                    continue
                ev["_t"] = _ts(ev["timestamp"])
                ev["_src"] = src
                ev["_file"] = name
                yield ev


def _last(events: Iterable[dict[str, Any]], event: str, src: str, round_: int) -> float | None:
    times = [e["_t"] for e in events if e["event"] == event and e["_src"] == src and e.get("round") == round_]
    return max(times) if times else None


def _durations(events: Sequence[dict[str, Any]], event: str, lo: float, hi: float) -> list[float]:
    return [e["duration_ms"] / 1000 for e in events
            if e["event"] == event and "duration_ms" in e and lo <= e["_t"] <= hi]


def _summary(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"n": len(values), "median_s": round(statistics.median(values), 2), "max_s": round(max(values), 2)}


def round_phases(events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per closed round: phase seconds (summing to ``total_s``), milestones, and the
    per-call work durations that fall inside it (context: they overlap across pairs)."""
    opened = {e["round"]: e["_t"] for e in events if e["event"] == "cpm.round.opened" and e["_src"] == "cpm"}
    rows = []
    for r in sorted(opened):
        if _last(events, "cpm.round.closed", "cpm", r) is None:
            continue  # an unfinished round has no wall time
        prev = start = opened[r]
        phases: dict[str, float] = {}
        marks: dict[str, float] = {}
        for phase, (mark, event, src) in zip(PHASES, MILESTONES, strict=True):
            t = _last(events, event, src, r)
            t = prev if t is None else max(t, prev)
            phases[phase] = round(t - prev, 3)
            marks[mark] = round(t - start, 3)
            prev = t
        end = prev
        work = {
            "evaluate": _summary(_durations(events, "agent.evaluate.done", start, end)),
            "teach": _summary(_durations(events, "agent.teach.done", start, end)),
            "exchange": _summary(_durations(events, "exchange.package.received", start, end)),
            "learn": _summary(_durations(events, "agent.learn.done", start, end)),
        }
        rows.append({
            "round": r,
            "total_s": round(end - start, 3),
            "phases": phases,
            "milestones": marks,
            "pairs": sum(1 for e in events if e["event"] == "cpm.directive.issued" and e.get("round") == r),
            "feedback": sum(1 for e in events if e["event"] == "cpm.feedback.recorded" and e.get("round") == r),
            "work": {k: v for k, v in work.items() if v is not None},
        })
    return rows


def warmup(events: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Round 1's one-time costs: CPM up → all daemons ready (process start, imports,
    model load), their first local LoRA fine-tune, the first evaluation."""
    opened = [e["_t"] for e in events if e["event"] == "cpm.round.opened" and e.get("round") == 1]
    if not opened:
        return {}
    t0 = opened[0]
    ready = [e["_t"] for e in events if e["event"] == "daemon.ready" and e["_src"] == "node"]
    local = [e for e in events if e["event"] == "agent.local.done"]
    out: dict[str, Any] = {}
    if ready:
        out["all_ready_s"] = round(max(ready) - t0, 2)
    if local:
        out["local_done_s"] = round(max(e["_t"] for e in local) - t0, 2)
        out["local_finetune"] = _summary([e["duration_ms"] / 1000 for e in local])
        out["local_steps"] = local[0].get("steps")
    first_eval = _durations(events, "agent.evaluate.done", t0, float("inf"))[: max(1, len(ready))]
    if first_eval:
        out["first_evaluate"] = _summary(first_eval)
    return out


def analyze(log_dir: Path) -> dict[str, Any]:
    events = sorted(read_events(log_dir), key=lambda e: e["_t"])
    rows = round_phases(events)
    steady = [r["total_s"] for r in rows if r["round"] >= 2]
    headline = statistics.mean(steady) if steady else (rows[0]["total_s"] if rows else None)
    return {
        "rounds": rows,
        "warmup": warmup(events),
        "metric": {
            "name": "seconds per steady round (rounds 2…R)" if steady else "seconds of round 1 (incl. warm-up)",
            "value": None if headline is None else round(headline, 2),
            "target_s": TARGET_S,
            "ratio": None if headline is None else round(headline / TARGET_S, 3),
        },
    }


# -- running ----------------------------------------------------------------------------


def run(nodes: int = 8, rounds: int = 2, budget: str = "fast", agent: str = "ml",
        models: Sequence[str] = ("tiny-qwen2", "tiny-gpt2"), out: Path | None = None) -> dict[str, Any]:
    """Bring up a federation through the real harness, then analyze its logs."""
    from harness.federation import UpConfig, run_up

    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="knexa-bench-round-")
        out = Path(tmp.name)
    try:
        cfg = UpConfig(nodes=nodes, rounds=rounds, out=Path(out), agent=agent, models=tuple(models),
                       budget=budget, progress=False)
        t0 = time.perf_counter()
        outcome = run_up(cfg, console=None)
        wall = time.perf_counter() - t0
        doc = analyze(Path(out) / "logs")
        doc.update(status=outcome.status, message=outcome.message[-500:], wall_s=round(wall, 1),
                   config={"nodes": nodes, "rounds": rounds, "budget": budget, "agent": agent,
                           "models": list(models)},
                   cpus=os.cpu_count(), load_avg=[round(x, 2) for x in os.getloadavg()])
        if outcome.doc is not None:
            summary = outcome.doc.get("summary", {})
            doc["pass1"] = {"initial": summary.get("initial_pass1"), "final": summary.get("final_pass1")}
        return doc
    finally:
        if tmp is not None:
            tmp.cleanup()


_PROBE = ("import json, sys; from knexad.agent.ml_agent import step_seconds; "
          "print(json.dumps(step_seconds(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))")


def probe_threads(procs: int = 4, steps: int = 5, spec: str = "tiny-qwen2", timeout_s: float = 240.0) -> dict[str, Any]:
    """Seconds per LoRA step when ``procs`` processes train at once (the demo's 4 daemons),
    each on 1 torch thread vs each on torch's default (``cpu_count``). The two settings run
    one after the other; a setting whose processes overrun ``timeout_s`` is killed and
    reported as None (slower than the bound). Why tiny models pin one thread."""
    import subprocess

    default = os.cpu_count() or 1
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["HF_HUB_OFFLINE"] = "1"
    out: dict[str, Any] = {"spec": spec, "procs": procs, "steps": steps, "cpus": default}
    for threads in (1, default):
        children = [subprocess.Popen([sys.executable, "-c", _PROBE, spec, str(steps), str(threads)], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
                    for _ in range(procs)]
        deadline = time.monotonic() + timeout_s
        values: list[float] = []
        for child in children:
            try:
                text, _ = child.communicate(timeout=max(0.1, deadline - time.monotonic()))
                values.append(float(json.loads(text.decode().strip().splitlines()[-1])))
            except (subprocess.TimeoutExpired, ValueError, IndexError):
                os.killpg(child.pid, 9)
                child.wait()
        out[f"s_per_step_{threads}_thread{'s' if threads > 1 else ''}"] = (
            round(statistics.median(values), 4) if len(values) == procs else None)
    one, many = out["s_per_step_1_thread"], out.get(f"s_per_step_{default}_threads")
    out["ratio_default_over_1"] = round(many / one, 2) if one and many else None
    out["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    return out


# -- output -----------------------------------------------------------------------------


def format_table(doc: Mapping[str, Any]) -> str:
    lines = [f"{'round':>5}  {'total':>7}  " + "  ".join(f"{p:>8}" for p in PHASES) + "  pairs  feedback"]
    for r in doc["rounds"]:
        lines.append(f"{r['round']:>5}  {r['total_s']:>6.1f}s  "
                     + "  ".join(f"{r['phases'][p]:>7.1f}s" for p in PHASES)
                     + f"  {r['pairs']:>5}  {r['feedback']:>8}")
    w = doc.get("warmup") or {}
    if w:
        lines.append("round 1 warm-up: " + ", ".join(
            f"{k} {v}" for k, v in w.items() if not isinstance(v, dict))
            + (f", local fine-tune median {w['local_finetune']['median_s']} s" if "local_finetune" in w else ""))
    m = doc["metric"]
    if m["value"] is not None:
        verdict = "meets" if m["ratio"] <= 1 else "misses"
        lines.append(f"metric: {m['name']} = {m['value']:.1f} s · target ≤ {m['target_s']:.0f} s · "
                     f"ratio {m['ratio']:.2f} ({verdict})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.round", description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--budget", default="fast", help="fast | standard | thorough (ML step counts)")
    ap.add_argument("--agent", default="ml", choices=("ml", "synthetic"))
    ap.add_argument("--models", default="tiny-qwen2,tiny-gpt2")
    ap.add_argument("--out", type=Path, default=None, help="keep the run's outputs and logs here")
    ap.add_argument("--from-logs", type=Path, default=None, help="only analyze an existing run's logs")
    ap.add_argument("--probe-threads", action="store_true", help="LoRA s/step: 1 thread vs default")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.probe_threads:
        doc = probe_threads()
        print(json.dumps(doc, indent=None if args.json else 1))
        return 0
    if args.from_logs is not None:
        doc = analyze(args.from_logs)
    else:
        _quiet_logs()
        doc = run(args.nodes, args.rounds, args.budget, args.agent, args.models.split(","), args.out)
    if args.json:
        print(json.dumps(doc))
    else:
        if "status" in doc:
            print(f"{doc['config']['nodes']} daemons ({doc['config']['agent']}, budget {doc['config']['budget']}), "
                  f"{doc['config']['rounds']} rounds: status {doc['status']}, wall {doc['wall_s']} s, "
                  f"load avg {doc['load_avg']}")
        print(format_table(doc))
    return 0 if doc.get("status", "ok") == "ok" and doc["rounds"] else 1


def _quiet_logs() -> None:
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


if __name__ == "__main__":
    sys.exit(main())
