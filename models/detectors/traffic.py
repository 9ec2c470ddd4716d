"""Traffic detector: request counts against a seasonal baseline (surges and drops).

Traffic has a daily and weekly rhythm, so "expected" depends on when. The baseline is
multiplicative and compact: 24 hour-of-day levels and 7 day-of-week offsets of
log(count + 1), EW-updated (River's EWMean recurrence), plus a global level used while an
hour has not been seen yet and an EW residual variance. The test is a z-score on the log
scale whose variance is the learned residual variance plus the Poisson part (1 / expected
count), i.e. a log-normal approximation of an overdispersed (negative-binomial-like) count.
It is two-sided by design: a surge (``direction="up"``) and a drop (``"down"``) both
matter; a drop to zero while traffic is expected is also how a telemetry gap shows up.
Effect-size guards (``surge_ratio``, ``drop_ratio``) keep huge volumes from alarming on a
few percent. Hour and day come from the window start (UTC). State: 34 floats.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from models.detectors.base import NOTHING, Assessment, Detector, as_float, normal_surprise

_HOURS, _DAYS = 24, 7
_STATE_LEN = 3 + _HOURS + _DAYS
_UNSEEN = -1.0  # log(count + 1) is >= 0, so a negative level marks an unseen hour


def hour_and_day(window_start: float) -> tuple[int, int]:
    """(hour of day, day of week with Monday = 0) of an epoch time, UTC."""
    days = math.floor(window_start / 86400.0)
    return int(math.floor(window_start / 3600.0)) % _HOURS, int(days + 3) % _DAYS


class TrafficDetector(Detector):
    """Seasonal (hour x weekday) count baseline with a log-scale z test, both directions.

    Parameters
    ----------
    alpha
        Fading factor of the hourly levels and of the global level.
    day_alpha
        Fading factor of the day-of-week offsets (slower: a weekday repeats weekly).
    surge_ratio
        A surge must be at least this multiple of the expected count.
    drop_ratio
        A drop must be at most expected / drop_ratio.
    sd_floor
        Lowest residual standard deviation on the log scale.
    """

    _params = ("alpha", "day_alpha", "surge_ratio", "drop_ratio", "sd_floor")

    def __init__(
        self,
        alpha: float = 0.01,
        day_alpha: float = 0.001,
        surge_ratio: float = 2.0,
        drop_ratio: float = 3.0,
        sd_floor: float = 0.05,
    ) -> None:
        self.alpha = alpha
        self.day_alpha = day_alpha
        self.surge_ratio = surge_ratio
        self.drop_ratio = drop_ratio
        self.sd_floor = sd_floor
        self._n = 0
        self._level = 0.0
        self._var = 0.0
        self._hours = [_UNSEEN] * _HOURS
        self._days = [0.0] * _DAYS

    @property
    def n_learned(self) -> int:
        return self._n

    def expected_log(self, window_start: float) -> float:
        """Expected log(count + 1) at this time."""
        h, d = hour_and_day(window_start)
        hour = self._hours[h]
        return (hour if hour >= 0.0 else self._level) + self._days[d]

    def assess(self, x: Mapping[str, Any]) -> Assessment:
        count = as_float(x, "count")
        start = as_float(x, "window_start")
        if count is None or start is None or count < 0 or self._n == 0:
            return NOTHING
        e = self.expected_log(start)
        expected = max(math.exp(e) - 1.0, 0.0)
        y = math.log(count + 1.0)
        sd = math.sqrt(max(self._var, self.sd_floor**2) + 1.0 / (expected + 1.0))
        z = (y - e) / sd
        ratio = (count + 1.0) / (expected + 1.0)
        if z > 0 and ratio >= self.surge_ratio:
            direction = "up"
        elif z < 0 and ratio <= 1.0 / self.drop_ratio:
            direction = "down"
        else:
            return NOTHING
        return Assessment(normal_surprise(abs(z)), count, expected, "z_log_count",
                          direction=direction, extra={"z": z})

    def learn_one(self, x: Mapping[str, Any], w: float = 1.0) -> None:
        count = as_float(x, "count")
        start = as_float(x, "window_start")
        if count is None or start is None or count < 0 or w <= 0.0:
            return
        y = math.log(count + 1.0)
        h, d = hour_and_day(start)
        if self._n == 0:
            self._level = y
        if self._hours[h] < 0.0:
            self._hours[h] = self._level
        r = y - (self._hours[h] + self._days[d])
        a = self.alpha * w
        self._var = (1.0 - a) * (self._var + a * r * r)
        self._hours[h] = max(self._hours[h] + a * r, 0.0)
        self._days[d] += self.day_alpha * w * r
        self._level += a * (y - self._level - self._days[d])
        self._n += 1

    def to_state(self) -> tuple[float, ...]:
        return (float(self._n), self._level, self._var, *self._hours, *self._days)

    def from_state(self, state: Sequence[float]) -> None:
        if len(state) != _STATE_LEN:
            raise ValueError(f"traffic state: expected {_STATE_LEN} numbers, got {len(state)}")
        vals = [float(v) for v in state]
        self._n, self._level, self._var = int(vals[0]), vals[1], vals[2]
        self._hours = vals[3:3 + _HOURS]
        self._days = vals[3 + _HOURS:]
