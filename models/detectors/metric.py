"""Generic univariate detector for a gauge carried in a window summary (metric:NAME).

Gauges (cpu, queue depth, request rates of other systems: what the Numenta Anomaly
Benchmark exercises) are not Gaussian: many are spiky, many follow the time of day, and a
fixed z threshold on them fires on every routine spike. So this detector looks at the gauge
through two simple predictors, *calibrates* their z on the series' own history, and adds a
second path for sustained moderate deviations:

1. **level**: z = (x - mean) / sd against an exponentially weighted mean/variance (River's
   EWMean/EWVar recurrence, fading factor ``alpha``): spikes and level shifts.
2. **time of day**: x against an EW level of its time-of-day bucket (``season_buckets``
   buckets per day from ``window_start``, each learned at ``alpha_season`` per visit). The
   residual is the distance to the nearest of the bucket's and its two neighbours' levels
   (a daily edge a little early or late is not an anomaly), scaled by the EW spread of
   that distance (``alpha_resid``) and weighted by ``season_weight``: a daily pattern that
   does not happen (a missing peak, a peak too high, a flat day). It only speaks once every
   bucket has been visited (a full day of data).

**Tail path.** z = the larger of the two. A small histogram of past z (fixed edges,
exponentially forgotten with ``decay`` so it holds ~1/(1-decay) windows) gives the empirical
probability of a z at least this large, p = (tail + prior) / (total + prior); the surprise
is -log10 p when z >= ``z_min`` (smaller single deviations are never anomalies). A value far
outside what this series usually does is then surprising, while a series whose spikes are
routine learns that they are. The histogram remembers ~1/(1-decay) windows, so this
surprise is at most ~log10 of that (3.3 by default): the gauge threshold has its own scale.
The z of the first ``calibrate_after`` windows does not enter the histogram: against a
variance estimated from a handful of values it is noise (the second value of a gauge is
thousands of "sd" from the first), and those z, forgotten only at ``decay``, would sit in
the tail for ~1,000 windows. A real spike of similar size then looks ordinary, and the
routine spikes of the first days score below ``recur_mark``, so the recurrence guard never
learns that they recur (on NAB: the daily cron spikes of two ec2_cpu_utilization files).

**Likelihood path** (Numenta's anomaly likelihood, Ahmad et al. 2017, "Unsupervised
real-time anomaly detection for streaming data", on our z instead of HTM's raw score): a
short EW average of the capped z (min(z, ``z_cap``) / ``z_cap``, fading ``alpha_short``,
about 5 windows) against the long-run EW mean/sd of that average (fading ``alpha_long``,
about 2,000 windows; the sd floored at 0.01), Gaussian tail. It catches a level change of 3
to 5 sd that no single window shows (the tail path needs z >= 5). It speaks only when the
short average is at least ``short_min`` (a mean z of 2.5: clean Gaussian noise never gets
there), and its surprise is scaled by ``likelihood_weight`` onto the tail path's scale
(0.66 x 3.5 = the default gauge threshold 2.3). The long-run mean/var start at 0, a calm
prior: until some 2,000 windows have been seen, a sustained deviation is judged against
"this gauge is quiet" rather than against a few hundred windows of its own history.
The assessment's score is the larger of the two surprises.

**Recurrence guard** (a seasonal-spike rule: a nightly job is not an incident). A window
whose surprise (either path) reaches ``recur_mark`` marks its time-of-day bucket for its
UTC day. A window that would score, in a bucket that (with a neighbour: +-1 bucket) was
marked on each of the previous ``recur_days`` days, has its surprise multiplied by
``recur_factor`` (0: silenced): something that surprised us at this time of day yesterday
and the day before is this gauge's routine. Marks are set from the unguarded surprise, so
a routine stays routine; a level change that lasts days marks every bucket and becomes the
new normal. The marks of ``recur_days + 1`` days (today's accumulating) are bits of one
float, plus the day they refer to: 2 numbers. On NAB it removes the daily cron spikes of
the ec2_cpu_utilization files (34 of 101 false positives; docs/detection.md).

**Record** (evidence for the decision layer, not a score). The detector keeps the lowest
and highest value it has learned; a window outside that range by more than
``record_margin`` of its width is a *record* (``extra["record"]`` 1.0): the gauge is
somewhere it has never been. The series decision lets a finding that is a record through
its refractory period (``DetectorConfig.metric_record_gap``): an episode that gets worse
than anything seen before is news even right after a finding, while the ordinary ups and
downs of the same episode stay one event. On NAB this recovers two windows that a finding
shortly before them silenced (docs/detection.md). Two numbers of state.

The rates, weights and thresholds were chosen on the NAB development split
(docs/detection.md lists what was tuned and what each part is worth there).

State (to_state): n, mean, var, residual var, the bit mask of visited buckets, the short
average, the long-run mean/var, the recurrence day and marks, the learned range (low,
high), ``season_buckets`` levels and the histogram counts of z >= 5 (the count below 5 is
the total minus these; the total is a function of n): 36 numbers by default.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from typing import Any

from models.detectors.base import (
    NOTHING,
    Assessment,
    Detector,
    as_float,
    ew_update,
    normal_surprise,
)

#: Lower edges of the stored z-histogram bins (the last bin is open-ended). Only z >= 5 is
#: stored: scores start at z_min (5 by default); smaller z only count towards the total
#: (with a smaller z_min the tail below 5 is interpolated linearly over [0, 5)).
Z_EDGES: tuple[float, ...] = (5.0, 6.0, 7.0, 8.0, 10.0, 13.0, 18.0, 30.0)
_N_SCALARS = 12
#: Bits a float holds exactly: the recurrence marks of (recur_days + 1) days live in one.
_MASK_BITS = 53
_DAY_S = 86_400.0


class MetricDetector(Detector):
    """Level and time-of-day z of a gauge, calibrated by its own history, plus likelihood.

    Parameters
    ----------
    name
        Key of the gauge in the window's ``metrics`` dict.
    alpha
        Fading factor of the EW mean/variance of the value.
    decay
        Per-window forgetting factor of the z histogram.
    prior
        Pseudo-count added to the tail (a z never seen is not infinitely surprising).
    calibrate_after
        Windows learned before a z enters the histogram (the variance is immature).
    z_min
        Deviations below this many (weighted) standard deviations score 0.
    season_buckets, alpha_season, alpha_resid, season_weight
        Time-of-day buckets per day, the per-visit learning rate of a bucket's level, the
        fading factor of the residual spread, and the weight of the residual z (0: off).
    z_cap, alpha_short, alpha_long, short_min, likelihood_weight
        Likelihood path: z cap of the raw score, fading factors of its short average and
        of the long-run mean/var of that average, the least short average that may speak,
        and the weight of its surprise (0: off).
    recur_mark, recur_days, recur_factor
        Recurrence guard: the surprise that marks a time-of-day bucket for the day, the
        previous days that must all be marked (+-1 bucket) for a window to be routine, and
        the factor applied to a routine window's surprise (``recur_mark`` 0: off).
    record_margin
        A value beyond the learned range by more than this fraction of its width is a
        record (evidence only; the series decision uses it).
    """

    _params = ("name", "alpha", "decay", "prior", "calibrate_after", "z_min", "season_buckets",
               "alpha_season", "alpha_resid", "season_weight", "z_cap", "alpha_short", "alpha_long",
               "short_min", "likelihood_weight", "recur_mark", "recur_days", "recur_factor",
               "record_margin")

    def __init__(
        self,
        name: str = "value",
        alpha: float = 0.005,
        decay: float = 0.999,
        prior: float = 0.5,
        calibrate_after: int = 20,
        z_min: float = 5.0,
        season_buckets: int = 16,
        alpha_season: float = 0.02,
        alpha_resid: float = 0.002,
        season_weight: float = 1.0,
        z_cap: float = 10.0,
        alpha_short: float = 0.2,
        alpha_long: float = 0.0005,
        short_min: float = 0.25,
        likelihood_weight: float = 0.66,
        recur_mark: float = 2.3,
        recur_days: int = 2,
        recur_factor: float = 0.0,
        record_margin: float = 0.02,
    ) -> None:
        if not 1 <= season_buckets <= 48:
            raise ValueError(f"season_buckets={season_buckets!r}: need 1..48")
        if calibrate_after < 1:
            raise ValueError(f"calibrate_after={calibrate_after!r}: need >= 1")
        if not record_margin >= 0.0:
            raise ValueError(f"record_margin={record_margin!r}: need >= 0")
        if recur_days < 1 or (recur_days + 1) * season_buckets > _MASK_BITS:
            raise ValueError(f"recur_days={recur_days!r}: need 1 <= (recur_days + 1) * "
                             f"season_buckets <= {_MASK_BITS} (one float holds the marks)")
        self.name = name
        self.alpha = alpha
        self.decay = decay
        self.prior = prior
        self.calibrate_after = calibrate_after
        self.z_min = z_min
        self.season_buckets = season_buckets
        self.alpha_season = alpha_season
        self.alpha_resid = alpha_resid
        self.season_weight = season_weight
        self.z_cap = z_cap
        self.alpha_short = alpha_short
        self.alpha_long = alpha_long
        self.short_min = short_min
        self.likelihood_weight = likelihood_weight
        self.recur_mark = recur_mark
        self.recur_days = recur_days
        self.recur_factor = recur_factor
        self.record_margin = record_margin
        self._low = 0.0
        self._high = 0.0
        self._day = 0.0
        self._marks = 0
        self._n = 0
        self._mean = 0.0
        self._var = 0.0
        self._resid_var = 0.0
        self._seen = 0
        self._short = 0.0
        self._long_mean = 0.0
        self._long_var = 0.0
        self._levels = [0.0] * season_buckets
        self._hist = [0.0] * len(Z_EDGES)

    @property
    def n_learned(self) -> int:
        return self._n

    def _value(self, x: Mapping[str, Any]) -> float | None:
        metrics = x.get("metrics")
        if not isinstance(metrics, Mapping):
            return None
        return as_float(metrics, self.name)

    def _bucket(self, x: Mapping[str, Any]) -> int | None:
        start = as_float(x, "window_start")
        if start is None or self.season_weight <= 0.0:
            return None
        b = self.season_buckets
        return int(start // (_DAY_S / b)) % b

    def _total(self) -> float:
        """Forgotten count of learned z values: every learn from the ``calibrate_after``-th
        on adds 1 (the first learn only sets the mean)."""
        k = max(self._n - self.calibrate_after, 0)
        d = self.decay
        return float(k) if d >= 1.0 else (1.0 - d ** k) / (1.0 - d)

    def _zs(self, v: float, b: int | None) -> tuple[float, float, float, float]:
        """(z, signed level z, signed time-of-day z, unexplained residual).

        The time-of-day residual is the distance to the nearest of the bucket's level and
        its two neighbours' (a daily edge a little early or late, or a bucket straddling
        the edge, is explained by a neighbour); its spread is learned on that distance too.
        """
        eps = 1e-6 * (abs(self._mean) + 1e-3)
        zv = (v - self._mean) / (math.sqrt(self._var) + eps)
        zh = dist = 0.0
        if b is not None:
            level = self._levels[b] if self._seen >> b & 1 else self._mean
            dist = v - level
            if self._seen == (1 << self.season_buckets) - 1:
                nb = self.season_buckets
                dist = math.copysign(min(abs(dist), abs(v - self._levels[(b - 1) % nb]),
                                         abs(v - self._levels[(b + 1) % nb])), dist)
                zh = dist / (math.sqrt(self._resid_var) + eps)
        z = max(abs(zv), self.season_weight * abs(zh))
        return z, zv, zh, dist

    def _tail(self, z: float) -> float:
        """Forgotten count of past z >= z (the bin holding z split linearly)."""
        stored = sum(self._hist)
        lo0 = Z_EDGES[0]
        if z < lo0:
            below = max(self._total() - stored, 0.0)
            return stored + below * (lo0 - z) / lo0
        j = bisect.bisect_right(Z_EDGES, z) - 1
        above = sum(self._hist[j + 1:])
        lo = Z_EDGES[j]
        hi = Z_EDGES[j + 1] if j + 1 < len(Z_EDGES) else lo * 1.5
        return above + self._hist[j] * max(0.0, (hi - z) / (hi - lo))

    def _short_next(self, z: float) -> float:
        """The short EW average of the capped z after this window."""
        return self._short + self.alpha_short * (min(z, self.z_cap) / self.z_cap - self._short)

    def _likelihood(self, short: float) -> float:
        """Surprise of the short average against its long-run mean/sd (Gaussian tail)."""
        if short < self.short_min or self.likelihood_weight <= 0.0:
            return 0.0
        zl = (short - self._long_mean) / max(math.sqrt(self._long_var), 0.01)
        return normal_surprise(zl) if zl > 0.0 else 0.0

    def _surprises(self, z: float) -> tuple[float, float, float]:
        """(tail surprise, likelihood surprise, short average after this window)."""
        short = self._short_next(z)
        s_like = self.likelihood_weight * self._likelihood(short)
        s_tail = 0.0
        if z >= self.z_min:
            total = self._total()
            p = min(1.0, (self._tail(z) + self.prior) / (total + self.prior))
            s_tail = -math.log10(p)
        return s_tail, s_like, short

    def _day_of(self, x: Mapping[str, Any]) -> float | None:
        start = as_float(x, "window_start")
        return None if start is None else float(start // _DAY_S)

    def _marks_at(self, day: float) -> int:
        """The recurrence marks as seen from ``day`` (bits of days that have passed shift)."""
        shift = int(day - self._day)
        if shift <= 0:
            return self._marks
        nb = self.season_buckets
        keep = self.recur_days + 1
        if shift >= keep:
            return 0
        return (self._marks << (shift * nb)) & ((1 << (keep * nb)) - 1)

    def _routine(self, x: Mapping[str, Any], b: int | None) -> bool:
        """Was this time of day (bucket or a neighbour) surprising on a previous day?"""
        if b is None or self.recur_mark <= 0.0:
            return False
        day = self._day_of(x)
        if day is None:
            return False
        marks = self._marks_at(day) >> self.season_buckets  # previous days only
        nb = self.season_buckets
        near = (1 << b) | (1 << (b - 1) % nb) | (1 << (b + 1) % nb)
        for _ in range(self.recur_days):
            if not marks & near:
                return False
            marks >>= nb
        return True

    def _record(self, v: float) -> bool:
        """Is ``v`` outside the learned range by more than ``record_margin`` of its width?"""
        width = self._high - self._low
        margin = self.record_margin * width
        return width > 0.0 and (v > self._high + margin or v < self._low - margin)

    def assess(self, x: Mapping[str, Any]) -> Assessment:
        v = self._value(x)
        if v is None or self._n == 0:
            return NOTHING
        b = self._bucket(x)
        z, zv, zh, _ = self._zs(v, b)
        s_tail, s_like, short = self._surprises(z)
        if (s_tail > 0.0 or s_like > 0.0) and self._routine(x, b):
            s_tail *= self.recur_factor
            s_like *= self.recur_factor
        if s_tail <= 0.0 and s_like <= 0.0:
            return NOTHING
        # which predictor spoke: the largest weighted z
        parts = ((abs(zv), zv, "level"), (self.season_weight * abs(zh), zh, "time_of_day"))
        _, signed, which = max(parts, key=lambda t: t[0])
        test = "empirical_z_tail" if s_tail >= s_like else "likelihood"
        return Assessment(max(s_tail, s_like), v, self._mean, f"{test}:{which}",
                          direction="up" if signed >= 0 else "down",
                          extra={"z": zv, "z_time_of_day": zh,
                                 "short_mean_z": short * self.z_cap,
                                 "record": float(self._record(v))})

    def learn_one(self, x: Mapping[str, Any], w: float = 1.0) -> None:
        v = self._value(x)
        if v is None:
            return
        if self._n == 0:
            self._mean = self._low = self._high = v
            self._n = 1
            return
        b = self._bucket(x)
        z, _, _, dist = self._zs(v, b)
        if b is not None and self.recur_mark > 0.0:
            day = self._day_of(x)
            if day is not None and day >= self._day:
                self._marks = self._marks_at(day)
                self._day = day
                if max(self._surprises(z)[:2]) >= self.recur_mark:
                    self._marks |= 1 << b
        self._short = self._short_next(z)
        self._long_mean, self._long_var = ew_update(self._long_mean, self._long_var,
                                                    self._short, self.alpha_long)
        if self._n >= self.calibrate_after:
            d = self.decay
            self._hist = [c * d for c in self._hist]
            if z >= Z_EDGES[0]:
                self._hist[bisect.bisect_right(Z_EDGES, z) - 1] += 1.0
        if b is not None:
            if not self._seen >> b & 1:
                self._levels[b] = self._mean
                self._seen |= 1 << b
            a = self.alpha_resid * w
            self._resid_var = (1.0 - a) * (self._resid_var + a * dist * dist)
            self._levels[b] += self.alpha_season * w * (v - self._levels[b])
        if w > 0.0:
            self._mean, self._var = ew_update(self._mean, self._var, v, self.alpha * w)
            self._low = min(self._low, v)
            self._high = max(self._high, v)
        self._n += 1

    def to_state(self) -> tuple[float, ...]:
        return (float(self._n), self._mean, self._var, self._resid_var, float(self._seen),
                self._short, self._long_mean, self._long_var, self._day, float(self._marks),
                self._low, self._high, *self._levels, *self._hist)

    def from_state(self, state: Sequence[float]) -> None:
        want = _N_SCALARS + self.season_buckets + len(Z_EDGES)
        if len(state) != want:
            raise ValueError(f"metric state: expected {want} numbers, got {len(state)}")
        vals = [float(v) for v in state]
        self._n = int(vals[0])
        self._mean, self._var, self._resid_var = vals[1:4]
        self._seen = int(vals[4])
        self._short, self._long_mean, self._long_var, self._day = vals[5:9]
        self._marks = int(vals[9])
        self._low, self._high = vals[10:12]
        self._levels = vals[_N_SCALARS:_N_SCALARS + self.season_buckets]
        self._hist = vals[_N_SCALARS + self.season_buckets:]
