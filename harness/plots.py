"""PNG plots of harness runs, comparisons and the federation benchmark.

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
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

DPI = 100


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)
    return Path(path)


def _rows(rows: Sequence[Any]) -> list[dict[str, Any]]:
    return [asdict(r) if is_dataclass(r) else dict(r) for r in rows]


def _integer_rounds(ax: Any, last: int) -> None:
    """Integer ticks 0 … last with half a round of room on each side (markers at the
    ends are never cut off)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(-0.5, max(last, 1) + 0.5)


def text_colour(rgba: Sequence[float]) -> str:
    """Black or white, whichever reads better on a cell of colour ``rgba`` (WCAG
    relative luminance of the sRGB colour; black above 0.179, the contrast crossover)."""

    def lin(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (lin(float(c)) for c in rgba[:3])
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.179 else "white"


# -- one run -------------------------------------------------------------------------------


def rounds_figure(rows: Sequence[Any], title: str = "", final_pass1: float | None = None,
                  initial_pass1: float | None = None) -> Any:
    """Two panels over *rounds completed* r = 0 … R.

    Left: mean pass@1 after r rounds — r < R from the profiles agents sent for round
    r + 1 (measured before that round's exchange; ``initial_pass1`` overrides r = 0),
    r = R the final evaluation (``final_pass1``, a star). Right: cumulative raw reward,
    starting at (0, 0); its axis always includes 0, since raw rewards can be negative.
    """
    plt = _pyplot()
    data = _rows(rows)
    n = max((d["round"] for d in data), default=0)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    pts = [(d["round"] - 1, d["mean_pass1"]) for d in data if d.get("mean_pass1") is not None]
    if initial_pass1 is not None:
        pts = [(0, initial_pass1)] + [p for p in pts if p[0] != 0]
    if pts:
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label="profiles (before each exchange)")
    if final_pass1 is not None and n:
        if pts:
            ax1.plot([pts[-1][0], n], [pts[-1][1], final_pass1], linestyle=":", color="tab:green")
        ax1.plot([n], [final_pass1], marker="*", markersize=14, linestyle="none", color="tab:green",
                 label=f"final evaluation {final_pass1:.3f}")
    if pts or final_pass1 is not None:
        ax1.legend(loc="lower right", fontsize=8)
    ax1.set_ylabel("mean pass@1")
    ax1.set_title("mean pass@1 after r rounds", fontsize=10)
    top = max([p[1] for p in pts] + ([final_pass1] if final_pass1 is not None else []), default=0.0)
    ax1.set_ylim(0, top * 1.15 or 1.0)  # room above the highest point: the star is never cut
    cumulative = [0.0] + [float(d["cumulative_reward"]) for d in data]
    ax2.plot(range(len(cumulative)), cumulative, marker="o", color="tab:orange")
    ax2.axhline(0.0, color="grey", linewidth=0.8)
    lo, hi = min(cumulative), max(cumulative)
    pad = 0.05 * (hi - lo or 1.0)
    ax2.set_ylim(min(0.0, lo) - pad, max(0.0, hi) + pad)  # 0 always on the axis, with its line
    ax2.set_ylabel("cumulative raw reward")
    ax2.set_title("cumulative raw reward (Eq. 3, before z-scoring)", fontsize=10)
    for ax in (ax1, ax2):
        _integer_rounds(ax, n)
        ax.set_xlabel("rounds completed")
        ax.grid(alpha=0.3)
    fig.suptitle(title or "run")
    fig.tight_layout()
    return fig


def plot_rounds(path: Path, rows: Sequence[Any], title: str = "", final_pass1: float | None = None,
                initial_pass1: float | None = None) -> Path:
    return _save(rounds_figure(rows, title, final_pass1, initial_pass1), path)


def pair_heatmap_figure(counts: Sequence[Sequence[int]], labels: Sequence[str], title: str = "") -> Any:
    """Teacher × student directive counts; each count in black or white by its cell's
    luminance; the colour bar has integer ticks (counts are integers)."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    n = max(len(labels), 1)
    size = min(3 + 0.35 * n, 16)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(counts if labels else [[0]], cmap="viridis", interpolation="nearest", vmin=0)
    if n <= 24:
        ax.set_xticks(range(len(labels)), labels=list(labels), rotation=90, fontsize=7)
        ax.set_yticks(range(len(labels)), labels=list(labels), fontsize=7)
        for t, row in enumerate(counts):
            for s, c in enumerate(row):
                if c:
                    ax.text(s, t, str(c), ha="center", va="center", fontsize=8,
                            color=text_colour(im.cmap(im.norm(c))))
    ax.set_xlabel("student")
    ax.set_ylabel("teacher")
    ax.set_title(title or "pairs per (teacher, student)")
    bar = fig.colorbar(im, ax=ax, shrink=0.8)
    bar.locator = MaxNLocator(integer=True)
    bar.update_ticks()
    fig.tight_layout()
    return fig


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
