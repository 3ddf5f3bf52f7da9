"""Find and remove what crashed testbeds left behind.

A testbed's owner can die without running any Python (``kill -9``, OOM killer, a lost
CI runner). Its namespaces then stay mounted under ``/run/netns`` and the processes it
started keep running inside them (their veths and bridge die with the namespaces).
``sweep`` removes exactly those: every namespace named ``<prefix><6 hex>-…`` whose
owner is gone. Owner = the process recorded in the run's marker file
(``/run/knexa-netlab/<tag>.json``, written *before* the first namespace is created:
pid + start time, so a recycled pid does not count as alive). A namespace with no
marker is removed only if it is older than the sweeping process itself, so a testbed
that another process is building right now is never touched.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import structlog

from harness.netlab.system import (
    delete_namespace,
    kill_pids,
    list_namespaces,
    ns_created_at,
    ns_pids,
    process_alive,
    process_start_ticks,
)

log = structlog.get_logger(__name__)

PREFIX = "kx"  # the project's namespace prefix: kx<6 hex>-<role>
MARKER_DIR = Path(os.environ.get("KNEXA_NETLAB_RUN_DIR", "/run/knexa-netlab"))


def tag_pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(rf"^({re.escape(prefix)}[0-9a-f]{{6}})-")


def write_marker(tag: str) -> Path:
    """Record this process as the owner of run ``tag`` (before any namespace exists)."""
    MARKER_DIR.mkdir(parents=True, exist_ok=True)
    path = MARKER_DIR / f"{tag}.json"
    doc = {"tag": tag, "pid": os.getpid(), "start_ticks": process_start_ticks(os.getpid()), "created": time.time()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)
    return path


def remove_marker(tag: str) -> None:
    (MARKER_DIR / f"{tag}.json").unlink(missing_ok=True)


def owner_alive(tag: str) -> bool | None:
    """True/False from the marker; None when there is no (readable) marker."""
    try:
        doc = json.loads((MARKER_DIR / f"{tag}.json").read_text())
        pid, ticks = int(doc["pid"]), doc.get("start_ticks")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return process_alive(pid, None if ticks is None else int(ticks))


def _own_start_epoch() -> float:
    """Wall-clock time this process started (boot time + start ticks)."""
    ticks = process_start_ticks(os.getpid()) or 0
    try:
        with open("/proc/stat") as fh:
            btime = next(int(line.split()[1]) for line in fh if line.startswith("btime "))
    except (OSError, StopIteration, ValueError):
        return time.time()
    return btime + ticks / os.sysconf("SC_CLK_TCK")


def stale_namespaces(prefix: str = PREFIX) -> dict[str, list[str]]:
    """tag → namespaces of runs whose owner is gone (see module docstring)."""
    pattern = tag_pattern(prefix)
    started = _own_start_epoch()
    groups: dict[str, list[str]] = {}
    for ns in list_namespaces():
        m = pattern.match(ns)
        if m:
            groups.setdefault(m.group(1), []).append(ns)
    stale: dict[str, list[str]] = {}
    for tag, names in groups.items():
        alive = owner_alive(tag)
        if alive:
            continue
        if alive is None:  # no marker: only what is older than us can be a leftover
            created = [ns_created_at(ns) for ns in names]
            if any(c is None or c >= started for c in created):
                continue
        stale[tag] = sorted(names)
    return stale


def sweep(prefix: str = PREFIX) -> list[str]:
    """Remove leftovers of crashed runs: kill the processes inside, delete the
    namespaces, drop the markers. Returns the namespaces removed (logged)."""
    removed: list[str] = []
    for tag, names in stale_namespaces(prefix).items():
        for ns in names:  # SIGTERM first everywhere: a process may hold files it should flush
            kill_pids(ns_pids(ns), signal.SIGTERM)
        for ns in names:
            delete_namespace(ns)
            removed.append(ns)
        remove_marker(tag)
        log.warning("netlab.sweep.removed", tag=tag, namespaces=names)
    started = _own_start_epoch()
    for ns in list_namespaces():  # a capability probe (netns_available) killed mid-way
        created = ns_created_at(ns)
        if ns.startswith(f"{prefix}probe") and created is not None and created < started:
            delete_namespace(ns)
            removed.append(ns)
    _sweep_markers(prefix)
    return removed


def _sweep_markers(prefix: str) -> None:
    """Markers of dead owners whose namespaces are already gone."""
    if not MARKER_DIR.is_dir():
        return
    live_tags = {m.group(1) for ns in list_namespaces() if (m := tag_pattern(prefix).match(ns))}
    for path in MARKER_DIR.glob(f"{prefix}*.json"):
        tag = path.stem
        if tag not in live_tags and owner_alive(tag) is False:
            path.unlink(missing_ok=True)
