"""10,000+ mutated frames against a running CPM and a running teacher over libp2p: both
keep serving, nothing is stored or taught, no mutated frame gets a non-Error answer."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.fuzz_targets import fuzz_cpm, fuzz_teacher
from tests.reliability.summary import record

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(1200)]


async def test_fuzz_10000_frames_cpm(tmp_path: Path) -> None:
    report = await fuzz_cpm(tmp_path, n=10_000, seed=101)
    ok = report.sent == 12_000 and not report.accepted
    record("fuzz", "CPM /knexa/cpm + /knexa/admin, mutated frames", passed=ok, rejected=report.rejected,
           detail=" ".join(f"{k}={v}" for k, v in report.codes.most_common()))
    assert ok, report.codes


async def test_fuzz_10000_frames_teacher(tmp_path: Path) -> None:
    report = await fuzz_teacher(tmp_path, n=10_000, seed=202)
    ok = report.sent == 10_000 and not report.accepted
    record("fuzz", "daemon /knexa/exchange, mutated frames", passed=ok, rejected=report.rejected,
           detail=" ".join(f"{k}={v}" for k, v in report.codes.most_common()))
    assert ok, report.codes
