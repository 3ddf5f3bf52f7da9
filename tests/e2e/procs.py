"""Real subprocesses for e2e and fault tests: each in its own process group, stdout and
stderr in files, structlog JSON events readable back. Shared by tests/e2e and
tests/reliability so both drive the binaries the same way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from p2p.logs import log_events

REPO = Path(__file__).resolve().parents[2]
KNEXAD = [sys.executable, "-m", "knexad.cli"]
CPM = [sys.executable, "-m", "cpm.cli"]
# short retries and deadlines so failures show within seconds, not minutes
FAST_ENV = {
    "KNEXA_RETRY_BASE_S": "0.2",
    "KNEXA_RETRY_MAX_S": "1.0",
    "KNEXA_TIMEOUTS_DIAL_S": "4",
    "KNEXA_TIMEOUTS_REQUEST_S": "5",
    "KNEXA_TIMEOUTS_LONG_POLL_S": "5",
    "KNEXA_TIMEOUTS_EXCHANGE_STEP_S": "5",
}


class Proc:
    """A subprocess in its own process group with stdout/stderr in files."""

    def __init__(self, name: str, argv: list[str], logdir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.out = logdir / f"{name}.out"
        self.err = logdir / f"{name}.err"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with self.out.open("ab") as out, self.err.open("ab") as err:
            self.popen = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=err, env=full_env,
                                          start_new_session=True, stdin=subprocess.DEVNULL)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """JSON log lines (structlog) from stderr, optionally only events called ``name``."""
        return log_events(self.err.read_text(errors="replace"), name)

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)

    def kill9(self) -> int:
        self.signal(signal.SIGKILL)
        return self.popen.wait(timeout=30)

    def wait(self, timeout: float = 60) -> int:
        return self.popen.wait(timeout=timeout)
