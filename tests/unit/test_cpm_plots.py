"""cpm.plots as ``knexa-cpm report`` uses it: the pass@1 line says it is self-reported,
and a round that is not closed yet adds no point to the cumulative reward."""

from __future__ import annotations

import pytest

from cpm import plots as P
from cpm.report import SELF_REPORTED_AXIS, SELF_REPORTED_LABEL

pytest.importorskip("matplotlib")


def test_open_round_is_not_drawn_as_done_and_pass1_is_labelled_self_reported() -> None:
    rows = [{"round": 1, "mean_pass1": 0.2, "cumulative_reward": 0.5},
            {"round": 2, "mean_pass1": 0.3, "cumulative_reward": 0.75},
            {"round": 3, "mean_pass1": 0.4, "cumulative_reward": None}]  # matched, no feedback yet
    fig = P.rounds_figure(rows, "t", pass1_label=SELF_REPORTED_LABEL, pass1_axis=SELF_REPORTED_AXIS)
    left, right = fig.axes
    (reward,) = right.get_lines()[:1]
    assert list(reward.get_xdata()) == [0, 1, 2] and list(reward.get_ydata()) == [0.0, 0.5, 0.75]
    (pass1,) = left.get_lines()
    assert list(pass1.get_xdata()) == [0, 1, 2]  # the open round's profiles: "after 2 rounds"
    assert left.get_ylabel() == SELF_REPORTED_AXIS and "self-reported" in left.get_ylabel()
    assert [t.get_text() for t in left.get_legend().get_texts()] == [SELF_REPORTED_LABEL]
    assert right.get_xlim()[1] > 3  # the axis still reaches the open round
