"""Test-only fault injection: hold the round lease holder inside a matching.

Why: the failover tests and ``benchmarks.failover`` must ``kill -9`` the lease holder
*while it matches a round* — after it took the round for matching (its directive rows
and the ``matched`` state are written in the open write transaction), before that
transaction commits — and check that the replica taking over matches that round
exactly once. A real matching takes milliseconds, so no outside timing can land a
signal inside it; this knob makes the point observable and wide.

Off unless ``KNEXA_FAULT_MATCH_HOLD_S`` is set (> 0) in the environment of
``knexa-cpm serve``; never set it in production (docs/reliability.md, "CPM replica
failover"). When it is set:

* at start the service logs ``cpm.fault.enabled`` (warning) with the settings;
* at the hold point ``RoundEngine._match`` calls ``match_fault(round)``, which logs
  ``cpm.match.holding`` (warning: round, hold_s, pid), then blocks the process for
  ``hold_s`` seconds — the write transaction, and with it the store's write lock, stays
  open — and logs ``cpm.match.released`` if nobody killed it meanwhile;
* with ``KNEXA_FAULT_MATCH_HOLD_FILE=PATH`` it holds only a matching that finds PATH and
  removes it (``os.unlink`` succeeds for exactly one process): a test arms one hold by
  creating the file, whichever replica holds the lease then, and the replica that
  takes over finds no file and matches without holding. Without it every matching holds.

The hold blocks the whole process (the engine is synchronous on the event loop), as a
stuck matching would; that is the intent, not a defect of the knob.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog

log = structlog.get_logger(__name__)

ENV_HOLD_S = "KNEXA_FAULT_MATCH_HOLD_S"
ENV_HOLD_FILE = "KNEXA_FAULT_MATCH_HOLD_FILE"


class FaultConfigError(ValueError):
    """A fault-injection variable is set but not usable (refuse to start rather than
    silently run a test without its fault)."""


@dataclass(frozen=True, slots=True)
class MatchHold:
    hold_s: float
    arm_file: str | None = None
    sleep: Callable[[float], None] = time.sleep

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> MatchHold | None:
        raw = env.get(ENV_HOLD_S, "").strip()
        if not raw:
            return None
        try:
            hold_s = float(raw)
        except ValueError:
            raise FaultConfigError(f"{ENV_HOLD_S}={raw!r}: not a number of seconds") from None
        if not 0 <= hold_s <= 3600:
            raise FaultConfigError(f"{ENV_HOLD_S}={raw!r}: must be between 0 and 3600")
        if hold_s == 0:
            return None
        return cls(hold_s, env.get(ENV_HOLD_FILE) or None)

    def __call__(self, round_: int) -> bool:
        """Hold if armed; returns whether it held (and was not killed meanwhile)."""
        if self.arm_file is not None:
            try:
                os.unlink(self.arm_file)
            except FileNotFoundError:
                return False  # not armed, or another replica took this arming
        log.warning("cpm.match.holding", round=round_, hold_s=self.hold_s, pid=os.getpid())
        self.sleep(self.hold_s)
        log.warning("cpm.match.released", round=round_, hold_s=self.hold_s, pid=os.getpid())
        return True


_hold: MatchHold | None = None
_loaded = False


def configure(env: Mapping[str, str] | None = None) -> MatchHold | None:
    """Read the knob from ``env`` (default ``os.environ``); log loudly when it is on.
    ``knexa-cpm serve`` calls it at start; raises ``FaultConfigError`` on a bad value."""
    global _hold, _loaded
    _hold = MatchHold.from_env(os.environ if env is None else env)
    _loaded = True
    if _hold is not None:
        log.warning("cpm.fault.enabled", fault="match_hold", hold_s=_hold.hold_s, arm_file=_hold.arm_file,
                    note="test-only fault injection: never set KNEXA_FAULT_* in production")
    return _hold


def match_fault(round_: int) -> None:
    """The hold point inside ``RoundEngine._match`` (inside its write transaction). A
    no-op unless the knob is on."""
    if not _loaded:
        configure()
    if _hold is not None:
        _hold(round_)
