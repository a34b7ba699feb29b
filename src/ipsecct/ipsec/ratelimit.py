"""Token buckets per key, sans-I/O: ``allow(key, now)`` spends a token if the key has one.

Used for RFC 4067 §2.5's CT_REQUEST_RATE (CTARs a router accepts per second from one source)
and for what a peer may ask of us per second. The table of keys is bounded: when it is full,
the keys that have refilled completely (they carry no information) are dropped, and if none
has, the oldest go, so a flood of spoofed sources costs memory in proportion to the bound only.
"""

from __future__ import annotations

from collections.abc import Hashable


class RateLimiter:
    def __init__(self, rate: float, burst: float | None = None, *, max_keys: int = 4096) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate)
        self.max_keys = max_keys
        self._buckets: dict[Hashable, tuple[float, float]] = {}  # key -> (tokens, at)
        self.refused = 0

    def allow(self, key: Hashable, now: float) -> bool:
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            self.refused += 1
            return False
        if key not in self._buckets and len(self._buckets) >= self.max_keys:
            self._prune(now)
        self._buckets[key] = (tokens - 1.0, now)
        return True

    def _prune(self, now: float) -> None:
        full = [
            k for k, (t, at) in self._buckets.items() if t + (now - at) * self.rate >= self.burst
        ]
        for k in full:
            del self._buckets[k]
        if len(self._buckets) >= self.max_keys:
            # Dicts keep insertion order: drop the oldest half.
            for k in list(self._buckets)[: self.max_keys // 2]:
                del self._buckets[k]

    def __len__(self) -> int:
        return len(self._buckets)
