"""Generic univariate detector for a gauge carried in a window summary (metric:NAME).

Gauges (cpu, queue depth, request rates of other systems: what the Numenta Anomaly
Benchmark exercises) are not Gaussian: many are spiky, and a fixed z threshold on them
fires on every routine spike. So this detector *calibrates its own z-scores*:

1. z = |x - mean| / sd against an exponentially weighted mean/variance (River's
   EWMean/EWVar recurrence, fading factor ``alpha``).
2. A small histogram of the z-scores seen so far (fixed edges, exponentially forgotten
   with ``decay`` so it holds ~1/(1-decay) windows) gives the empirical probability of a
   z at least this large: p = (tail count + prior) / (total + prior). The surprise is
   -log10 p, but only when z >= ``z_min`` (smaller deviations are never anomalies).

A value far outside what this series usually does is then surprising, while a series
whose spikes are routine learns that they are. Because the histogram remembers at most
~1/(1-decay) windows, the largest possible surprise is about log10 of that (3 for the
default), which is why the metric threshold is on a different scale from the request
signals' (see DetectorConfig). State: 4 + 19 floats.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from typing import Any

from models.detectors.base import NOTHING, Assessment, Detector, as_float, ew_update

#: Lower edges of the z-score histogram bins (the last bin is open-ended).
Z_EDGES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0,
                              8.0, 10.0, 12.0, 15.0, 20.0, 30.0, 50.0)
_STATE_LEN = 4 + len(Z_EDGES)


class MetricDetector(Detector):
    """EW z-score of a gauge, calibrated by the series' own z-score history.

    Parameters
    ----------
    name
        Key of the gauge in the window's ``metrics`` dict.
    alpha
        Fading factor of the EW mean/variance of the value.
    decay
        Per-window forgetting factor of the z-score histogram.
    prior
        Pseudo-count added to the tail (a z never seen is not infinitely surprising).
    z_min
        Deviations below this many standard deviations score 0.
    """

    _params = ("name", "alpha", "decay", "prior", "z_min")

    def __init__(
        self,
        name: str = "value",
        alpha: float = 0.005,
        decay: float = 0.999,
        prior: float = 0.5,
        z_min: float = 3.0,
    ) -> None:
        self.name = name
        self.alpha = alpha
        self.decay = decay
        self.prior = prior
        self.z_min = z_min
        self._n = 0
        self._mean = 0.0
        self._var = 0.0
        self._total = 0.0
        self._hist = [0.0] * len(Z_EDGES)

    @property
    def n_learned(self) -> int:
        return self._n

    def _value(self, x: Mapping[str, Any]) -> float | None:
        metrics = x.get("metrics")
        if not isinstance(metrics, Mapping):
            return None
        return as_float(metrics, self.name)

    def _z(self, v: float) -> float:
        sd = math.sqrt(self._var) + 1e-6 * (abs(self._mean) + 1e-3)
        return (v - self._mean) / sd

    def _tail(self, z: float) -> float:
        """Forgotten count of past z-scores >= z (the bin holding z split linearly)."""
        j = bisect.bisect_right(Z_EDGES, z) - 1
        above = sum(self._hist[j + 1:])
        lo = Z_EDGES[j]
        hi = Z_EDGES[j + 1] if j + 1 < len(Z_EDGES) else lo * 1.5
        return above + self._hist[j] * max(0.0, (hi - z) / (hi - lo))

    def assess(self, x: Mapping[str, Any]) -> Assessment:
        v = self._value(x)
        if v is None or self._n == 0:
            return NOTHING
        z = self._z(v)
        az = abs(z)
        if az < self.z_min:
            return NOTHING
        p = min(1.0, (self._tail(az) + self.prior) / (self._total + self.prior))
        return Assessment(-math.log10(p), v, self._mean, "empirical_z_tail",
                          direction="up" if z >= 0 else "down", extra={"z": z})

    def learn_one(self, x: Mapping[str, Any], w: float = 1.0) -> None:
        v = self._value(x)
        if v is None:
            return
        if self._n == 0:
            self._mean = v
            self._n = 1
            return
        az = abs(self._z(v))
        d = self.decay
        self._hist = [c * d for c in self._hist]
        self._hist[bisect.bisect_right(Z_EDGES, az) - 1] += 1.0
        self._total = self._total * d + 1.0
        if w > 0.0:
            self._mean, self._var = ew_update(self._mean, self._var, v, self.alpha * w)
        self._n += 1

    def to_state(self) -> tuple[float, ...]:
        return (float(self._n), self._mean, self._var, self._total, *self._hist)

    def from_state(self, state: Sequence[float]) -> None:
        if len(state) != _STATE_LEN:
            raise ValueError(f"metric state: expected {_STATE_LEN} numbers, got {len(state)}")
        vals = [float(v) for v in state]
        self._n, self._mean, self._var, self._total = int(vals[0]), vals[1], vals[2], vals[3]
        self._hist = vals[4:]
