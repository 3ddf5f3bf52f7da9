"""First-run work made visible: the tiny base models a run needs are built here, with a
progress bar, before any daemon starts.

Why in the harness: each daemon would otherwise build (or wait for) the base inside its
own start-up, and the harness could only show "waiting for ready" for the minute or two
that takes. The build is the daemons' own code (``zoo.ensure_tiny_base``, cached and
locked across processes), so the daemons then load it from the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

# measured on the 2-core reference machine (docs/agent.md): ~0.2 s per pre-training step
SECONDS_PER_STEP = 0.2


def missing_bases(models: Sequence[str]) -> list[str]:
    """The tiny families among ``models`` whose base is not in the cache yet (imports torch)."""
    from knexad.agent import zoo

    return [m for m in dict.fromkeys(models)
            if m in zoo.TINY_RECIPES and not (zoo.tiny_base_path(m) / "config.json").exists()]


def build_missing_bases(models: Sequence[str], say: Callable[[str], None], console: Any, show: bool) -> list[str]:
    """Build every missing base, one after the other (each uses the whole CPU budget of a
    tiny model); returns the families built."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from knexad.agent import zoo

    todo = missing_bases(models)
    for family in todo:
        steps = zoo.TINY_RECIPES[family].pretrain_steps
        minutes = max(1, round(steps * SECONDS_PER_STEP / 60))
        say(f"building {family} base, one time, ~{minutes} min (cached in {zoo.tiny_base_path(family).parent})")
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, disable=not show, transient=True) as progress:
            task = progress.add_task(f"{family} pre-training", total=steps)
            zoo.ensure_tiny_base(family, progress=lambda done, _total: progress.update(task, completed=done))
    return todo
