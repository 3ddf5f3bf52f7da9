"""Feedback: what recording one student's Feedback costs the CPM, as the federation grows.

    python -m benchmarks.feedback [--agents 2000] [--batch 64] [--json]

Each Feedback updates the bandit and the teacher's reputation, and both are saved with
the feedback row in one transaction (exactly-once rewards). The saved state is JSON:
the LinUCB matrices (tens of KiB) plus one reputation record per teacher that ever
delivered — so writing it per feedback makes a feedback's cost grow with the number of
agents. The node writes it once per group-commit batch instead
(``Store.save_bandit_state_at_commit``). This benchmark measures both, side by side in
one run, on the real engine (``RoundEngine``, SQLite in WAL with ``synchronous=FULL``,
LinUCB, no network):

* ``batched``: the node's way — feedbacks inside ``store.grouped()``, a COMMIT every
  ``--batch`` of them (under load the node's batches hold tens to hundreds);
* ``per_feedback``: every feedback its own transaction, the state serialised each time
  (what the node did before; still what ``group_commit=False`` does).

Setup: ``--agents`` N admitted, registered agents send a profile; quorum matches round 1
(N/2 directives, LinUCB); the reputation then holds one record per agent (as after a
few rounds, when everyone has taught), and every directive's student reports Feedback.
Reported: CPU µs per feedback for both, their ratio, the saved state's size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

T0 = 1_700_000_000_000


def _matched_world(path: Path, agents: int) -> None:
    """A database where round 1 of ``agents`` agents is matched (LinUCB)."""
    from cpm.rounds import RoundEngine
    from cpm.store import open_store
    from protocol.envelope import Identity
    from protocol.messages import Profile, Register

    store = open_store(path)
    cfg = _config()
    engine = RoundEngine(store, cfg, Identity(bytes(32)))
    engine.start(T0)
    rng = np.random.default_rng(0)
    peers = [f"agent-{i:06d}" for i in range(agents)]
    with store.grouped():
        for i, peer in enumerate(peers):
            with store.transaction():
                store.admit(peer, f"org{i}", T0)
                engine.register(peer, Register(f"org{i}", "qwen2", ("/ip4/127.0.0.1/tcp/1",), "bench"), T0)
        for peer in peers:
            vec = rng.random(32)
            vec[20:32] /= vec[20:32].sum()
            with store.transaction():
                engine.profile(peer, Profile(1, tuple(float(v) for v in vec), cfg.transfer_hash), T0 + 1)
    store.commit_batch()
    assert engine.current is not None and engine.current.state == "matched", "round 1 did not match"
    store.close()


def _config() -> Any:
    """LinUCB, quorum of everyone, timers long enough that nothing expires meanwhile."""
    from cpm.config import CpmConfig

    return CpmConfig(strategy="linucb", min_agents=2, quorum=1.0, round_timer_s=3600.0, directive_ttl_s=3600.0,
                     active_window_s=86_400.0)


def _record_all(path: Path, batch: int | None) -> dict[str, Any]:
    """Every directive's Feedback; ``batch`` None = one transaction per feedback."""
    from cpm.rounds import RoundEngine
    from cpm.store import open_store
    from protocol.envelope import Identity
    from protocol.messages import Feedback

    store = open_store(path)
    engine = RoundEngine(store, _config(), Identity(bytes(32)))
    engine.start(T0 + 2)
    directives = store.list_directives(1)
    for i, peer in enumerate(sorted({a.peer_id for a in store.list_agents()})):
        engine.reputation.record(peer, 0.1 if i % 3 else -0.1, 0)  # everyone has taught before
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for i, d in enumerate(directives):
        fb = Feedback(d.directive_id, d.round, d.teacher, d.student, 2.0, 1.5, 10.0, True, "")
        if batch is None:
            with store.transaction():
                engine.feedback(d.student, fb, T0 + 3)
        else:
            with store.grouped(), store.transaction():
                engine.feedback(d.student, fb, T0 + 3)
            if (i + 1) % batch == 0:
                store.commit_batch()
    store.commit_batch()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    saved = store.load_bandit_state()
    stored = len(store.list_feedback(1))
    store.close()
    n = max(len(directives), 1)
    return {"feedbacks": len(directives), "stored": stored, "cpu_us_per_feedback": round(cpu / n * 1e6, 1),
            "wall_us_per_feedback": round(wall / n * 1e6, 1),
            "state_kib": round(len(json.dumps(saved[1])) / 1024, 1) if saved else 0.0,
            "teachers_in_state": len(saved[1]["reputation"]["teachers"]) if saved else 0}


def run(agents: int = 2000, batch: int = 64) -> dict[str, Any]:
    from p2p.logs import configure_logging

    with tempfile.TemporaryDirectory(prefix="knexa-feedback-") as tmp:
        with open(Path(tmp) / "cpm.log", "w") as logfile:
            configure_logging("json", "info", stream=logfile)  # the node's INFO lines cost CPU too
            base = Path(tmp) / "matched.db"
            _matched_world(base, agents)
            out: dict[str, Any] = {"agents": agents, "batch": batch}
            for mode, size in (("batched", batch), ("per_feedback", None)):
                path = Path(tmp) / f"{mode}.db"
                shutil.copyfile(base, path)  # the same matched round for both modes
                out[mode] = _record_all(path, size)
    out["ratio_per_feedback_over_batched"] = round(
        out["per_feedback"]["cpu_us_per_feedback"] / max(out["batched"]["cpu_us_per_feedback"], 1e-9), 2)
    out["verified"] = all(out[m]["stored"] == out[m]["feedbacks"] > 0 for m in ("batched", "per_feedback"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64, help="feedbacks per group-commit batch")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.agents < 2 or args.batch < 1:
        ap.error("--agents ≥ 2 and --batch ≥ 1")
    res = run(args.agents, args.batch)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"feedback: {args.agents} agents, {res['batched']['feedbacks']} feedbacks per mode, "
              f"state {res['batched']['state_kib']} KiB ({res['batched']['teachers_in_state']} teachers)")
        for mode in ("batched", "per_feedback"):
            r = res[mode]
            print(f"{mode:13} CPU {r['cpu_us_per_feedback']:>9} µs/feedback  wall {r['wall_us_per_feedback']:>9} µs  "
                  f"stored {r['stored']}/{r['feedbacks']}")
        print(f"per_feedback / batched CPU: ×{res['ratio_per_feedback_over_batched']}")
    return 0 if res["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
