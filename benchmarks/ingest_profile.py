"""Where the CPM's CPU goes while it ingests profiles: ``benchmarks.ingest`` under a sampling profiler.

    pip install pyinstrument      # not a project dependency: only this tool needs it
    python -m benchmarks.ingest_profile [--profiles 3000] [--modes group_pipelined] [--out DIR]

Why a separate entry point: ``benchmarks.ingest`` runs the CPM in its own process (the
client agents are a subprocess), so sampling that process while the clients drive it
shows the node's request path and nothing else. The profiler runs only from "go" to the
driver's exit — the same window as the benchmark's CPU figure — and writes, per mode,
``ingest_<mode>.txt`` (call tree, inclusive wall time per frame) and
``ingest_<mode>_flat.txt`` (self time per function), then prints the usual result.

Caveats: pyinstrument samples wall time on the main (trio) thread; the group-commit
COMMIT runs on a worker thread and is not in the tree. On a loaded machine a frame's
wall time includes time the process waited for a core, so compare shares within one
tree, and CPU per profile (``cpm_cpu_us_per_profile``) between runs. docs/performance.md
("Ingest profile") has the figures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks import ingest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profiles", type=int, default=3000)
    ap.add_argument("--modes", default="group_pipelined", help="comma-separated benchmarks.ingest modes")
    ap.add_argument("--interval-ms", type=float, default=1.0, help="sampling interval")
    ap.add_argument("--out", type=Path, default=Path("."), help="folder for the profile text files")
    args = ap.parse_args(argv)
    try:
        from pyinstrument import Profiler
        from pyinstrument.renderers import ConsoleRenderer
    except ImportError:
        ap.error("needs pyinstrument (pip install pyinstrument)")
    args.out.mkdir(parents=True, exist_ok=True)
    drive = ingest._drive_against

    async def profiled(server: Any, mode: str, *rest: Any, **kw: Any) -> Any:
        profiler = Profiler(interval=args.interval_ms / 1000, async_mode="disabled")
        profiler.start()
        try:
            return await drive(server, mode, *rest, **kw)
        finally:
            profiler.stop()
            (args.out / f"ingest_{mode}.txt").write_text(profiler.output_text(unicode=False))
            flat = profiler.output(ConsoleRenderer(unicode=False, flat=True, show_all=True))
            (args.out / f"ingest_{mode}_flat.txt").write_text(flat)

    ingest._drive_against = profiled  # this process only: the benchmark itself is unchanged
    out = ingest.run(profiles=args.profiles, modes=tuple(args.modes.split(",")))
    print(json.dumps({m: {k: out[m][k] for k in ("profiles_per_s", "cpm_cpu_us_per_profile")}
                      for m in out["results"]} | {"load_avg": out["load_avg"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
