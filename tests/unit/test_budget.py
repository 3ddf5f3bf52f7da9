"""Training budgets: one name travels harness → config.toml → daemon → MLAgent steps.

What users rely on: ``--budget`` reaches every daemon's ``[agent] budget``, an unknown
name is a config error naming the key, the names and step counts agree everywhere they
are written (config validation, the ML agent, the CLI help), and thread settings for
ML children do not oversubscribe the cores."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from knexad.config import AGENT_BUDGETS, AGENT_REWARD_MEASURES, DaemonConfig, from_mapping, load_config, write_config
from protocol.errors import ConfigError

CPM = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"


def test_budget_defaults_validates_and_rejects_unknown() -> None:
    assert from_mapping({"cpm": CPM}).agent.budget == "standard"
    assert from_mapping({"cpm": CPM, "agent": {"budget": "fast"}}).agent.budget == "fast"
    with pytest.raises(ConfigError) as err:
        from_mapping({"cpm": CPM, "agent": {"budget": "turbo"}})
    assert err.value.key == "agent.budget"
    assert from_mapping({"cpm": CPM}).agent.reward_measure == "val_pass"
    with pytest.raises(ConfigError) as err:
        from_mapping({"cpm": CPM, "agent": {"reward_measure": "vibes"}})
    assert err.value.key == "agent.reward_measure"


def test_env_override_reaches_the_budget(tmp_path) -> None:
    write_config(tmp_path, DaemonConfig(cpm=CPM))
    assert load_config(tmp_path, env={"KNEXA_AGENT_BUDGET": "thorough"}).agent.budget == "thorough"


def test_ml_agent_budgets_match_config_names_and_cli_help() -> None:
    pytest.importorskip("torch")
    from harness import cli
    from knexad.agent.ml_agent import BUDGETS, StepsConfig, steps_for_budget

    assert tuple(BUDGETS) == AGENT_BUDGETS == tuple(cli.BUDGETS)
    from knexad.agent.ml_agent import REWARD_MEASURES

    assert REWARD_MEASURES == AGENT_REWARD_MEASURES
    assert steps_for_budget("standard") == StepsConfig()
    assert steps_for_budget("fast").local < StepsConfig().local < steps_for_budget("thorough").local
    with pytest.raises(ValueError):
        steps_for_budget("turbo")
    # the help text states each budget's steps: it must say what the code does
    for name, local, kd in re.findall(r"(\w+) = (\d+)(?: local LoRA)? / (\d+)", cli._BUDGET_HELP):
        assert (BUDGETS[name].local, BUDGETS[name].kd) == (int(local), int(kd))
    assert len(re.findall(r"(\w+) = (\d+)", cli._BUDGET_HELP)) == len(BUDGETS)
    # … and so must the config key's description (docs/configuration.md is generated from it)
    import knexad.config

    source = Path(knexad.config.__file__).read_text(encoding="utf-8")
    for name, steps in BUDGETS.items():
        assert f"{name} {steps.local}/{steps.kd}" in source


def test_build_agent_uses_the_budget_steps() -> None:
    pytest.importorskip("torch")
    from knexad.agent.ml_agent import BUDGETS
    from knexad.agents import build_agent
    from knexad.config import AgentSection

    for name in AGENT_BUDGETS:
        agent = build_agent(DaemonConfig(cpm=CPM, agent=AgentSection(model="tiny-gpt2", n_agents=2, budget=name)))
        assert agent.steps == BUDGETS[name]  # the model itself is built lazily: cheap
    for measure in AGENT_REWARD_MEASURES:
        agent = build_agent(DaemonConfig(cpm=CPM, agent=AgentSection(model="tiny-gpt2", n_agents=2,
                                                                     reward_measure=measure)))
        assert agent.reward_measure == measure


def test_set_budget_rewrites_the_node_config(tmp_path) -> None:
    from harness.federation import set_budget

    write_config(tmp_path, DaemonConfig(cpm=CPM, org="org-00"))
    set_budget(tmp_path, "fast")
    data = tomllib.loads((tmp_path / "config.toml").read_text())
    assert data["agent"]["budget"] == "fast" and data["org"] == "org-00"
    with pytest.raises(ConfigError):
        set_budget(tmp_path, "turbo")
    assert load_config(tmp_path, env={}).agent.budget == "fast"  # a refused name leaves the file as it was


def test_child_env_splits_cores_only_for_real_models(tmp_path, monkeypatch) -> None:
    from harness.federation import UpConfig

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    real = str(tmp_path)  # any directory is a model spec for the harness
    assert UpConfig(nodes=4, rounds=1, out=tmp_path, agent="ml").child_env() == {}  # tiny: they pin 1 thread
    six = UpConfig(nodes=6, rounds=1, out=tmp_path, agent="ml", models=(real,))
    assert six.child_env() == {"OMP_NUM_THREADS": "2"}
    assert UpConfig(nodes=64, rounds=1, out=tmp_path, agent="ml", models=(real,)).child_env() == {"OMP_NUM_THREADS": "1"}
    assert UpConfig(nodes=8, rounds=1, out=tmp_path, agent="ml", models=(real,), per_process=4).child_env() == {
        "OMP_NUM_THREADS": "8"}
    assert UpConfig(nodes=4, rounds=1, out=tmp_path, agent="synthetic").child_env() == {}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert UpConfig(nodes=6, rounds=1, out=tmp_path, agent="ml", models=(real,)).child_env() == {}


def test_ml_runs_give_daemons_longer_to_stop(tmp_path) -> None:
    from harness.federation import UpConfig

    assert UpConfig(nodes=2, rounds=1, out=tmp_path).effective_grace() == 10.0
    ml = UpConfig(nodes=2, rounds=1, out=tmp_path, agent="ml")
    assert ml.effective_grace() == 30.0 and ml.to_json()["grace_s"] == 30.0
    assert UpConfig(nodes=2, rounds=1, out=tmp_path, agent="ml", grace_s=5.0).effective_grace() == 5.0
