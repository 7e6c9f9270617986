"""Delivery lag: a fixed-bucket histogram cheap enough for the write path (pure).

The hub marks one event in :data:`SAMPLE` with the monotonic time it
received it; each transport, when it has written such an event to a
subscriber's socket, records the time since. One ``bisect`` and two
additions per sampled delivery; exported as ``plasma_delivery_lag_seconds``.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Final

__all__ = ["BUCKETS", "SAMPLE", "LagHistogram"]

# One event in this many is timed (all of its deliveries).
SAMPLE: Final = 16
BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LagHistogram:
    """Counts per bucket (upper bounds :data:`BUCKETS`, then +Inf), sum and count."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= it) for each bucket, +Inf last."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*BUCKETS, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out

    def quantile(self, q: float) -> float | None:
        """The bucket bound below which ``q`` of the observations lie (an upper
        estimate, as Prometheus' histogram_quantile would interpolate within
        it); ``None`` without observations."""
        total = self.count
        if not total:
            return None
        rank = q * total
        for bound, running in self.cumulative():
            if running >= rank:
                return bound if bound != float("inf") else BUCKETS[-1]
        return BUCKETS[-1]  # pragma: no cover
