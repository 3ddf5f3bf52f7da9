"""``knexa-cpm report --out DIR``: the harness's pictures of a run, from the CPM's own
database, so the operator of a real federation gets them too.

Why here: everything the plots show is what the CPM recorded — each agent's profile per
round (its *self-reported* pass@1, profile index ``perf.pass@1``: the CPM never
evaluates a model), the directives (pairs) and their feedback (losses, KB, the raw and
z-scored reward). The harness builds its ``results.json`` from the same rows with the
same functions (``harness.results`` imports them from here), so a harness run's
``rounds.png`` and this command's agree number for number. Reads go through the
``Store`` interface only (``list_profiles``, ``list_directives``, ``list_feedback``,
``list_rounds``, ``list_agents``), so SQLite and PostgreSQL homes work alike, read-only
(a running node keeps committing meanwhile).

Definitions (docs/harness.md quotes them): ``mean_pass1`` of a round — mean over agents
of pass@1 in the profile each submitted *for that round* (measured before that round's
exchange); ``cumulative_reward`` sums **raw** rewards (Eq. 3 before z-scoring, which is
relative to a run's own history) — in ``report.json`` only for closed rounds (null while
a round still waits for feedback); ``bytes`` — Feedback ``kb`` × 1024, summed over the
round's pairs with feedback.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog

from cpm.store import Store, StoreNotFound, home_store_location, open_home_store
from protocol.errors import ConfigError
from protocol.profile import PASS1

log = structlog.get_logger(__name__)

SCHEMA = "knexa-cpm/report/1"
SELF_REPORTED_LABEL = "self-reported in profiles (before each exchange)"
SELF_REPORTED_AXIS = "mean self-reported pass@1"


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
    bytes: int = 0  # wire bytes students received this round (Feedback kb × 1024)


def finite(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_or_none(values: Iterable[float | None]) -> float | None:
    vals = finite(values)
    return sum(vals) / len(vals) if vals else None


def build_round_rows(
    pairs: Sequence[PairRecord], pass1_by_round: Mapping[int, Mapping[str, float]], rounds: Sequence[int]
) -> list[RoundRow]:
    """Per-round aggregate rows, in round order, with a running raw-reward sum."""
    rows: list[RoundRow] = []
    cumulative = 0.0
    for rnd in sorted(set(rounds)):
        mine = [p for p in pairs if p.round == rnd]
        done = [p for p in mine if p.ok is not None]
        raw = finite(p.raw_reward for p in done)
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
                bytes=round(sum(finite(p.kb for p in done)) * 1024),
            )
        )
    return rows


def pair_matrix(pairs: Sequence[PairRecord], order: Sequence[str]) -> list[list[int]]:
    """counts[t][s] = how often agent ``order[t]`` taught agent ``order[s]``."""
    index = {peer: i for i, peer in enumerate(order)}
    counts = [[0] * len(order) for _ in order]
    for p in pairs:
        if p.teacher in index and p.student in index:
            counts[index[p.teacher]][index[p.student]] += 1
    return counts


def collect_from_store(store: Store) -> dict[str, Any]:
    """Directives + feedback → PairRecords; profiles → self-reported pass@1 per round."""
    feedback = {f.directive_id: f for f in store.list_feedback()}
    pairs = []
    for d in store.list_directives():
        f = feedback.get(d.directive_id)
        pairs.append(PairRecord(
            round=d.round, teacher=d.teacher, student=d.student, arm=d.arm, directive_id=d.directive_id,
            ok=None if f is None else f.ok, raw_reward=None if f is None else f.raw_reward,
            reward=None if f is None else f.reward, kb=None if f is None else f.kb,
        ))
    pass1: dict[int, dict[str, float]] = {}
    for prof in store.list_profiles():
        vec = prof["vector"]
        if len(vec) > PASS1:
            pass1.setdefault(int(prof["round"]), {})[prof["peer_id"]] = float(vec[PASS1])
    rounds = store.list_rounds()
    agents = store.list_agents()
    return {
        "pairs": pairs,
        "pass1_by_round": pass1,
        "rounds": [r.round for r in rounds],
        "states": {r.round: r.state for r in rounds},
        "closed": sum(1 for r in rounds if r.state == "closed"),
        "families": {a.peer_id: a.family for a in agents if a.family},
        "orgs": {a.peer_id: a.org for a in agents},
    }


def agent_labels(orgs: Mapping[str, str], pairs: Sequence[PairRecord]) -> dict[str, str]:
    """Heat-map labels of the agents that were ever paired, ordered by (org, peer ID):
    the org where it names one agent, else the org (or ``peer``) with the peer ID's
    last 4 characters — the tail ``knexa-cpm pairs`` shows."""
    peers = sorted({p.teacher for p in pairs} | {p.student for p in pairs}, key=lambda x: (orgs.get(x, ""), x))
    per_org: dict[str, int] = {}
    for peer in peers:
        per_org[orgs.get(peer, "")] = per_org.get(orgs.get(peer, ""), 0) + 1
    return {peer: (org if org and per_org[org] == 1 else f"{org or 'peer'} …{peer[-4:]}")
            for peer in peers for org in [orgs.get(peer, "")]}


def report_document(data: Mapping[str, Any], location: str, quarantine: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``report.json``: exactly the numbers the two plots draw, and where they came from."""
    rows = build_round_rows(data["pairs"], data["pass1_by_round"], data["rounds"])
    labels = agent_labels(data["orgs"], data["pairs"])
    order = list(labels)
    return {
        "schema": SCHEMA,
        "store": location,
        "rounds_completed": data["closed"],
        "pass1": "self-reported: perf.pass@1 of each agent's profile for the round, before its exchange",
        # a round's rewards add up once it is closed: the open round's feedback is listed,
        # its cumulative reward is null (and not drawn) until the CPM closes it
        "rounds": [{**asdict(r), "state": data["states"].get(r.round, ""),
                    **({} if data["states"].get(r.round) == "closed" else {"cumulative_reward": None})}
                   for r in rows],
        "pairs": {"peers": order, "labels": [labels[p] for p in order],
                  "counts": pair_matrix(data["pairs"], order)},
        "quarantine": [dict(q) for q in quarantine],
    }


def open_report_store(home: Path) -> tuple[Store, str]:
    """The home's store, read-only, and its location; a home without a database is a
    configuration error (exit 3) that says what to do, not a bare path."""
    location = home_store_location(home)
    try:
        return open_home_store(home, readonly=True), location
    except StoreNotFound:
        raise ConfigError("store", f"no CPM database at {location} — is {home} a CPM home "
                                   f"(`knexa-cpm init --home {home}`)?") from None


def write_report(store: Store, out: Path, *, location: str, title: str = "") -> dict[str, Path]:
    """report.json, rounds.png, pairs_heatmap.png under ``out`` — paths by kind."""
    from cpm import plots
    from cpm.admin import quarantine_rows
    from p2p.files import atomic_write

    doc = report_document(collect_from_store(store), location, quarantine_rows(store))
    out.mkdir(parents=True, exist_ok=True)
    done = doc["rounds_completed"]
    heading = title or f"CPM report · {done} round{'' if done == 1 else 's'} completed"
    paths = {
        "report": out / "report.json",
        "rounds_plot": plots.plot_rounds(out / "rounds.png", doc["rounds"], heading, pass1_label=SELF_REPORTED_LABEL,
                                         pass1_axis=SELF_REPORTED_AXIS),
        "pairs_plot": plots.plot_pair_heatmap(out / "pairs_heatmap.png", doc["pairs"]["counts"],
                                              doc["pairs"]["labels"], f"{heading}: pairs per (teacher, student)"),
    }
    atomic_write(paths["report"], json.dumps(doc, indent=2, allow_nan=False), mode=0o644, durable=False)
    log.info("cpm.report.written", out=str(out), rounds=len(doc["rounds"]), agents=len(doc["pairs"]["peers"]))
    return paths
