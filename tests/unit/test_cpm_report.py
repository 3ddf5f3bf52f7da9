"""cpm.report's pieces that a one-federation e2e run does not reach: heat-map labels of
agents sharing an org, and the quarantined teachers listed in ``report.json``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cpm.report import PairRecord, agent_labels, write_report
from tests.unit.test_poison_quarantine import _play
from tests.unit.test_rounds import World


def test_labels_name_an_org_once_and_tell_same_org_agents_apart() -> None:
    a, b, c, d = ("12D3KooWaaaa1111", "12D3KooWbbbb2222", "12D3KooWcccc3333", "12D3KooWdddd4444")
    orgs = {a: "acme", b: "acme", c: "solo", d: ""}
    pairs = [PairRecord(1, a, b), PairRecord(1, c, d), PairRecord(2, b, a)]
    assert agent_labels(orgs, pairs) == {d: "peer …4444", a: "acme …1111", b: "acme …2222", c: "solo"}
    assert list(agent_labels(orgs, pairs)) == [d, a, b, c]  # ordered by (org, peer ID)
    assert agent_labels(orgs, [PairRecord(1, a, c)]) == {a: "acme", c: "solo"}  # only agents ever paired


def test_report_lists_the_quarantined_teacher(tmp_path: Path) -> None:
    w = World(tmp_path, 2)
    bad = w.agents[0]
    _play(w, bad, until=lambda d: w.engine.reputation.is_quarantined(bad))
    paths = write_report(w.store, tmp_path / "out", location="test")
    doc = json.loads(paths["report"].read_text())
    assert [q["teacher"] for q in doc["quarantine"]] == [bad]
    assert doc["quarantine"][0]["reason"] and doc["quarantine"][0]["org"] == "org0"
    w.store.close()


def test_self_reported_pass1_is_the_profiles_pass1_slot_not_a_neighbour() -> None:
    """The CPM's per-round pass@1 comes from each profile's ``perf.pass@1``. A run once
    showed every initial value equal to ``perf.pass@1_own`` (slot 9, not 8: mean 0.391
    instead of 0.126, so a "gain" of −0.252 against the final evaluation); real synthetic
    profiles, where the two slots differ, pin the slot."""
    from types import SimpleNamespace as NS

    from cpm.report import collect_from_store
    from knexad.agents import SYNTHETIC_ALPHA
    from knexad.synthetic import make_population

    agents = make_population(3, alpha=SYNTHETIC_ALPHA, seed=0)
    profiles = [{"peer_id": f"p{i}", "round": 1, "vector": list(a.profile())} for i, a in enumerate(agents)]

    class Store:
        def list_feedback(self):
            return []

        def list_directives(self):
            return []

        def list_profiles(self):
            return profiles

        def list_rounds(self):
            return [NS(round=1, state="closed")]

        def list_agents(self):
            return []

    got = collect_from_store(Store())["pass1_by_round"][1]
    want = {f"p{i}": a.evaluate()["pass@1"] for i, a in enumerate(agents)}
    assert got == pytest.approx(want)
    assert all(abs(p["vector"][9] - want[p["peer_id"]]) > 0.05 for p in profiles)  # the neighbour differs
