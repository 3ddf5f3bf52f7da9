"""Fuzzing a running CPM and a running teacher over libp2p (500-frame default variant).

The 10,000-frame run is tests/reliability/test_fuzz_services.py (marker ``reliability``);
both use tests/reliability/fuzz.py. After the storm: no mutated frame got anything but
an ``Error`` or a reset, the CPM database is row-for-row unchanged, nothing was taught,
and both services still answer a legitimate request.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol.ids import EXCHANGE_PROTOCOLS
from tests.reliability.fuzz_targets import fuzz_cpm, fuzz_teacher

pytestmark = pytest.mark.timeout(300)


async def test_fuzz_500_frames_cpm(tmp_path: Path) -> None:
    report = await fuzz_cpm(tmp_path, n=500, seed=1)
    assert report.sent == 500 + 100 and not report.accepted, report.codes  # + admin protocol


@pytest.mark.parametrize("protocol", EXCHANGE_PROTOCOLS, ids=["1.1", "1.0"])
async def test_fuzz_500_frames_teacher(tmp_path: Path, protocol: str) -> None:
    report = await fuzz_teacher(tmp_path, n=500, seed=2, protocol=protocol)
    assert report.sent == 500 and not report.accepted, report.codes
