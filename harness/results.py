"""Results of a harness run: ``results.json``, ``rounds.csv`` and PNG plots.

Everything here is a pure function of measured rows (what the CPM recorded and the
agents reported), so the files can be rebuilt and unit-tested without a federation.
No number in a plot or table is typed in by hand.

Definitions (stable; docs/harness.md quotes them):

* ``mean_pass1`` of a round — mean over agents of pass@1 (profile index 8) in the
  profile each agent submitted *for that round*, i.e. measured before that round's
  exchange; the final value is from the last profile seen.
* ``raw_reward`` of a pair — Eq. 3 before normalisation, γ(L_pre − L_post) − δ·KB, as
  stored by the CPM; ``reward`` is the z-scored value the bandit was updated with.
  ``cumulative_reward`` sums **raw** rewards (z-scores are relative to a run's own
  history and cannot be compared across strategies).
* ``gain`` — final mean pass@1 − first-round mean pass@1.
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

from p2p.files import atomic_write

log = structlog.get_logger(__name__)

SCHEMA = "knexa-harness/results/1"
COMPARE_SCHEMA = "knexa-harness/compare/1"
ROUND_COLUMNS = (
    "round", "pairs", "feedback", "failures", "mean_reward", "mean_raw_reward",
    "cumulative_reward", "mean_pass1", "agents_reporting",
)


@dataclass(frozen=True, slots=True)
class PairRecord:
    """One directive of one round and, once it arrived, its feedback."""

    round: int
    teacher: str
    student: str
    arm: int = 0
    directive_id: str = ""
    ok: bool | None = None  # None: no feedback (yet)
    raw_reward: float | None = None
    reward: float | None = None
    kb: float | None = None


@dataclass(slots=True)
class RoundRow:
    round: int
    pairs: int = 0
    feedback: int = 0
    failures: int = 0
    mean_reward: float | None = None
    mean_raw_reward: float | None = None
    cumulative_reward: float = 0.0
    mean_pass1: float | None = None
    agents_reporting: int = 0


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
    extra: dict[str, Any] = field(default_factory=dict)


def _finite(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_or_none(values: Iterable[float | None]) -> float | None:
    vals = _finite(values)
    return sum(vals) / len(vals) if vals else None


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


def build_round_rows(
    pairs: Sequence[PairRecord], pass1_by_round: Mapping[int, Mapping[str, float]], rounds: Sequence[int]
) -> list[RoundRow]:
    """Per-round aggregate rows, in round order, with a running raw-reward sum."""
    rows: list[RoundRow] = []
    cumulative = 0.0
    for rnd in sorted(set(rounds)):
        mine = [p for p in pairs if p.round == rnd]
        done = [p for p in mine if p.ok is not None]
        raw = _finite(p.raw_reward for p in done)
        cumulative += sum(raw)
        pass1 = pass1_by_round.get(rnd, {})
        rows.append(
            RoundRow(
                round=rnd,
                pairs=len(mine),
                feedback=len(done),
                failures=sum(1 for p in done if p.ok is False),
                mean_reward=mean_or_none(p.reward for p in done),
                mean_raw_reward=mean_or_none(raw),
                cumulative_reward=cumulative,
                mean_pass1=mean_or_none(pass1.values()),
                agents_reporting=len(pass1),
            )
        )
    return rows


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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    return plt


def plot_rounds(
    path: Path, rows: Sequence[RoundRow | Mapping[str, Any]], title: str = "", final_pass1: float | None = None
) -> Path:
    """Two panels: mean pass@1 per round, cumulative raw reward per round.

    Round r's pass@1 is measured before round r's exchange; ``final_pass1`` (after the
    last round) is drawn as a separate marker one step to the right.
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    data = [asdict(r) if isinstance(r, RoundRow) else dict(r) for r in rows]
    rounds = [d["round"] for d in data]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    pts = [(d["round"], d["mean_pass1"]) for d in data if d.get("mean_pass1") is not None]
    if pts:
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label="before round r")
    if final_pass1 is not None and rounds:
        ax1.plot([max(rounds) + 1], [final_pass1], marker="*", markersize=12, linestyle="none",
                 color="tab:green", label="after last round")
        ax1.legend(loc="lower right", fontsize=8)
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_xlabel("round")
    ax1.set_ylabel("mean pass@1 (agents' profiles)")
    ax1.set_ylim(bottom=0)
    ax1.grid(alpha=0.3)
    ax2.plot(rounds, [d["cumulative_reward"] for d in data], marker="o", color="tab:orange")
    ax2.set_xlabel("round")
    ax2.set_ylabel("cumulative raw reward")
    ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def pair_matrix(pairs: Sequence[PairRecord], order: Sequence[str]) -> list[list[int]]:
    """counts[t][s] = how often agent ``order[t]`` taught agent ``order[s]``."""
    index = {peer: i for i, peer in enumerate(order)}
    counts = [[0] * len(order) for _ in order]
    for p in pairs:
        if p.teacher in index and p.student in index:
            counts[index[p.teacher]][index[p.student]] += 1
    return counts


def plot_pair_heatmap(path: Path, pairs: Sequence[PairRecord], order: Sequence[str], labels: Sequence[str]) -> Path:
    """Teacher × student heat-map of directive counts over the whole run."""
    plt = _pyplot()
    counts = pair_matrix(pairs, order)
    n = max(len(order), 1)
    size = min(3 + 0.35 * n, 16)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(counts if order else [[0]], cmap="viridis", interpolation="nearest")
    if n <= 24:
        ax.set_xticks(range(len(order)), labels=list(labels), rotation=90, fontsize=7)
        ax.set_yticks(range(len(order)), labels=list(labels), fontsize=7)
        for t, row in enumerate(counts):
            for s, c in enumerate(row):
                if c:
                    ax.text(s, t, str(c), ha="center", va="center", color="w", fontsize=7)
    ax.set_xlabel("student")
    ax.set_ylabel("teacher")
    ax.set_title("pairs per (teacher, student)")
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_compare(path: Path, curves: Mapping[str, Sequence[Sequence[float | None]]]) -> Path:
    """Mean pass@1 per round for each strategy (mean over seeds, ±1 std band).

    ``curves[strategy]`` is one per-round series per seed.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, series in curves.items():
        length = max((len(s) for s in series), default=0)
        xs, mus, sds = [], [], []
        for i in range(length):
            mu, sd = mean_std(s[i] for s in series if i < len(s))
            if mu is not None:
                xs.append(i + 1)
                mus.append(mu)
                sds.append(sd or 0.0)
        if not xs:
            continue
        ax.plot(xs, mus, marker="o", label=name)
        ax.fill_between(xs, [m - s for m, s in zip(mus, sds)], [m + s for m, s in zip(mus, sds)], alpha=0.15)
    ax.set_xlabel("round")
    ax.set_ylabel("mean pass@1 (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def write_run_outputs(out: Path, doc: Mapping[str, Any], pairs: Sequence[PairRecord], labels: Mapping[str, str]) -> dict[str, Path]:
    """results.json, rounds.csv, rounds.png, pairs_heatmap.png — paths by kind."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    order = list(labels)
    paths = {
        "results": write_json(out / "results.json", doc),
        "rounds_csv": write_rounds_csv(out / "rounds.csv", doc["rounds"]),
        "rounds_plot": plot_rounds(out / "rounds.png", doc["rounds"], title=_title(doc),
                                   final_pass1=doc.get("summary", {}).get("final_pass1")),
        "pairs_plot": plot_pair_heatmap(out / "pairs_heatmap.png", pairs, order, [labels[p] for p in order]),
    }
    log.info("harness.results.written", out=str(out), rounds=len(doc["rounds"]), pairs=len(pairs))
    return paths


def _title(doc: Mapping[str, Any]) -> str:
    cfg = doc.get("config", {})
    return f"{cfg.get('strategy', '?')} · {cfg.get('nodes', '?')} nodes · {cfg.get('agent', '?')} agents"


def load_results(path: Path) -> dict[str, Any]:
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a {SCHEMA} document")
    return doc


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def print_run_summary(console: Any, status: str, message: str, doc: Mapping[str, Any] | None,
                      demo_agent: str | None = None) -> None:
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
                       _fmt(r["mean_raw_reward"]), _fmt(r["cumulative_reward"]), _fmt(r["mean_pass1"]))
    console.print(rounds)
    agents = Table(title="agents")
    for col in ("node", "family", "pass@1 first", "pass@1 final", "taught", "learned", "local rounds",
                "steps trained", "reward as student"):
        agents.add_column(col, justify="left" if col in ("node", "family") else "right")
    for a in doc["agents"]:
        agents.add_row(a["name"], a["family"], _fmt(a["pass1_initial"]), _fmt(a["pass1_final"]), str(a["taught"]),
                       str(a["learned"]), str(a.get("local_rounds", 0)), str(a.get("steps_trained", 0)),
                       _fmt(a["reward_sum"]))
    console.print(agents)
    s = doc["summary"]
    console.print(f"mean pass@1 {_fmt(s['initial_pass1'])} → {_fmt(s['final_pass1'])} (gain {_fmt(s['gain'])}), "
                  f"cumulative raw reward {_fmt(s['cumulative_reward'])}, {s['pairs']} pairs")
    if demo_agent is not None:
        console.print(f"agents used: [bold]{'ML (tiny LMs)' if demo_agent == 'ml' else 'synthetic'}[/bold]")
    out = Path(doc["config"]["out"])
    console.print(f"results: {out / 'results.json'}, {out / 'rounds.csv'}; plots: {out / 'rounds.png'}, "
                  f"{out / 'pairs_heatmap.png'}; logs: {out / 'logs'}", soft_wrap=True)
