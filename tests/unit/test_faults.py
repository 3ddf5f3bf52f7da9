"""The test-only matching hold (``cpm.faults``): off by default, one hold per arming.

The failover tests rely on these properties: with the arm file, exactly one matching
holds (the replica that takes over must not hold again); without the variable nothing
holds; a bad value refuses to start instead of silently running without the fault.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from cpm.faults import ENV_HOLD_FILE, ENV_HOLD_S, FaultConfigError, MatchHold


def test_off_unless_the_variable_is_set() -> None:
    assert MatchHold.from_env({}) is None
    assert MatchHold.from_env({ENV_HOLD_S: "0"}) is None
    assert MatchHold.from_env({ENV_HOLD_FILE: "/tmp/x"}) is None


@pytest.mark.parametrize("value", ["soon", "-1", "7200"])
def test_a_bad_value_is_refused(value: str) -> None:
    with pytest.raises(FaultConfigError, match=ENV_HOLD_S):
        MatchHold.from_env({ENV_HOLD_S: value})


def test_an_armed_hold_is_taken_once(tmp_path: Path) -> None:
    arm = tmp_path / "arm"
    slept: list[float] = []
    base = MatchHold.from_env({ENV_HOLD_S: "2.5", ENV_HOLD_FILE: str(arm)})
    assert base is not None
    hold = MatchHold(base.hold_s, base.arm_file, sleep=slept.append)
    assert hold(3) is False and slept == []  # not armed: the matching runs through
    arm.touch()
    with capture_logs() as logs:
        assert hold(4) is True
        assert hold(4) is False  # the arming was consumed: a second matching does not hold
    assert slept == [2.5] and not arm.exists()
    assert [e["event"] for e in logs] == ["cpm.match.holding", "cpm.match.released"]
    assert logs[0]["round"] == 4


def test_without_an_arm_file_every_matching_holds() -> None:
    slept: list[float] = []
    hold = MatchHold(1.0, None, sleep=slept.append)
    assert hold(1) and hold(2) and slept == [1.0, 1.0]
