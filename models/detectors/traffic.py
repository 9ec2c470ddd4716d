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
few percent. Hour and day come from the window start (UTC). State: 36 floats (34 of
baseline, then the start and count of the previous window, for the pooled test).

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

Why the current window is also tested pooled with the one before it, like the errors
detector pools (found on the same traffic-surge, where onset -> throttle took 7.7-8.6 s):
a ramp is weak evidence per window but strong over two, and one window alone is dominated
by Poisson noise at ~100 requests per window (sd ~10 %). The pool (the window directly
before, same ``window_s``, no gap) is tested as one count against the sum of the
expected counts. Its variance is the over-dispersion (learned variance minus the
one-window Poisson part, at least ``sd_floor^2``, NOT halved: a slow drift is correlated
across windows, so pooling gets no credit for averaging it away) plus the Poisson part of
the pooled count; for one window that is exactly the test above. The better of the two
tests wins, Bonferroni-corrected (-log10 2), and reports ``pooled_windows`` (1 or 2):
models.series counts it as that many windows of evidence for the k-of-n debounce.
Surges only: see ``assess`` for drops. ``observed`` / ``expected`` stay the current
window's (the throttle's rate is the expected count of ONE window). The effect-size guard
holds for the pool AND for the current window, so a surge that has passed is not reported
on the strength of an older window. ``surge_ratio`` is 1.5 (was 2.0): at 2.0 a 1x -> 5x
ramp over 15 s is not even eligible before ~4 s; 1.5x is still far from "a few percent"
on a huge volume, and at ~100 requests per window the z test, not the guard, binds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from models.detectors.base import NOTHING, Assessment, Detector, as_float, normal_surprise

_HOURS, _DAYS = 24, 7
_BASE_LEN = 3 + _HOURS + _DAYS
# Two windows pooled at most: two is the k of the 2-of-3 debounce, a third window adds
# little on a ramp (it is the weakest), and the series state has a 2048-byte budget that
# 36 floats of traffic state just fit (tests/unit/test_series.py).
_STATE_LEN = _BASE_LEN + 2
_NONE = -1.0  # no previous window recorded (window starts are >= 0)
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
    pool
        Also test the current window pooled with the one directly before it.
    """

    _params = ("alpha", "day_alpha", "surge_ratio", "drop_ratio", "sd_floor", "clip_z", "pool")

    def __init__(
        self,
        alpha: float = 0.01,
        day_alpha: float = 0.001,
        surge_ratio: float = 1.5,
        drop_ratio: float = 3.0,
        sd_floor: float = 0.05,
        clip_z: float = 3.0,
        pool: bool = True,
    ) -> None:
        self.alpha = alpha
        self.day_alpha = day_alpha
        self.surge_ratio = surge_ratio
        self.drop_ratio = drop_ratio
        self.sd_floor = sd_floor
        self.clip_z = clip_z
        self.pool = pool
        self._n = 0
        self._level = 0.0
        self._var = 0.0
        self._hours = [_UNSEEN] * _HOURS
        self._days = [0.0] * _DAYS
        self._prev_start = _NONE  # the previous window seen (for the pooled test)
        self._prev_count = 0.0

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

    def _expected_count(self, window_start: float) -> float:
        return max(math.exp(self.expected_log(window_start)) - 1.0, 0.0)

    def _pools(self, start: float, count: float, window_s: float | None
               ) -> list[tuple[float, float]]:
        """(count, expected count) of the current window, then of the current window
        pooled with the previous one if that was directly before it (same size, no gap)."""
        own = (count, self._expected_count(start))
        if not self.pool or window_s is None or window_s <= 0 or \
                self._prev_start == _NONE or \
                abs(start - self._prev_start - window_s) > 1e-6 * window_s:
            return [own]
        return [own, (count + self._prev_count,
                      own[1] + self._expected_count(self._prev_start))]

    def assess(self, x: Mapping[str, Any]) -> Assessment:
        count = as_float(x, "count")
        start = as_float(x, "window_start")
        if count is None or start is None or count < 0 or self._n == 0:
            return NOTHING
        pools = self._pools(start, count, as_float(x, "window_s"))
        expected = pools[0][1]
        ratio = (count + 1.0) / (expected + 1.0)
        if ratio >= self.surge_ratio:
            direction, sign = "surge", 1.0
        elif ratio <= 1.0 / self.drop_ratio:
            # Drops are tested on the window alone: at a few requests per window the
            # log-normal lower tail is far too heavy (two empty windows at 2.9 expected,
            # p = 0.003, scored 1e-6 pooled), and a drop to zero needs no pooling anyway.
            direction, sign, pools = "drop", -1.0, pools[:1]
        else:
            return NOTHING
        # over-dispersion beyond one window's Poisson noise, not credited to pooling
        over = max(self._var - 1.0 / (expected + 1.0), self.sd_floor**2)
        correction = math.log10(len(pools))
        best = NOTHING
        for j, (c, e) in enumerate(pools, start=1):
            r = (c + 1.0) / (e + 1.0)
            if (r < self.surge_ratio) if sign > 0 else (r > 1.0 / self.drop_ratio):
                continue
            z = (math.log(c + 1.0) - math.log(e + 1.0)) / math.sqrt(over + 1.0 / (e + 1.0))
            if sign * z <= 0.0:
                continue
            score = max(normal_surprise(abs(z)) - correction, 0.0)
            if score > best.score or best is NOTHING:
                best = Assessment(score, count, expected, "z_log_count", direction=direction,
                                  extra={"z": z, "pooled_windows": float(j),
                                         "pooled_count": c, "pooled_expected": e})
        return best

    def learn_one(self, x: Mapping[str, Any], w: float = 1.0) -> None:
        count = as_float(x, "count")
        start = as_float(x, "window_start")
        if count is None or start is None or count < 0:
            return
        # the pooled test's history records what was seen, learned from or not
        self._prev_start, self._prev_count = start, count
        if w <= 0.0:
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
        return (float(self._n), self._level, self._var, *self._hours, *self._days,
                self._prev_start, self._prev_count)

    def from_state(self, state: Sequence[float]) -> None:
        """Restore ``to_state()``; a state stored before the pooled test (34 numbers,
        no history) is accepted and starts with an empty history."""
        if len(state) not in (_STATE_LEN, _BASE_LEN):
            raise ValueError(f"traffic state: expected {_STATE_LEN} numbers, got {len(state)}")
        vals = [float(v) for v in state]
        self._n, self._level, self._var = int(vals[0]), vals[1], vals[2]
        self._hours = vals[3:3 + _HOURS]
        self._days = vals[3 + _HOURS:_BASE_LEN]
        self._prev_start, self._prev_count = (vals[_BASE_LEN], vals[_BASE_LEN + 1]) \
            if len(vals) == _STATE_LEN else (_NONE, 0.0)
