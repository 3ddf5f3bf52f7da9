"""Results of a harness run: ``results.json``, ``rounds.csv`` and PNG plots.

Everything here is a pure function of measured rows (what the CPM recorded and the
agents reported), so the files can be rebuilt and unit-tested without a federation.
No number in a plot or table is typed in by hand.

Definitions (stable; docs/harness.md quotes them):

* ``mean_pass1`` of a round — mean over agents of held-out **test** pass@1 of the
  weights each agent profiled *for that round*, i.e. measured before that round's
  exchange, as the daemon logged it in its home (``knexad.evaluations``; the profile the
  CPM sees carries the validation pass@1 instead); the final value is the final
  evaluation.
* ``raw_reward`` of a pair — Eq. 3 before normalisation, γ(L_pre − L_post) − δ·KB, as
  stored by the CPM; ``reward`` is the z-scored value the bandit was updated with.
  ``cumulative_reward`` sums **raw** rewards (z-scores are relative to a run's own
  history and cannot be compared across strategies).
* ``gain`` — final mean pass@1 − first-round mean pass@1.
* ``bytes`` of a round — wire bytes the students received (Feedback ``kb`` × 1024, as
  the students measured them), summed over the round's pairs with feedback.
* the *curve* of a run — mean pass@1 after r rounds, r = 0 … R: r = 0 the initial value,
  0 < r < R the profiles sent for round r + 1, r = R the final evaluation; its first and
  last points are exactly the summary's ``initial_pass1`` and ``final_pass1``, so a
  plot of curves agrees with a table of finals (``curve_after_rounds``).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog

from cpm.report import (  # noqa: F401 — the CPM's rows and their aggregation, one implementation (cpm.report)
    PairRecord,
    RoundRow,
    build_round_rows,
    mean_or_none,
    pair_matrix,
)
from cpm.report import finite as _finite
from p2p.files import atomic_write

log = structlog.get_logger(__name__)

SCHEMA = "knexa-harness/results/1"
COMPARE_SCHEMA = "knexa-harness/compare/1"
ROUND_COLUMNS = (
    "round", "pairs", "feedback", "failures", "mean_reward", "mean_raw_reward",
    "cumulative_reward", "mean_pass1", "agents_reporting", "bytes",
)


@dataclass(slots=True)
class AgentFinal:
    peer: str
    name: str = ""
    org: str = ""
    family: str = ""
    pass1_initial: float | None = None
    pass1_final: float | None = None
    reward_sum: float = 0.0
    taught: int = 0
    learned: int = 0
    steps_trained: int = 0  # KD + local optimizer steps the daemon reported (equal compute)
    local_rounds: int = 0
    pass1_rounds: list[float | None] = field(default_factory=list)  # [r - 1]: profile of round r
    extra: dict[str, Any] = field(default_factory=dict)


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (0.0 for a single value, None for none)."""
    vals = _finite(values)
    if not vals:
        return None, None
    mu = sum(vals) / len(vals)
    if len(vals) == 1:
        return mu, 0.0
    var = sum((v - mu) ** 2 for v in vals) / (len(vals) - 1)
    return mu, math.sqrt(var)


# Two-sided 95 % quantiles of Student's t, df = 1 … 30 (t_{0.975, df});
# tests/unit/test_harness_results.py checks them against a numerical integral.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


def t975(df: int) -> float:
    """t_{0.975, df}; the normal quantile 1.96 beyond the table (within 2 % from df 31)."""
    if df < 1:
        raise ValueError("df must be ≥ 1")
    return T975[df - 1] if df <= len(T975) else 1.96


def ci95(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, half-width of the 95 % t-interval, n) over the finite values; the
    half-width is None below two values — one seed has no spread to show."""
    vals = _finite(values)
    mu, sd = mean_std(vals)
    if mu is None or len(vals) < 2:
        return mu, None, len(vals)
    return mu, t975(len(vals) - 1) * (sd or 0.0) / math.sqrt(len(vals)), len(vals)


def curve_after_rounds(doc: Mapping[str, Any]) -> list[float | None]:
    """Mean pass@1 after r rounds, r = 0 … R, of one results document (module docstring):
    ``[initial_pass1, rounds[1].mean_pass1, …, rounds[R-1].mean_pass1, final_pass1]``."""
    rows = list(doc.get("rounds", []))
    summary = doc.get("summary", {})
    if not rows:
        return []
    middle = [r.get("mean_pass1") for r in rows[1:]]
    return [summary.get("initial_pass1"), *middle, summary.get("final_pass1")]


def area_under(curve: Sequence[float | None]) -> float | None:
    """Trapezoidal area under a curve over r = 0 … R, divided by R: the run's mean
    pass@1 level (same unit as pass@1; rewards learning early, not only at the end).
    None when a point is missing or there are fewer than two."""
    if len(curve) < 2 or any(v is None or not math.isfinite(float(v)) for v in curve):
        return None
    vals = [float(v) for v in curve]  # type: ignore[arg-type]
    return sum((a + b) / 2 for a, b in zip(vals, vals[1:])) / (len(vals) - 1)


def aggregate_curves(curves: Sequence[Sequence[float | None]], spread: str = "std") -> dict[str, Any]:
    """Per point r: mean over runs and a band, ``spread`` = ``std`` (± sample std) or
    ``ci95`` (± the 95 % t-interval); returns ``{"x", "mean", "lo", "hi", "n"}``."""
    if spread not in ("std", "ci95"):
        raise ValueError(f"spread must be std or ci95, got {spread!r}")
    length = max((len(c) for c in curves), default=0)
    out: dict[str, Any] = {"x": list(range(length)), "mean": [], "lo": [], "hi": [], "n": len(curves)}
    for i in range(length):
        column = [c[i] for c in curves if i < len(c)]
        if spread == "std":
            mu, half = mean_std(column)
            half = half if len(_finite(column)) > 1 else None
        else:
            mu, half, _ = ci95(column)
        out["mean"].append(mu)
        out["lo"].append(None if mu is None or half is None else mu - half)
        out["hi"].append(None if mu is None or half is None else mu + half)
    return out


def build_agent_finals(
    peers: Mapping[str, Mapping[str, Any]],
    pairs: Sequence[PairRecord],
    pass1_by_round: Mapping[int, Mapping[str, float]],
    final_pass1: Mapping[str, float],
) -> list[AgentFinal]:
    """Per-agent first/last pass@1, reward earned as a student, and role counts.

    ``peers`` maps peer ID → descriptive fields (name, org, family). ``final_pass1``
    (from the latest profile) wins over the last per-round value when present.
    """
    out = []
    last_round = max(pass1_by_round, default=0)
    for peer, info in peers.items():
        series = [(r, v[peer]) for r, v in sorted(pass1_by_round.items()) if peer in v]
        initial = series[0][1] if series else None
        final = final_pass1.get(peer, series[-1][1] if series else None)
        out.append(
            AgentFinal(
                peer=peer,
                name=str(info.get("name", "")),
                org=str(info.get("org", "")),
                family=str(info.get("family", "")),
                pass1_initial=initial,
                pass1_final=final,
                reward_sum=sum(_finite(p.raw_reward for p in pairs if p.student == peer)),
                taught=sum(1 for p in pairs if p.teacher == peer),
                learned=sum(1 for p in pairs if p.student == peer),
                steps_trained=int(info.get("steps_trained", 0)),
                local_rounds=int(info.get("local_rounds", 0)),
                pass1_rounds=[pass1_by_round.get(r, {}).get(peer) for r in range(1, last_round + 1)],
            )
        )
    return out


def summarize(rows: Sequence[Mapping[str, Any]], agents: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """The three numbers ``compare`` tabulates for one run."""
    finals = [a.get("pass1_final") for a in agents]
    initials = [a.get("pass1_initial") for a in agents]
    final = mean_or_none(finals)
    first = mean_or_none(initials)
    if first is None and rows:
        first = rows[0].get("mean_pass1")
    cumulative = rows[-1]["cumulative_reward"] if rows else 0.0
    return {
        "final_pass1": final,
        "initial_pass1": first,
        "cumulative_reward": cumulative,
        "gain": (final - first) if final is not None and first is not None else None,
        "pairs": sum(int(r.get("pairs", 0)) for r in rows),
        "bytes": sum(int(r.get("bytes", 0)) for r in rows),
    }


def results_document(
    *,
    config: Mapping[str, Any],
    status: str,
    rows: Sequence[RoundRow],
    agents: Sequence[AgentFinal],
    pairs: Sequence[PairRecord],
    rounds_completed: int,
    crashed: Sequence[Mapping[str, Any]] = (),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole of ``results.json``; ``rounds_completed`` is the CPM's own count."""
    row_dicts = [asdict(r) for r in rows]
    agent_dicts = [asdict(a) for a in agents]
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "status": status,
        "config": dict(config),
        "rounds_completed": rounds_completed,
        "rounds": row_dicts,
        "agents": agent_dicts,
        "pairs": [asdict(p) for p in pairs],
        "crashed": list(crashed),
        "summary": summarize(row_dicts, agent_dicts),
    }
    if extra:
        doc.update(extra)
    return doc


def write_json(path: Path, doc: Mapping[str, Any]) -> Path:
    # not fsynced: a results file is recomputed by re-running, but never seen half-written
    atomic_write(Path(path), json.dumps(doc, indent=2, sort_keys=False, allow_nan=False, default=_json_default),
                 mode=0o644, durable=False)
    return Path(path)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_rounds_csv(path: Path, rows: Sequence[RoundRow | Mapping[str, Any]]) -> Path:
    path = Path(path)
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=ROUND_COLUMNS)
    writer.writeheader()
    for row in rows:
        data = asdict(row) if isinstance(row, RoundRow) else dict(row)
        writer.writerow({k: ("" if data.get(k) is None else data.get(k)) for k in ROUND_COLUMNS})
    atomic_write(path, buf.getvalue(), mode=0o644, durable=False)
    return path


def plot_rounds(path: Path, rows: Sequence[RoundRow | Mapping[str, Any]], title: str = "",
                final_pass1: float | None = None, initial_pass1: float | None = None) -> Path:
    """rounds.png (``cpm.plots.rounds_figure``)."""
    from cpm.plots import plot_rounds as plot

    return plot(path, rows, title, final_pass1, initial_pass1)


def plot_pair_heatmap(path: Path, pairs: Sequence[PairRecord], order: Sequence[str], labels: Sequence[str]) -> Path:
    """pairs_heatmap.png: teacher × student directive counts over the whole run."""
    from cpm.plots import plot_pair_heatmap

    return plot_pair_heatmap(path, pair_matrix(pairs, order), labels)


def write_run_outputs(out: Path, doc: Mapping[str, Any], pairs: Sequence[PairRecord], labels: Mapping[str, str]) -> dict[str, Path]:
    """results.json, rounds.csv, rounds.png, pairs_heatmap.png — paths by kind."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    order = list(labels)
    paths = {
        "results": write_json(out / "results.json", doc),
        "rounds_csv": write_rounds_csv(out / "rounds.csv", doc["rounds"]),
        "rounds_plot": plot_rounds(out / "rounds.png", doc["rounds"], title=_title(doc),
                                   final_pass1=doc.get("summary", {}).get("final_pass1"),
                                   initial_pass1=doc.get("summary", {}).get("initial_pass1")),
        "pairs_plot": plot_pair_heatmap(out / "pairs_heatmap.png", pairs, order, [labels[p] for p in order]),
    }
    log.info("harness.results.written", out=str(out), rounds=len(doc["rounds"]), pairs=len(pairs))
    return paths


def _title(doc: Mapping[str, Any]) -> str:
    cfg = doc.get("config", {})
    return (f"{cfg.get('strategy', '?')} · seed {cfg.get('seed', '?')} · {cfg.get('nodes', '?')} nodes · "
            f"{cfg.get('agent', '?')} agents · {cfg.get('rounds', '?')} rounds")


def load_results(path: Path) -> dict[str, Any]:
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a {SCHEMA} document")
    return doc


def fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def print_run_summary(console: Any, status: str, message: str, doc: Mapping[str, Any] | None) -> None:
    """Terminal report of one run: status, rounds table, agents table, where files are."""
    from rich.table import Table

    colour = "green" if status == "ok" else "red"
    console.print(f"[{colour}]status: {status}[/{colour}] {message}".rstrip())
    if doc is None:
        return
    rounds = Table(title=f"rounds ({doc['rounds_completed']} completed)")
    for col in ("round", "pairs", "feedback", "failed", "mean raw reward", "cumulative", "mean pass@1"):
        rounds.add_column(col, justify="right")
    for r in doc["rounds"]:
        rounds.add_row(str(r["round"]), str(r["pairs"]), str(r["feedback"]), str(r["failures"]),
                       fmt(r["mean_raw_reward"]), fmt(r["cumulative_reward"]), fmt(r["mean_pass1"]))
    console.print(rounds)
    agents = Table(title="agents")
    for col in ("node", "family", "pass@1 first", "pass@1 final", "taught", "learned", "local rounds",
                "steps trained", "reward as student"):
        agents.add_column(col, justify="left" if col in ("node", "family") else "right")
    for a in doc["agents"]:
        agents.add_row(a["name"], a["family"], fmt(a["pass1_initial"]), fmt(a["pass1_final"]), str(a["taught"]),
                       str(a["learned"]), str(a.get("local_rounds", 0)), str(a.get("steps_trained", 0)),
                       fmt(a["reward_sum"]))
    console.print(agents)
    s = doc["summary"]
    console.print(f"mean pass@1 {fmt(s['initial_pass1'])} → {fmt(s['final_pass1'])} (gain {fmt(s['gain'])}), "
                  f"cumulative raw reward {fmt(s['cumulative_reward'])}, {s['pairs']} pairs")
    if doc.get("paths"):
        from harness.paths import summary_line

        console.print(summary_line(doc["paths"]), soft_wrap=True)
    out = Path(doc["config"]["out"])
    console.print(f"results: {out / 'results.json'}, {out / 'rounds.csv'}; plots: {out / 'rounds.png'}, "
                  f"{out / 'pairs_heatmap.png'}; logs: {out / 'logs'}", soft_wrap=True)
