"""What every KNEXA binary's process shares: the exit-code table, one instance per home,
``--version``, and a quiet end when stdout is a closed pipe (docs/operations.md).

Stdlib and click only, so ``--help`` and ``status`` stay instant.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import click

from protocol.errors import ConfigError, KnexaError, PeerUnavailable, Unauthorized

LOCK_FILE = "instance.lock"


class ExitCode(enum.IntEnum):
    """The one exit-code table of every binary (README, docs/cli.md)."""

    OK = 0
    RUNTIME = 1  # runtime error (e.g. the listen port is taken, another instance runs)
    USAGE = 2  # bad flag or argument (click's own code)
    CONFIG = 3  # bad or missing config.toml, key, database
    UNREACHABLE = 4  # cannot reach a peer or the CPM
    UNAUTHORIZED = 5  # not admitted / unauthorized


def first_leaf(exc: BaseException) -> BaseException:
    """trio (and py-libp2p's own nurseries) wrap failures in nested exception groups;
    the first real one is what an operator needs to read."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def exit_code_for(exc: BaseException) -> ExitCode:
    """The exit code a typed error maps to."""
    if isinstance(exc, ConfigError):
        return ExitCode.CONFIG
    if isinstance(exc, PeerUnavailable):
        return ExitCode.UNREACHABLE
    if isinstance(exc, Unauthorized):
        return ExitCode.UNAUTHORIZED
    return ExitCode.RUNTIME


class AlreadyRunning(KnexaError):
    """Another process already serves this home (its pid is in the message)."""

    code = "already_running"


class HomeLock:
    """An exclusive ``flock`` on ``HOME/instance.lock``, held for the process lifetime.

    Why flock: the kernel releases it when the process dies, however it dies (kill -9
    included), so a crash never leaves a stale lock for the operator to delete. Two
    ``serve``/``run`` on one home would bind the same port side by side and share one
    database or outbox; the second is refused with the first one's pid.
    """

    def __init__(self, home: Path, what: str) -> None:
        self.path = Path(home) / LOCK_FILE
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> HomeLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise AlreadyRunning(
                    f"another {self.what} already runs on {self.path.parent} (pid {holder}); "
                    f"stop it first, or use another --home"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> HomeLock:
        return self.acquire()

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


def version_option(prog_name: str) -> Callable[[Any], Any]:
    """``--version``: the installed distribution's version (pyproject.toml)."""
    try:
        version = metadata.version("knexa")
    except metadata.PackageNotFoundError:
        version = "unknown (not installed)"
    return click.version_option(version, "--version", prog_name=prog_name, message="%(prog)s %(version)s")


def run_cli(main: Callable[..., Any], prog_name: str) -> None:
    """Run a click group; a reader that closes stdout early (``… | head``) ends the
    command quietly instead of with a BrokenPipeError traceback."""
    try:
        main(prog_name=prog_name)
    except BrokenPipeError:
        # stdout is gone: point it at /dev/null so the interpreter's final flush is silent
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(ExitCode.RUNTIME)
