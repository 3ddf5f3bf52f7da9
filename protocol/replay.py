"""Replay guard: refuse a (sender, nonce) seen within the window, and stale timestamps.

Plain class, no clock of its own (callers pass ``now_ms``) so it is deterministic to
test. Memory is bounded: entries older than the window are evicted (they would be
refused as stale anyway), and a hard cap evicts the oldest first.
"""

from __future__ import annotations

from collections import OrderedDict

from .envelope import Envelope
from .errors import Expired, Replay

DEFAULT_WINDOW_MS = 120_000


class ReplayGuard:
    def __init__(self, window_ms: int = DEFAULT_WINDOW_MS, max_entries: int = 1_000_000) -> None:
        self.window_ms = window_ms
        self.max_entries = max_entries
        self._seen: OrderedDict[tuple[str, bytes], int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, env: Envelope, now_ms: int) -> None:
        """Raise ``Expired`` for a ts outside ±window, ``Replay`` for a repeated nonce;
        otherwise remember the nonce."""
        if abs(env.ts_ms - now_ms) > self.window_ms:
            raise Expired(f"timestamp {env.ts_ms} outside ±{self.window_ms} ms of {now_ms}")
        self._evict(now_ms)
        key = (env.sender, env.nonce)
        if key in self._seen:
            raise Replay(f"nonce {env.nonce.hex()} from {env.sender} already seen")
        self._seen[key] = now_ms
        while len(self._seen) > self.max_entries:
            self._seen.popitem(last=False)

    def _evict(self, now_ms: int) -> None:
        # insertion order == arrival order, so the oldest are first
        horizon = now_ms - 2 * self.window_ms
        while self._seen:
            key, seen_at = next(iter(self._seen.items()))
            if seen_at >= horizon:
                break
            del self._seen[key]
