"""p2p.ratelimit: per-peer token buckets with an injected clock; bounded memory."""

from __future__ import annotations

import pytest

from p2p.ratelimit import PeerRateLimiter
from protocol.errors import ERROR_CODES, PeerUnavailable, RateLimited, error_from_code


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_burst_then_sustained_rate() -> None:
    clock = Clock()
    rl = PeerRateLimiter(rate_per_s=2.0, burst=5, clock=clock)
    assert [rl.try_acquire("a") for _ in range(5)] == [0.0] * 5
    assert rl.try_acquire("a") == pytest.approx(0.5)  # empty: one token in 1/rate s
    clock.t += 0.25
    assert rl.try_acquire("a") == pytest.approx(0.25)  # a refused request does not spend
    clock.t += 0.25
    assert rl.try_acquire("a") == 0.0
    # over a long stretch a busy peer gets rate × time requests, not more
    allowed = 0
    for _ in range(1000):
        clock.t += 0.01
        allowed += rl.try_acquire("a") == 0.0
    assert allowed == pytest.approx(2.0 * 10.0, abs=1)


def test_peers_are_independent() -> None:
    clock = Clock()
    rl = PeerRateLimiter(rate_per_s=1.0, burst=2, clock=clock)
    assert rl.try_acquire("a") == rl.try_acquire("a") == 0.0
    assert rl.try_acquire("a") > 0
    assert rl.try_acquire("b") == 0.0  # b still has its own burst


def test_check_raises_the_typed_retryable_error() -> None:
    rl = PeerRateLimiter(rate_per_s=1.0, burst=1, clock=Clock())
    rl.check("a")
    with pytest.raises(RateLimited, match="retry in 1.000 s") as info:
        rl.check("a")
    assert info.value.code == "rate_limited" and ERROR_CODES["rate_limited"] is RateLimited
    # clients treat it like any transient failure: back off, keep queued feedback
    assert isinstance(error_from_code("rate_limited", "x"), PeerUnavailable)


def test_cost_above_one() -> None:
    clock = Clock()
    rl = PeerRateLimiter(rate_per_s=10.0, burst=10, clock=clock)
    assert rl.try_acquire("a", cost=8) == 0.0
    assert rl.try_acquire("a", cost=8) == pytest.approx(0.6)


def test_idle_peers_are_evicted_losslessly() -> None:
    clock = Clock()
    rl = PeerRateLimiter(rate_per_s=10.0, burst=5, clock=clock)  # empty → full in 0.5 s
    for i in range(1000):
        rl.try_acquire(f"p{i}")
    assert len(rl) == 1000
    clock.t += 0.5
    rl.try_acquire("late")
    assert len(rl) == 1  # every earlier bucket was full again: dropped
    # a drained peer is kept until it has refilled, then forgotten without losing anything
    for _ in range(5):
        rl.try_acquire("busy")
    assert rl.try_acquire("busy") > 0
    clock.t += 0.3
    rl.try_acquire("other")
    assert "busy" in rl._buckets  # 3 of 5 tokens back: still owes
    clock.t += 0.3
    rl.try_acquire("other")
    assert "busy" not in rl._buckets  # full again → identical to no entry
    assert [rl.try_acquire("busy") for _ in range(6)][-2:] == [0.0, pytest.approx(0.1)]
    assert rl.evicted_lru == 0


def test_table_is_capped() -> None:
    clock = Clock()
    rl = PeerRateLimiter(rate_per_s=1.0, burst=3, max_peers=100, clock=clock)
    for i in range(10_000):
        rl.try_acquire(f"p{i}")
    assert len(rl) == 100 and rl.evicted_lru == 10_000 - 100
    # the most recently seen peers are the ones kept
    rl.try_acquire("p9999")
    rl.try_acquire("p9999")
    assert rl.try_acquire("p9999") > 0


def test_disabled_and_validation() -> None:
    rl = PeerRateLimiter(rate_per_s=0.0, burst=1, clock=Clock())
    assert not rl.enabled
    assert all(rl.try_acquire("a") == 0.0 for _ in range(1000)) and len(rl) == 0
    for bad in ({"rate_per_s": -1.0, "burst": 1}, {"rate_per_s": 1.0, "burst": 0.5},
                {"rate_per_s": 1.0, "burst": 1, "max_peers": 0}):
        with pytest.raises(ValueError):
            PeerRateLimiter(**bad)
