"""Crash-safe file replacement shared by the CPM, the daemon and the harness.

Why one helper: a config, a key-adjacent file, a queued Feedback record or a results
file must never be seen half-written after a crash. The recipe is always the same —
write a temp file in the same directory, fsync it, rename it over the target, fsync the
directory so the rename itself survives power loss — and it is easy to get subtly wrong
(a missing directory fsync, a temp name two writers share), so it lives here once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import structlog

log = structlog.get_logger(__name__)
T = TypeVar("T")

TEMP_SUFFIX = ".tmp"


def temp_path(path: Path) -> Path:
    """The temp file ``atomic_write`` uses for ``path``: hidden, per process, same directory
    (a rename is only atomic within one filesystem)."""
    return path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")


def fsync_dir(directory: Path) -> None:
    """Make a rename/unlink in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path | str, data: bytes | str, *, mode: int = 0o600, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new content, never a mix.

    ``durable=False`` skips both fsyncs: still atomic against a crashed *process*, not
    against power loss — for files that are cheap to recompute (plots, summaries).
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(payload)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.chmod(tmp, mode)  # the umask may have narrowed it; make it exact
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def remove_stale_temps(directory: Path) -> int:
    """Delete temp files a crash left behind (their rename never happened) in a directory
    this program owns. Returns how many."""
    removed = 0
    for tmp in Path(directory).glob(f"*{TEMP_SUFFIX}"):  # also temps of older releases
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def append_json_line(path: Path | str, row: Any) -> None:
    """Append ``row`` as one JSON line and fsync: an append-only local record (a daemon's
    evaluations, its exchanges) that another process may read while it grows. A crash
    can leave only the last line torn, which ``read_json_lines`` skips."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_json_lines(path: Path | str, convert: Callable[[Any], T], event: str) -> list[T]:
    """``convert`` of every line of an ``append_json_line`` file, in file order (empty
    when it does not exist); a line that is not JSON or that ``convert`` refuses
    (ValueError, KeyError, TypeError) is skipped with an ``event`` warning."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    out: list[T] = []
    for number, line in enumerate(lines, 1):
        try:
            out.append(convert(json.loads(line)))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning(event, path=str(path), line=number, error=type(exc).__name__)
    return out
