"""harness.plots: what a reader of the PNGs sees (issue 16 §4) — nothing cut off, 0 on the
reward axis, readable heat-map labels, and the compare plot's numbers are the table's."""

from __future__ import annotations

import pytest

from harness import plots as P
from harness.compare import aggregate, plot_compare

pytest.importorskip("matplotlib")


def _rows(rewards: list[float]) -> list[dict]:
    total, rows = 0.0, []
    for i, r in enumerate(rewards, start=1):
        total += r
        rows.append({"round": i, "mean_pass1": 0.1 * i, "cumulative_reward": total})
    return rows


def test_text_colour_follows_cell_luminance() -> None:
    assert P.text_colour((0.993, 0.906, 0.144, 1.0)) == "black"  # viridis' yellow end
    assert P.text_colour((0.267, 0.005, 0.329, 1.0)) == "white"  # viridis' purple end
    assert P.text_colour((1.0, 1.0, 1.0)) == "black" and P.text_colour((0.0, 0.0, 0.0)) == "white"


def test_heatmap_labels_are_dark_on_the_bright_cells() -> None:
    fig = P.pair_heatmap_figure([[0, 3], [1, 0]], ["a", "b"])
    colours = {t.get_text(): t.get_color() for t in fig.axes[0].texts}
    assert colours == {"3": "black", "1": "white"}  # the max is yellow, 1 of 3 is dark blue


def test_rounds_plot_keeps_the_final_star_and_zero_in_view() -> None:
    fig = P.rounds_figure(_rows([0.5, 0.25, 0.25]), "t", final_pass1=0.45, initial_pass1=0.1)
    left, right = fig.axes
    lo, hi = left.get_xlim()
    assert lo < 0 and hi > 3  # points at 0 and at R = 3 (the star) have room
    assert left.get_ylim()[1] > 0.45
    assert right.get_ylim()[0] <= 0.0  # cumulative reward axis shows 0 …
    neg = P.rounds_figure(_rows([-0.5, -0.25]), "t", final_pass1=None)
    assert neg.axes[1].get_ylim()[1] >= 0.0  # … also when every reward is negative
    assert all(float(t).is_integer() for t in left.get_xticks() if lo <= t <= hi)


def test_compare_plot_draws_the_table_numbers(tmp_path) -> None:
    runs = [
        {"strategy": s, "seed": sd, "status": "ok", "summary": {"final_pass1": f, "cumulative_reward": 0.0,
                                                               "gain": 0.0, "pairs": 2},
         "curve": [0.1, 0.2, f]}
        for s, sd, f in (("linucb", 1, 0.30), ("linucb", 2, 0.36), ("random", 1, 0.25), ("random", 2, 0.27))
    ]
    table = aggregate(runs, ["linucb", "random"])
    for row in table:
        assert row["curve_mean"][-1] == row["final_pass1_mean"]  # the plot's last point is the table's value
    doc = {"config": {"nodes": 3, "agent": "synthetic", "rounds": 2, "seeds": [1, 2]}, "table": table}
    path = plot_compare(tmp_path / "compare.png", doc)
    assert path.read_bytes()[:4] == b"\x89PNG"
    fig = P.curves_figure([{"strategy": r["strategy"], "x": [0, 1, 2], "mean": r["curve_mean"], "lo": r["curve_lo"],
                            "hi": r["curve_hi"], "n": r["ok"]} for r in table], "title", "band")
    assert fig._suptitle.get_text().startswith("title")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["linucb (n=2) · after 2: 0.330", "random (n=2) · after 2: 0.260"]
    assert fig.axes[0].get_shared_y_axes().joined(fig.axes[0], fig.axes[1])
