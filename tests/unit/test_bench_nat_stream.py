"""benchmarks.nat_stream.summarize: best transfer per path → MB/s and the relay/direct
ratio (the measurement itself needs namespaces: docs/performance.md §NAT relay)."""

from __future__ import annotations

import pytest

from benchmarks.nat_stream import _payload, summarize


def test_ratio_uses_the_best_transfer_of_each_mode() -> None:
    runs = [
        {"repeat": 0, "mode": "direct", "path": "direct", "connect_s": 0.1, "transfer_s": 2.0},
        {"repeat": 0, "mode": "relay", "path": "relay", "connect_s": 0.3, "transfer_s": 9.0},
        {"repeat": 1, "mode": "direct", "path": "direct", "connect_s": 0.2, "transfer_s": 1.0},
        {"repeat": 1, "mode": "relay", "path": "relay", "connect_s": 0.5, "transfer_s": 4.0},
    ]
    out = summarize(runs, 8_000_000)
    assert out["MB_per_s"] == {"direct": 8.0, "relay": 2.0}
    assert out["ratio_relay_vs_direct"] == pytest.approx(0.25)
    assert out["paths"] == [("direct", "direct"), ("relay", "relay")]
    assert out["connect_s_median"] == {"direct": 0.2, "relay": 0.5}


def test_teacher_and_student_derive_the_same_package() -> None:
    assert _payload(1) == _payload(1) and len(_payload(1)) == 1 << 20
