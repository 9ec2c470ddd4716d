"""Latency detector: slow-request excess (binomial) and level shifts of p50/p99 (log z).

Two complementary tests, both one-sided upward (faster is never an incident):

1. *Tail excess.* The baseline keeps the typical window p99 on a log scale; its
   exponential is the "slow" threshold T. From the window's latency sketch we count the
   requests above T and test that count against the baseline fraction of requests above T
   (learned count-weighted, floored at ``tail_floor``) with an exact binomial tail. That
   test respects volume: 2 slow of 3 requests is weak evidence, 200 of 300 is overwhelming.
   Counts of the last ``span`` windows are also pooled (the best of the 1..span pools, with
   a Bonferroni correction) so a modest but sustained slowdown at low volume is still caught
   within a few windows.
2. *Level shift.* EW mean/variance of log(p50) and log(p99) (River's EWMean/EWVar
   recurrence); a z-score that is large *and* a ratio above ``min_ratio`` is a shift.
   The variance of a sample quantile grows as 1/count, so a window with fewer requests
   than the baseline's typical window has its standard deviation widened accordingly.

The score is the larger surprise (-log10 p). State: 11 floats.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from models.detectors.base import (
    NOTHING,
    Assessment,
    Detector,
    as_float,
    binomial_surprise,
    ew_update,
    normal_surprise,
)
from models.detectors.sketch_math import count_above

_STATE_LEN = 11


class LatencyDetector(Detector):
    """Slow-request excess and p50/p99 level shifts for one series.

    Parameters
    ----------
    alpha
        Fading factor of the baselines (weight of the newest window).
    tail_floor
        Lowest baseline fraction of requests above the slow threshold.
    tail_ratio
        The window's slow fraction must be at least this multiple of the baseline's.
    min_ratio
        Level shifts smaller than this ratio (observed / expected) are ignored.
    sd_floor
        Lowest standard deviation of log latency (so a flat baseline does not alarm on
        a few percent).
    """

    _params = ("alpha", "tail_floor", "tail_ratio", "min_ratio", "sd_floor")

    def __init__(
        self,
        alpha: float = 0.01,
        tail_floor: float = 0.01,
        tail_ratio: float = 3.0,
        min_ratio: float = 1.5,
        sd_floor: float = 0.05,
    ) -> None:
        self.alpha = alpha
        self.tail_floor = tail_floor
        self.tail_ratio = tail_ratio
        self.min_ratio = min_ratio
        self.sd_floor = sd_floor
        self._n = 0
        self._mu50 = self._var50 = 0.0
        self._mu99 = self._var99 = 0.0
        self._ew_above = self._ew_count = 0.0
        self._recent: list[float] = [0.0, 0.0, 0.0, 0.0]  # (above, count) of 2 past windows

    @property
    def n_learned(self) -> int:
        return self._n

    def slow_threshold(self) -> float:
        """Latency (ms) above which a request counts as slow: the baseline window p99."""
        return math.exp(self._mu99)

    def _window(self, x: Mapping[str, Any]) -> tuple[float | None, float | None]:
        """(requests, requests slower than the slow threshold) of the window."""
        count = as_float(x, "count")
        above = None
        sketch = x.get("sketch")
        if self._n > 0 and isinstance(sketch, Mapping):
            above = count_above(sketch, self.slow_threshold())
        return count, above

    def assess(self, x: Mapping[str, Any]) -> Assessment:
        if self._n == 0:
            return NOTHING
        best = NOTHING
        count, above = self._window(x)
        if count is not None and count > 0 and above is not None:
            base = max(self._ew_above / self._ew_count if self._ew_count > 0 else 0.0,
                       self.tail_floor)
            if above / count >= self.tail_ratio * base:
                pools = [(above, count)]
                a1, c1, a2, c2 = self._recent
                pools.append((above + a1, count + c1))
                pools.append((above + a1 + a2, count + c1 + c2))
                span, s = max(((j, binomial_surprise(a, c, base))
                               for j, (a, c) in enumerate(pools, start=1) if c > 0),
                              key=lambda js: js[1])
                s = max(0.0, s - math.log10(len(pools)))
                if s > best.score:
                    best = Assessment(s, above / count, base, "binomial_slow_fraction",
                                      extra={"slow_ms": self.slow_threshold(), "slow": above,
                                             "count": count, "pooled_windows": float(span)})
        for key, mu, var in (("p99", self._mu99, self._var99), ("p50", self._mu50, self._var50)):
            v = as_float(x, key)
            if v is None or v <= 0.0:
                continue
            ratio = v / math.exp(mu)
            if ratio < self.min_ratio:
                continue
            sd = max(math.sqrt(var), self.sd_floor)
            if count is not None and 0 < count < self._ew_count:
                # a quantile of few requests is noisier than the baseline's typical window
                sd *= math.sqrt(self._ew_count / count)
            z = (math.log(v) - mu) / sd
            s = normal_surprise(z)
            if s > best.score:
                best = Assessment(s, v, math.exp(mu), f"z_log_{key}", extra={"z": z})
        return best

    def learn_one(self, x: Mapping[str, Any], w: float = 1.0) -> None:
        """Learn the window with weight ``w``; ``w == 0`` only records it in the short
        pooling memory (used while the series is anomalous or mitigated)."""
        count, above = self._window(x)
        if count is not None and count > 0:
            self._recent = [above or 0.0, count, self._recent[0], self._recent[1]]
        if w <= 0.0:
            return
        p50, p99 = as_float(x, "p50"), as_float(x, "p99")
        l50 = math.log(p50) if p50 is not None and p50 > 0.0 else None
        l99 = math.log(p99) if p99 is not None and p99 > 0.0 else None
        if l50 is None and l99 is None:
            return
        if self._n == 0:
            self._mu50 = l50 if l50 is not None else l99  # type: ignore[assignment]
            self._mu99 = l99 if l99 is not None else l50  # type: ignore[assignment]
            self._ew_count = count or 0.0
            self._ew_above = self.tail_floor * self._ew_count
        else:
            a = self.alpha * w
            if l50 is not None:
                self._mu50, self._var50 = ew_update(self._mu50, self._var50, l50, a)
            if l99 is not None:
                self._mu99, self._var99 = ew_update(self._mu99, self._var99, l99, a)
            if count is not None and count > 0 and above is not None:
                self._ew_above += a * (above - self._ew_above)
                self._ew_count += a * (count - self._ew_count)
        self._n += 1

    def to_state(self) -> tuple[float, ...]:
        return (float(self._n), self._mu50, self._var50, self._mu99, self._var99,
                self._ew_above, self._ew_count, *self._recent)

    def from_state(self, state: Sequence[float]) -> None:
        if len(state) != _STATE_LEN:
            raise ValueError(f"latency state: expected {_STATE_LEN} numbers, got {len(state)}")
        (n, self._mu50, self._var50, self._mu99, self._var99,
         self._ew_above, self._ew_count, *recent) = (float(v) for v in state)
        self._n = int(n)
        self._recent = list(recent)
