"""The two pictures of one federation's run — rounds and pairs — drawn from numbers
given to them; shared by ``knexa-cpm report`` (from the CPM's own database) and the
harness (``harness.plots`` adds its multi-run figures on top of these).

They live in ``cpm`` because the CPM is what records every number they show (profiles,
directives, feedback), and ``cpm`` must not import ``harness``; the harness may import
everything, so one implementation of each figure serves both.

Every function draws numbers it is given and never computes a statistic of its own, so
a plot cannot disagree with the table or ``report.json`` next to it. Each ``*_figure``
returns the matplotlib figure so tests can check what a reader sees (axis limits,
colours); ``plot_*`` saves it.

Readability rules (issue 16 §4): every figure titled; round axes with integer ticks,
the x axis is *rounds completed* (0 = before the first exchange) with room at both
ends; a reward axis always shows 0; heat-map labels in black or white by the cell's
luminance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

DPI = 100
PROFILES_LABEL = "profiles (before each exchange)"


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    pyplot().close(fig)
    return Path(path)


def _rows(rows: Sequence[Any]) -> list[dict[str, Any]]:
    return [asdict(r) if is_dataclass(r) else dict(r) for r in rows]


def integer_rounds(ax: Any, last: int) -> None:
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


def rounds_figure(rows: Sequence[Any], title: str = "", final_pass1: float | None = None,
                  initial_pass1: float | None = None, *, pass1_label: str = PROFILES_LABEL,
                  pass1_axis: str = "mean pass@1") -> Any:
    """Two panels over *rounds completed* r = 0 … R.

    Left: mean pass@1 after r rounds — r < R from the profiles agents sent for round
    r + 1 (measured before that round's exchange; ``initial_pass1`` overrides r = 0),
    r = R the final evaluation (``final_pass1``, a star; the CPM has none). The CPM
    only knows what agents report, so its report names the line ``pass1_label`` /
    ``pass1_axis`` as self-reported. Right: cumulative raw reward after round r,
    starting at (0, 0), for the rows that have one; its axis always includes 0, since
    raw rewards can be negative.
    """
    plt = pyplot()
    data = _rows(rows)
    n = max((d["round"] for d in data), default=0)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    pts = [(d["round"] - 1, d["mean_pass1"]) for d in data if d.get("mean_pass1") is not None]
    if initial_pass1 is not None:
        pts = [(0, initial_pass1)] + [p for p in pts if p[0] != 0]
    if pts:
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=pass1_label)
    if final_pass1 is not None and n:
        if pts:
            ax1.plot([pts[-1][0], n], [pts[-1][1], final_pass1], linestyle=":", color="tab:green")
        ax1.plot([n], [final_pass1], marker="*", markersize=14, linestyle="none", color="tab:green",
                 label=f"final evaluation {final_pass1:.3f}")
    if pts or final_pass1 is not None:
        ax1.legend(loc="lower right", fontsize=8)
    ax1.set_ylabel(pass1_axis)
    ax1.set_title(f"{pass1_axis} after r rounds", fontsize=10)
    top = max([p[1] for p in pts] + ([final_pass1] if final_pass1 is not None else []), default=0.0)
    ax1.set_ylim(0, top * 1.15 or 1.0)  # room above the highest point: the star is never cut
    # a row whose cumulative reward is None is a round not closed yet (``knexa-cpm report``
    # of a running federation): not drawn, so the curve never claims a round is done
    done = [(d["round"], float(d["cumulative_reward"])) for d in data if d.get("cumulative_reward") is not None]
    cumulative = [0.0] + [c for _, c in done]
    ax2.plot([0] + [r for r, _ in done], cumulative, marker="o", color="tab:orange")
    ax2.axhline(0.0, color="grey", linewidth=0.8)
    lo, hi = min(cumulative), max(cumulative)
    pad = 0.05 * (hi - lo or 1.0)
    ax2.set_ylim(min(0.0, lo) - pad, max(0.0, hi) + pad)  # 0 always on the axis, with its line
    ax2.set_ylabel("cumulative raw reward")
    ax2.set_title("cumulative raw reward (Eq. 3, before z-scoring)", fontsize=10)
    for ax in (ax1, ax2):
        integer_rounds(ax, n)
        ax.set_xlabel("rounds completed")
        ax.grid(alpha=0.3)
    fig.suptitle(title or "run")
    fig.tight_layout()
    return fig


def plot_rounds(path: Path, rows: Sequence[Any], title: str = "", final_pass1: float | None = None,
                initial_pass1: float | None = None, **labels: str) -> Path:
    return save(rounds_figure(rows, title, final_pass1, initial_pass1, **labels), path)


def pair_heatmap_figure(counts: Sequence[Sequence[int]], labels: Sequence[str], title: str = "") -> Any:
    """Teacher × student directive counts; each count in black or white by its cell's
    luminance; the colour bar has integer ticks (counts are integers)."""
    plt = pyplot()
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


def plot_pair_heatmap(path: Path, counts: Sequence[Sequence[int]], labels: Sequence[str], title: str = "") -> Path:
    return save(pair_heatmap_figure(counts, labels, title), path)
