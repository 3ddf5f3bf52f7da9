"""10,000+ mutated frames against a running CPM and a running teacher over libp2p: both
keep serving, nothing is stored or taught, no mutated frame gets a non-Error answer; and
mutated chunk streams against a student, in both exchange versions."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol.ids import EXCHANGE_PROTOCOL, EXCHANGE_PROTOCOL_1_1
from tests.integration.test_student_fuzz import run_campaign
from tests.reliability.fuzz_targets import fuzz_cpm, fuzz_teacher
from tests.reliability.summary import record

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(1200)]


async def test_fuzz_10000_frames_cpm(tmp_path: Path) -> None:
    report = await fuzz_cpm(tmp_path, n=10_000, seed=101)
    ok = report.sent == 12_000 and not report.accepted
    record("fuzz", "CPM /knexa/cpm + /knexa/admin, mutated frames", passed=ok, rejected=report.rejected,
           detail=" ".join(f"{k}={v}" for k, v in report.codes.most_common()))
    assert ok, report.codes


@pytest.mark.parametrize("protocol", [EXCHANGE_PROTOCOL, EXCHANGE_PROTOCOL_1_1], ids=["1.0", "1.1"])
async def test_fuzz_10000_frames_teacher(tmp_path: Path, protocol: str) -> None:
    report = await fuzz_teacher(tmp_path, n=10_000, seed=202, protocol=protocol)
    ok = report.sent == 10_000 and not report.accepted
    record("fuzz", f"daemon {protocol}, mutated frames", passed=ok, rejected=report.rejected,
           detail=" ".join(f"{k}={v}" for k, v in report.codes.most_common()))
    assert ok, report.codes


@pytest.mark.parametrize("protocol", [EXCHANGE_PROTOCOL, EXCHANGE_PROTOCOL_1_1], ids=["1.0", "1.1"])
async def test_fuzz_student(protocol: str) -> None:
    """500 mutated chunk streams from a hostile teacher (tests/integration/test_student_fuzz.py):
    each gives the sealed package or a typed error."""
    outcomes = await run_campaign(protocol, n=500, seed=303)
    record("fuzz", f"student {protocol}, mutated chunk streams", passed=True,
           rejected=500 - outcomes.get("accepted", 0),
           detail=" ".join(f"{k}={v}" for k, v in sorted(outcomes.items(), key=lambda kv: -kv[1])))
