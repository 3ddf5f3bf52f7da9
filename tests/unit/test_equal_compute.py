"""Equal compute: in a round where an agent does not distill (a teacher, unpaired,
LocalOnly, a failed exchange) the daemon trains it for a KD round's steps on private
data, so a student's gain over LocalOnly is knowledge, not extra steps (issue 16)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import trio

from knexad.agent_api import LearnResult
from knexad.config import from_mapping
from knexad.daemon import Daemon
from protocol.envelope import Identity

CPM = f"/ip4/127.0.0.1/tcp/1/p2p/{Identity.generate().peer_id}"


class _Agent:
    """The agent boundary only (no model): counts local rounds and saves."""

    family = "qwen2"

    def __init__(self) -> None:
        self.local_rounds = self.saves = 0

    def local_round(self) -> LearnResult:
        self.local_rounds += 1
        return LearnResult(1.0, 0.9, 0, 0.0, steps=7)

    def save(self, directory: Path) -> None:
        self.saves += 1


def _daemon(tmp_path: Path, **agent: object) -> tuple[Daemon, _Agent]:
    cfg = from_mapping({"cpm": CPM, "agent": dict(agent)})
    fake = _Agent()
    return Daemon(tmp_path, cfg, Identity.generate(), fake, handle_signals=False), fake


def test_an_idle_round_trains_locally_and_counts_its_steps(tmp_path: Path) -> None:
    daemon, agent = _daemon(tmp_path)
    trio.run(daemon._train_if_idle, 3)
    assert agent.local_rounds == 1 and agent.saves == 1
    assert (daemon.state.state.local_rounds, daemon.state.state.steps_trained) == (1, 7)


def test_a_round_with_distillation_trains_nothing_more(tmp_path: Path) -> None:
    daemon, agent = _daemon(tmp_path)
    daemon.student = SimpleNamespace(learned_round=4)
    trio.run(daemon._train_if_idle, 4)
    assert agent.local_rounds == 0
    trio.run(daemon._train_if_idle, 5)  # the next round it did not distill
    assert agent.local_rounds == 1


def test_switched_off_by_config(tmp_path: Path) -> None:
    daemon, agent = _daemon(tmp_path, local_when_idle=False)
    assert dataclasses.asdict(daemon.cfg.agent)["local_when_idle"] is False
    trio.run(daemon._train_if_idle, 0)
    assert agent.local_rounds == 0
