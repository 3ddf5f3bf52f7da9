"""The contract between the daemon and whatever learns inside it.

The daemon (networking, CPM client, exchange) never imports torch. It talks to an
``Agent`` through this small interface, so that the same daemon runs either the ML
agent (``knexad.agent.ml_agent.MLAgent``: tiny or real HF models with LoRA) or the
``SyntheticAgent`` (``knexad.synthetic``: a cheap numeric learning model used for
network, load and matchmaking tests).

Knowledge crosses the wire as a ``KnowledgePackage`` of text items: teacher
completions on prompts of the shared transfer set. Text, not logits, because the
families differ in tokenizer (design §4); the student re-tokenizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

# The package types are part of the wire protocol; re-exported here for agents.
from protocol.knowledge import KnowledgeItem, KnowledgePackage
# The contract with the CPM (profile layout, categories, arms) lives in protocol.profile.
from protocol.profile import N_CATEGORIES, PROFILE_DIM, ProtocolArm

__all__ = [
    "N_CATEGORIES",
    "PROFILE_DIM",
    "Agent",
    "KnowledgeItem",
    "KnowledgePackage",
    "LearnResult",
    "ProtocolArm",
    "TeachRequest",
]

@dataclass(frozen=True, slots=True)
class TeachRequest:
    """What a teacher needs to produce knowledge: which transfer prompts, which arm."""

    directive_id: str
    round: int
    transfer_ids: tuple[int, ...]
    arm: ProtocolArm
    student_family: str = ""


@dataclass(frozen=True, slots=True)
class LearnResult:
    """Measured by the student on its own validation split (Eq. 3 inputs)."""

    loss_pre: float
    loss_post: float
    items_used: int
    train_seconds: float = 0.0
    steps: int = 0  # optimizer steps this call took (0 where an agent does not count them)


@runtime_checkable
class Agent(Protocol):
    """Everything the daemon asks of an agent. Methods are blocking (run in a thread)."""

    family: str

    def transfer_set_hash(self) -> str:
        """Hex SHA-256 over the shared transfer set this agent was built with."""

    def profile(self) -> list[float]:
        """The 32-d abstract profile (design §4). Never data, never weights."""

    def teach(self, request: TeachRequest) -> KnowledgePackage:
        """Produce outputs on the requested transfer prompts (pre-guardrail)."""

    def learn(self, package: KnowledgePackage, arm: ProtocolArm) -> LearnResult:
        """Distill from a package; return validation loss before/after."""

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics, at least ``pass@1``."""

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path) -> bool:
        """Restore from ``directory``; False when there is nothing to restore."""
