"""Per-second counters behind the flood limits (``max_ping_rate``, ``max_stream_churn_rate``),
shared by the session and the QUIC carrier. Time is passed in."""

from __future__ import annotations


class PerSecond:
    """Counts events in one-second windows; a window starts at the first event after the last
    one ended."""

    __slots__ = ("_start", "_count")

    def __init__(self, now: float = 0.0) -> None:
        self._start = now
        self._count = 0

    def count(self, now: float) -> int:
        """Count one event at ``now``; returns how many its window holds, this one included."""
        if now - self._start >= 1.0:
            self._start = now
            self._count = 0
        self._count += 1
        return self._count
