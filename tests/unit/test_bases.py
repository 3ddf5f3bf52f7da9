"""The harness builds missing tiny bases before any daemon starts, with progress; a
daemon's own first build logs what it does (agent.zoo.base_building / base_progress)."""

from __future__ import annotations

import dataclasses

import pytest
from structlog.testing import capture_logs

pytest.importorskip("torch", reason="tiny bases need the [ml] extra")

from harness.bases import build_missing_bases, missing_bases  # noqa: E402
from knexad.agent import zoo  # noqa: E402


def test_a_missing_base_is_built_once_with_progress(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KNEXA_CACHE", str(tmp_path))
    recipe = dataclasses.replace(zoo.TINY_RECIPES["tiny-gpt2"], pretrain_steps=10, pretrain_batch=2)
    monkeypatch.setitem(zoo.TINY_RECIPES, "tiny-gpt2", recipe)
    said: list[str] = []

    assert missing_bases(["tiny-gpt2", "tiny-gpt2", "synthetic"]) == ["tiny-gpt2"]
    with capture_logs() as logs:
        built = build_missing_bases(["tiny-gpt2"], said.append, console=None, show=False)
    assert built == ["tiny-gpt2"]
    assert said and said[0].startswith("building tiny-gpt2 base, one time")
    events = [e["event"] for e in logs]
    assert events.count("agent.zoo.base_building") == 1
    steps = [e["step"] for e in logs if e["event"] == "agent.zoo.base_progress"]
    assert steps == list(range(1, 11))  # a tenth of 10 steps is every step
    assert (zoo.tiny_base_path("tiny-gpt2") / "config.json").exists()
    # cached: nothing to build the second time
    assert missing_bases(["tiny-gpt2"]) == []
    assert build_missing_bases(["tiny-gpt2"], said.append, console=None, show=False) == []
    assert len(said) == 1
