"""Reliability suite (``make test-reliability`` = ``pytest -m reliability``): prints the
summary table of faults survived, inputs rejected and records lost at the end."""

from __future__ import annotations

from typing import Any

from tests.reliability.summary import SUMMARY, dump_if_requested


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    if not SUMMARY.rows:
        return
    terminalreporter.section("KNEXA reliability summary")
    for line in SUMMARY.table().splitlines():
        terminalreporter.write_line(line)
    dump_if_requested()
