"""Per-peer token buckets: how many requests a peer may open, at what sustained rate.

Why: every accepted CPM request is an Ed25519 verify + sign and one SQLite commit
(fsync), every KnowledgeRequest a model run; an *admitted* peer that loops requests
could otherwise take the node's whole capacity (docs/threat-model.md). The limit is
keyed by the Noise-authenticated peer ID, so it cannot be dodged by reconnecting, and
it is checked before a byte of the request is read (cheaper than refusing after).

Bucket: capacity ``burst`` tokens, refilled at ``rate_per_s``; a request costs one
token (``cost`` otherwise). A peer that idles refills to ``burst``; a peer that keeps
asking is held to ``rate_per_s`` on average. ``rate_per_s`` = 0 disables the limiter.

Memory is bounded. A bucket untouched for ``burst / rate_per_s`` seconds is full again,
i.e. identical to no entry, so it is dropped (lossless); entries sit in an LRU order,
so those idle ones are always at the front and are swept in amortised O(1). If
``max_peers`` active entries are present anyway, the least recently seen one is
evicted: that peer merely gets a fresh burst, which an attacker cannot exploit without
owning ``max_peers`` admitted identities. The clock is injectable (monotonic seconds).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from protocol.errors import RateLimited

DEFAULT_MAX_PEERS = 100_000


class PeerRateLimiter:
    """Token bucket per peer ID. Not thread-safe (one trio loop calls it)."""

    def __init__(self, rate_per_s: float, burst: float, *, max_peers: int = DEFAULT_MAX_PEERS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate_per_s < 0 or burst < 1 or max_peers < 1:
            raise ValueError("need rate_per_s ≥ 0, burst ≥ 1, max_peers ≥ 1")
        self.rate = float(rate_per_s)
        self.burst = float(burst)
        self.max_peers = int(max_peers)
        self.clock = clock
        self.refill_s = self.burst / self.rate if self.rate else 0.0  # empty → full
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # peer → (tokens, at)
        self.evicted_lru = 0  # active entries dropped because the table was full

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def _tokens(self, peer: str, now: float) -> float:
        entry = self._buckets.get(peer)
        if entry is None:
            return self.burst
        tokens, at = entry
        return min(self.burst, tokens + max(0.0, now - at) * self.rate)

    def try_acquire(self, peer: str, cost: float = 1.0) -> float:
        """Take ``cost`` tokens: 0.0 if allowed, else the seconds until it would be."""
        if not self.enabled:
            return 0.0
        now = self.clock()
        self._sweep(now)
        tokens = self._tokens(peer, now)
        if tokens >= cost:
            tokens -= cost
            wait = 0.0
        else:
            wait = (cost - tokens) / self.rate
        self._buckets[peer] = (tokens, now)
        self._buckets.move_to_end(peer)
        if len(self._buckets) > self.max_peers:
            self._buckets.popitem(last=False)
            self.evicted_lru += 1
        return wait

    def check(self, peer: str, cost: float = 1.0) -> None:
        """``try_acquire`` that raises ``RateLimited`` (with the wait in the message)."""
        wait = self.try_acquire(peer, cost)
        if wait > 0:
            raise RateLimited(f"rate limit {self.rate:g}/s (burst {self.burst:g}) exceeded; "
                              f"retry in {wait:.3f} s")

    def _sweep(self, now: float) -> None:
        """Drop the entries idle long enough to be full again (front of the LRU order)."""
        cutoff = now - self.refill_s
        while self._buckets:
            peer, (_, at) = next(iter(self._buckets.items()))
            if at > cutoff:
                break
            del self._buckets[peer]
