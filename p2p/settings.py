"""Typed checks for configuration values, shared by ``cpm.config`` and ``knexad.config``.

Why one module: both binaries read TOML (and the daemon environment overrides) into
dataclasses, and an operator should get the same kind of message for the same kind of
mistake from either — ``ConfigError(key, "must be an integer, got '3'")`` — instead of two
small validation libraries drifting apart. Range checks that are about *meaning* (a
quorum in (0, 1], a lease that needs PostgreSQL) stay next to the setting they concern.
"""

from __future__ import annotations

import math
from typing import Any

from protocol.errors import ConfigError


def _bounds(lo: float | None, hi: float | None, lo_open: bool) -> str:
    left = "(-∞" if lo is None else (f"({lo}" if lo_open else f"[{lo}")
    return f"{left}, {'∞' if hi is None else hi}]"


def expect_int(key: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """An integer (not a bool) in [lo, hi]; either bound may be open-ended (None)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"must be an integer, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(key, f"must be in {_bounds(lo, hi, False)}, got {value}")
    return value


def expect_float(key: str, value: Any, lo: float | None = None, hi: float | None = None, *,
                 lo_open: bool = False) -> float:
    """A finite number (int or float, not a bool) in [lo, hi] — or (lo, hi] with
    ``lo_open``; returned as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, f"must be a number, got {value!r}")
    value = float(value)
    if (not math.isfinite(value) or (lo is not None and (value < lo or (lo_open and value == lo)))
            or (hi is not None and value > hi)):
        raise ConfigError(key, f"must be in {_bounds(lo, hi, lo_open)}, got {value}")
    return value


def expect_str(key: str, value: Any, choices: tuple[str, ...] | None = None, *, allow_empty: bool = False) -> str:
    """A string (non-blank unless ``allow_empty``), one of ``choices`` when given."""
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise ConfigError(key, f"must be a {'' if allow_empty else 'non-empty '}string, got {value!r}")
    if choices is not None and value not in choices:
        raise ConfigError(key, f"must be one of {', '.join(choices)}, got {value!r}")
    return value


def expect_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, "must be true or false")
    return value


def expect_str_list(key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(key, "must be a list of strings")
    return list(value)
