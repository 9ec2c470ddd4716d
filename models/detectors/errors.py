"""Errors detector: the window's error count against the baseline error rate (binomial).

A rate alone ignores volume: 3 errors of 4 requests and 300 of 400 are both 75 %, but
only the second is evidence. We test the error *count* with an exact binomial upper tail
against the baseline rate, which is learned count-weighted (EW errors / EW requests, River's
EWMean recurrence) and floored at ``rate_floor`` so a baseline with no errors at all does
not alarm on the first one. Counts of the last ``span`` (3) windows are pooled too (best of
the pools, Bonferroni-corrected), so a 10x error rate at modest volume is caught in two or
three windows. Two guards keep the test honest on huge volumes and tiny ones: the observed
rate must be ``min_ratio`` times the baseline, and the tested pool must hold at least
``min_errors`` errors. State: 7 floats.

Why the learning is guarded (found on the simulator's error-burst at a tenth of the
default traffic, ~7 requests per window, where a 20 % error rate was never flagged):
windows that stay below the threshold are learned at full weight, and at low volume
*every* window of a burst stays below it for a while (2 errors of 7 is not 1e-6 yet).
The count-weighted baseline then climbed from the 1 % floor to 5 % within 30 windows
and the burst never scored again. So a window whose own pooled test is already
suspicious (surprise >= ``guard_surprise`` = 3, without the ``min_errors`` guard) is learned
at ``guard_weight`` only: a real rise still becomes the baseline, ten times slower, and
a clean series is almost never suspicious (p <= 0.1 %; at 2 the guard also muted
the upper tail of a noisy 5 % baseline and biased it ~13 % low).

Low volume (issue 10): a route at 1 request/s that fails 100 % has one error per window;
no window and no 3-window pool reaches ``min_errors`` or the threshold (3 of 3 at a 1 %
baseline is p = 1e-6 before the correction). So the detector also keeps a *run pool*: the
summed counts of the consecutive windows (up to ``max_run_windows``) over which the pooled
error rate has stayed at least ``min_ratio`` times the baseline; the run restarts when
the pooled rate falls below that (or the run is full). Its exact binomial tail is
corrected for the data-chosen start (Bonferroni over the ``max_run_windows`` starts it
could have had). At 100 % errors on a 1 % baseline, 5 windows give -log10 p = 10 - 1.8:
found in 5 windows that contain a request. State: 10 floats (7 before the run pool: a
stored 7-float state restores with an empty run).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from models.detectors.base import NOTHING, Assessment, Detector, as_float, binomial_surprise

_STATE_LEN = 10
_OLD_STATE_LEN = 7


def _compact(v: float) -> float:
    return int(v) if v.is_integer() and abs(v) < 2**31 else v


class ErrorRateDetector(Detector):
    """Binomial test of errors per window against a learned, floored baseline rate.

    Parameters
    ----------
    alpha
        Fading factor of the baseline (weight of the newest window).
    rate_floor
        Lowest baseline error rate used in the test.
    min_ratio
        The observed rate must be at least this multiple of the baseline rate.
    min_errors
        Fewer errors than this in the tested pool are never an anomaly.
    guard_surprise, guard_weight
        A window whose pooled test (any pool, ``min_errors`` ignored) reaches this
        surprise is learned with weight ``w * guard_weight`` (see the module doc).
    max_run_windows
        Longest run pool (windows). 60 one-second windows: a minute, the horizon within
        which Stanch is meant to act, so a run pool never mixes an incident with what
        happened minutes before it; its Bonferroni cost is log10(60) = 1.8.
    """

    _params = ("alpha", "rate_floor", "min_ratio", "min_errors", "guard_surprise",
               "guard_weight", "max_run_windows")

    def __init__(
        self,
        alpha: float = 0.01,
        rate_floor: float = 0.01,
        min_ratio: float = 2.0,
        min_errors: int = 5,
        guard_surprise: float = 3.0,
        guard_weight: float = 0.1,
        max_run_windows: int = 60,
    ) -> None:
        self.alpha = alpha
        self.rate_floor = rate_floor
        self.min_ratio = min_ratio
        self.min_errors = min_errors
        self.guard_surprise = guard_surprise
        self.guard_weight = guard_weight
        self.max_run_windows = max_run_windows
        self._run = [0.0, 0.0, 0.0]  # errors, count, windows of the current run pool
        self._n = 0
        self._ew_errors = 0.0
        self._ew_count = 0.0
        self._recent: list[float] = [0.0, 0.0, 0.0, 0.0]  # (errors, count) of 2 past windows

    @property
    def n_learned(self) -> int:
        return self._n

    def baseline_rate(self) -> float:
        learned = self._ew_errors / self._ew_count if self._ew_count > 0 else 0.0
        return max(learned, self.rate_floor)

    @staticmethod
    def _window(x: Mapping[str, Any]) -> tuple[float, float] | None:
        count = as_float(x, "count")
        errors = as_float(x, "errors")
        if count is None or errors is None or count <= 0 or errors < 0:
            return None
        return min(errors, count), count

    def _run_with(self, errors: float, count: float, base: float) -> tuple[float, float, float]:
        """The run pool once this window joins it (``(0, 0, 0)``: no run)."""
        e, c, n = self._run
        if n >= 1 and n < self.max_run_windows:
            e, c, n = e + errors, c + count, n + 1
            if e / c >= self.min_ratio * base:
                return e, c, n
        if errors / count >= self.min_ratio * base:
            return errors, count, 1.0
        return 0.0, 0.0, 0.0

    def _pools(self, errors: float, count: float,
               base: float) -> list[tuple[float, float, float, float]]:
        """(errors, count, windows, Bonferroni correction) of every pool tested: the last
        1, 2 and 3 windows, and the run pool when it is longer than that."""
        e1, c1, e2, c2 = self._recent
        fixed = math.log10(3)
        pools = [(errors, count, 1.0, fixed), (errors + e1, count + c1, 2.0, fixed),
                 (errors + e1 + e2, count + c1 + c2, 3.0, fixed)]
        re_, rc, rn = self._run_with(errors, count, base)
        if rn > 3:
            pools.append((re_, rc, rn, math.log10(self.max_run_windows)))
        return pools

    def assess(self, x: Mapping[str, Any]) -> Assessment:
        win = self._window(x)
        if win is None or self._n == 0:
            return NOTHING
        errors, count = win
        base = self.baseline_rate()
        best = NOTHING
        for e, c, span, correction in self._pools(errors, count, base):
            if e < self.min_errors or e / c < self.min_ratio * base:
                continue
            s = max(0.0, binomial_surprise(e, c, base) - correction)
            if s > best.score:
                best = Assessment(s, e / c, base, "binomial_error_count",
                                  extra={"errors": e, "count": c,
                                         "pooled_windows": float(span)})
        return best

    def _suspicion(self, errors: float, count: float) -> float:
        """Best pooled surprise of the window without the ``min_errors`` guard."""
        base = self.baseline_rate()
        best = 0.0
        for e, c, _, _ in self._pools(errors, count, base):
            if e > 0 and e / c >= self.min_ratio * base:
                best = max(best, binomial_surprise(e, c, base))
        return best

    def learn_one(self, x: Mapping[str, Any], w: float = 1.0) -> None:
        win = self._window(x)
        if win is None:
            return
        errors, count = win
        if w > 0.0 and self._n > 0 and self._suspicion(errors, count) >= self.guard_surprise:
            w *= self.guard_weight
        self._run = list(self._run_with(errors, count, self.baseline_rate()))
        self._recent = [errors, count, self._recent[0], self._recent[1]]
        if w <= 0.0:
            return
        if self._n == 0:
            self._ew_errors, self._ew_count = errors, count
        else:
            a = self.alpha * w
            self._ew_errors += a * (errors - self._ew_errors)
            self._ew_count += a * (count - self._ew_count)
        self._n += 1

    def to_state(self) -> tuple[float, ...]:
        # counts are whole numbers: kept as ints they pickle in 2-5 bytes instead of 9,
        # which keeps the whole series state within its 2 KiB budget (models.series)
        return (self._n, self._ew_errors, self._ew_count,
                *(_compact(v) for v in (*self._recent, *self._run)))

    def from_state(self, state: Sequence[float]) -> None:
        if len(state) not in (_STATE_LEN, _OLD_STATE_LEN):
            raise ValueError(f"errors state: expected {_STATE_LEN} numbers, got {len(state)}")
        values = [float(v) for v in state]
        n, self._ew_errors, self._ew_count = values[:3]
        self._n = int(n)
        self._recent = values[3:7]
        self._run = values[7:10] if len(values) == _STATE_LEN else [0.0, 0.0, 0.0]
