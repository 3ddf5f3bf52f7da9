"""harness.topology.parse_uplinks and the CLI's --uplink-mbit: one organisation's upload
can be capped (``node-01=10``) while the others run free; bad values are usage errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import _uplinks
from harness.cli import main as harness_main
from harness.topology import parse_uplinks, uplink_table

NODES = ["node-00", "node-01", "node-02"]
ORGS = ["org-00", "org-01", "org-02"]


def test_a_plain_number_caps_every_org_and_a_name_caps_one() -> None:
    assert parse_uplinks(["50"], NODES, ORGS) == (50.0, {})
    assert parse_uplinks(["node-01=10"], NODES, ORGS) == (None, {"org-01": 10.0})
    assert parse_uplinks(["org-02=2.5", "node-00=1", "8"], NODES, ORGS) == (8.0, {"org-02": 2.5, "org-00": 1.0})


@pytest.mark.parametrize("value", ["node-07=10", "org-01=0", "fast", "node-01=", "=5", "-3", "inf", "node-01=nan"])
def test_bad_values_are_rejected_with_the_known_names(value: str) -> None:
    with pytest.raises(ValueError, match="--uplink-mbit"):
        parse_uplinks([value], NODES, ORGS)


def test_per_org_caps_win_over_the_cap_for_every_org() -> None:
    assert uplink_table(ORGS, 50.0, {"org-01": 10.0}) == {"org-00": 50.0, "org-01": 10.0, "org-02": 50.0}
    assert uplink_table(ORGS, None, {"org-01": 10.0}) == {"org-01": 10.0}
    assert uplink_table(ORGS, None, None) == {}


def test_cli_maps_the_option_into_the_run_config() -> None:
    assert _uplinks({"uplink_mbit": (), "nodes": 3}) == {}
    assert _uplinks({"uplink_mbit": ("node-01=10",), "nodes": 3}) == {"uplink_mbit": None,
                                                                        "uplink_caps": {"org-01": 10.0}}


def test_an_unknown_node_is_a_usage_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("harness.netlab.netns_available", lambda: (True, ""))
    result = CliRunner().invoke(harness_main, ["up", "--topology", "nat", "--nodes", "2", "--uplink-mbit",
                                               "node-05=10", "--out", "x"])
    assert result.exit_code == 2 and "node-05" in result.output, result.output
    assert not (tmp_path / "x").exists()


def test_nat_mode_reaches_the_testbed_and_needs_the_nat_topology(tmp_path: Path, monkeypatch) -> None:
    """``--nat`` picks the routers' behaviour (docs/networking.md §Hole punching); it is
    carried into the run's config and the testbed, and refused without ``--topology nat``."""
    from harness.cli import _config
    from harness.topology import topology_for

    kw = {"nodes": 2, "rounds": 1, "out": tmp_path / "o", "agent": "synthetic", "models": "tiny-qwen2",
          "keep_homes": False, "on_crash": "continue", "per_process": 1, "round_timer": 30.0, "ready_timeout": None, "timeout": None,
          "grace": None, "no_progress": True, "budget": "fast", "topology": "nat", "uplink_mbit": ()}
    assert _config(**kw).nat == "rfc5382"  # the default: hole punching works
    cfg = _config(**kw, nat="symmetric")
    assert cfg.nat == "symmetric"
    assert topology_for("nat", ["org-00", "org-01"], nat=cfg.nat).testbed.nat == "symmetric"
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(harness_main, ["up", "--nat", "reset", "--nodes", "2", "--out", "x"])
    assert result.exit_code == 2 and "--nat needs --topology nat" in result.output, result.output
    assert not (tmp_path / "x").exists()
