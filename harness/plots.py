"""PNG plots of harness runs, comparisons and the federation benchmark (the one-run
figures, ``rounds_figure`` and ``pair_heatmap_figure``, are ``cpm.plots``').

Every function draws numbers it is given — rows a run measured, or the aggregate a
table prints — and never computes a statistic of its own, so a plot cannot disagree
with the table next to it (``compare.png`` once did: it plotted pre-exchange profile
values while the table printed the final evaluation). Each ``*_figure`` function returns
the matplotlib figure so tests can check what a reader sees (axis limits, colours);
``plot_*`` saves it.

Readability rules a new user asked for (issue 16 §4): every figure titled; round axes
with integer ticks, and the x axis is *rounds completed* (0 = before the first
exchange, R = the final evaluation after the last round) with room at both ends; a
reward axis always shows 0; heat-map labels in black or white by the cell's luminance;
one panel per strategy (small multiples, shared y) so confidence bands never hide each
other, with the other strategies' means drawn faintly for reference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# The one-run figures are the CPM's (``knexa-cpm report`` draws the same from its own
# database); re-exported so a harness reader finds every figure here.
from cpm.plots import (  # noqa: F401 — re-exported
    integer_rounds as _integer_rounds,
    pair_heatmap_figure,
    plot_pair_heatmap,
    plot_rounds,
    pyplot as _pyplot,
    rounds_figure,
    save as _save,
    text_colour,
)


# -- several strategies --------------------------------------------------------------------


def curves_figure(curves: Sequence[Mapping[str, Any]], title: str, band: str,
                  ylabel: str = "mean pass@1", baseline: float | None = None) -> Any:
    """Small multiples: one panel per strategy, shared axes.

    ``curves``: per strategy ``{"strategy", "x", "mean", "lo", "hi"}`` (lists of equal
    length; ``lo``/``hi`` None where there is no band, e.g. one seed; optional
    ``colour``, an index, so a strategy keeps its colour across figures). The panel's
    strategy is drawn in colour with its band; the others' means in light grey, so each
    panel reads alone and against the rest. The last mean is in the panel's title with
    3 decimals — the same rounding as the tables.
    """
    plt = _pyplot()
    n = max(len(curves), 1)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols + 0.6, 2.9 * rows + 0.9), sharex=True, sharey=True,
                             squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    last = max((max(c["x"]) for c in curves if c["x"]), default=1)
    for i, ax in enumerate(axes.flat):
        if i >= len(curves):
            ax.set_visible(False)
            continue
        cur = curves[i]
        for j, other in enumerate(curves):
            if j != i and other["x"]:
                ax.plot(other["x"], other["mean"], color="0.75", linewidth=1, zorder=1)
        colour = colours[int(cur.get("colour", i)) % len(colours)]
        xs, mus = cur["x"], cur["mean"]
        if baseline is not None:
            ax.axhline(baseline, color="black", linewidth=0.8, zorder=1)
        band_pts = [(x, lo, hi) for x, lo, hi in zip(xs, cur.get("lo") or [], cur.get("hi") or [])
                    if lo is not None and hi is not None]
        if band_pts:
            ax.fill_between([p[0] for p in band_pts], [p[1] for p in band_pts], [p[2] for p in band_pts],
                            color=colour, alpha=0.25, linewidth=0, zorder=2)
        pts = [(x, m) for x, m in zip(xs, mus) if m is not None]
        head = f"{cur['strategy']} (n={cur.get('n', '?')})"
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=4, color=colour, zorder=3)
            head += f" · after {pts[-1][0]}: {pts[-1][1]:.3f}"
        ax.set_title(head, fontsize=10, color=colour)
        _integer_rounds(ax, last)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("rounds completed")
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    fig.suptitle(f"{title}\n{band}; grey: the other strategies' means", fontsize=10)
    fig.tight_layout()
    return fig


def plot_curves(path: Path, curves: Sequence[Mapping[str, Any]], title: str, band: str,
                ylabel: str = "mean pass@1", baseline: float | None = None) -> Path:
    return _save(curves_figure(curves, title, band, ylabel, baseline), path)


def finals_figure(rows: Sequence[Mapping[str, Any]], title: str, xlabel: str = "final mean pass@1") -> Any:
    """One row per strategy: its per-seed values (small dots) and mean with a
    confidence interval (``{"strategy", "mean", "lo", "hi", "values"}``), the mean
    written with 3 decimals as in the table."""
    plt = _pyplot()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.55 * max(len(rows), 1)))
    for i, row in enumerate(rows):
        y = len(rows) - 1 - i
        colour = colours[int(row.get("colour", i)) % len(colours)]
        vals = [v for v in row.get("values", []) if v is not None]
        if vals:
            ax.plot(vals, [y + 0.18] * len(vals), linestyle="none", marker=".", color=colour, alpha=0.6)
        if row.get("mean") is None:
            continue
        if row.get("lo") is not None and row.get("hi") is not None:
            ax.errorbar([row["mean"]], [y], xerr=[[row["mean"] - row["lo"]], [row["hi"] - row["mean"]]],
                        fmt="o", color=colour, capsize=4)
        else:
            ax.plot([row["mean"]], [y], marker="o", color=colour)
        ax.annotate(f"{row['mean']:.3f}", (row["mean"], y), textcoords="offset points", xytext=(0, -13),
                    ha="center", fontsize=8, color=colour)
    ax.set_yticks(range(len(rows)), labels=[r["strategy"] for r in reversed(rows)])
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3, axis="x")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_finals(path: Path, rows: Sequence[Mapping[str, Any]], title: str, xlabel: str = "final mean pass@1") -> Path:
    return _save(finals_figure(rows, title, xlabel), path)
