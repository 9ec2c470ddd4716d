"""Traffic detector: request counts against a seasonal baseline (surges and drops).

Traffic has a daily and weekly rhythm, so "expected" depends on when. The baseline is
multiplicative and compact: 24 hour-of-day levels and 7 day-of-week offsets of
log(count + 1), EW-updated (River's EWMean recurrence), plus a global level used while an
hour has not been seen yet and an EW residual variance. The test is a z-score on the log
scale whose variance is the learned residual variance plus the Poisson part (1 / expected
count), i.e. a log-normal approximation of an overdispersed (negative-binomial-like) count.
It is two-sided by design: a surge (``direction="surge"``) and a drop (``"drop"``) both
matter; a drop to zero while traffic is expected is also how a telemetry gap shows up.
The words are the ones the incident and mitigation models use (models.incidents,
models.mitigation), so no translation sits between detector and decider.
Effect-size guards (``surge_ratio``, ``drop_ratio``) keep huge volumes from alarming on a
few percent. Hour and day come from the window start (UTC). State: 34 floats.

Why the learning is guarded (found on the simulator's traffic-surge, where the detector
used to stay silent on a 5x surge that ramps up over 15 s):

* The residual variance already contains the Poisson noise of the counts, so the test's
  variance is ``max(learned, floor^2 + Poisson)``, not their sum: the sum counted the
  Poisson part twice and asked for ~2.7x where ~1.8x is already a 1e-6 event.
* A ramp is learned while it is still below the threshold, and every such window
  inflates the EW variance (r^2 of a 1.5x window is ~10x a normal one): by the time the
  surge reached 5x the learned sd had tripled and the window scored z ~ 3. Residuals are
  therefore clipped at ``clip_z`` standard deviations before they update the level and
  the variance (Huber-style): a sustained new level is still absorbed (the level moves
  by at most alpha * clip_z * sd per window) but a ramp no longer widens the test.
* The first windows are learned at rate ``max(alpha, 1 / (n + 1))`` (a running mean,
  like a bias-corrected EW mean): with a fixed alpha = 0.01 a partial first window
  (a worker that starts mid-second) still biased the level by ~25 % and the variance
  several-fold after the 120 warm-up windows. The variance starts after
  ``_VAR_START`` windows so that the level it is measured against has settled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from models.detectors.base import NOTHING, Assessment, Detector, as_float, normal_surprise

_HOURS, _DAYS = 24, 7
_STATE_LEN = 3 + _HOURS + _DAYS
_UNSEEN = -1.0  # log(count + 1) is >= 0, so a negative level marks an unseen hour
_VAR_START = 10  # windows learned before the residual variance is (the level settles first)


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
        Lowest residual standard deviation on the log scale (beyond the Poisson part).
    clip_z
        Residuals are clipped at this many standard deviations before they are learned.
    """

    _params = ("alpha", "day_alpha", "surge_ratio", "drop_ratio", "sd_floor", "clip_z")

    def __init__(
        self,
        alpha: float = 0.01,
        day_alpha: float = 0.001,
        surge_ratio: float = 2.0,
        drop_ratio: float = 3.0,
        sd_floor: float = 0.05,
        clip_z: float = 3.0,
    ) -> None:
        self.alpha = alpha
        self.day_alpha = day_alpha
        self.surge_ratio = surge_ratio
        self.drop_ratio = drop_ratio
        self.sd_floor = sd_floor
        self.clip_z = clip_z
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

    def _sd(self, expected: float) -> float:
        """Standard deviation of log(count + 1) around the expectation: the learned
        residual spread, but never below the floor plus the Poisson part 1 / (count + 1)
        (the learned spread already contains the Poisson noise: not added twice)."""
        return math.sqrt(max(self._var, self.sd_floor**2 + 1.0 / (expected + 1.0)))

    def assess(self, x: Mapping[str, Any]) -> Assessment:
        count = as_float(x, "count")
        start = as_float(x, "window_start")
        if count is None or start is None or count < 0 or self._n == 0:
            return NOTHING
        e = self.expected_log(start)
        expected = max(math.exp(e) - 1.0, 0.0)
        y = math.log(count + 1.0)
        z = (y - e) / self._sd(expected)
        ratio = (count + 1.0) / (expected + 1.0)
        if z > 0 and ratio >= self.surge_ratio:
            direction = "surge"
        elif z < 0 and ratio <= 1.0 / self.drop_ratio:
            direction = "drop"
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
        e = self._hours[h] + self._days[d]
        r = y - e
        if self._n > _VAR_START:  # clip (Huber): a ramp or an outlier cannot widen the test
            bound = self.clip_z * self._sd(max(math.exp(e) - 1.0, 0.0))
            r = min(max(r, -bound), bound)
        a = max(self.alpha, 1.0 / (self._n + 1)) * w
        if self._n >= _VAR_START:
            av = max(self.alpha, 1.0 / (self._n - _VAR_START + 1)) * w
            self._var += av * (r * r - self._var)
        self._hours[h] = max(self._hours[h] + a * r, 0.0)
        self._days[d] += self.day_alpha * w * r
        self._level += a * (e + r - self._level - self._days[d])
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
