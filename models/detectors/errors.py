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
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from models.detectors.base import NOTHING, Assessment, Detector, as_float, binomial_surprise

_STATE_LEN = 7


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
    """

    _params = ("alpha", "rate_floor", "min_ratio", "min_errors", "guard_surprise",
               "guard_weight")

    def __init__(
        self,
        alpha: float = 0.01,
        rate_floor: float = 0.01,
        min_ratio: float = 2.0,
        min_errors: int = 5,
        guard_surprise: float = 3.0,
        guard_weight: float = 0.1,
    ) -> None:
        self.alpha = alpha
        self.rate_floor = rate_floor
        self.min_ratio = min_ratio
        self.min_errors = min_errors
        self.guard_surprise = guard_surprise
        self.guard_weight = guard_weight
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

    def assess(self, x: Mapping[str, Any]) -> Assessment:
        win = self._window(x)
        if win is None or self._n == 0:
            return NOTHING
        errors, count = win
        base = self.baseline_rate()
        e1, c1, e2, c2 = self._recent
        best = NOTHING
        pools = ((errors, count), (errors + e1, count + c1), (errors + e1 + e2, count + c1 + c2))
        for span, (e, c) in enumerate(pools, start=1):
            if e < self.min_errors or e / c < self.min_ratio * base:
                continue
            s = max(0.0, binomial_surprise(e, c, base) - math.log10(len(pools)))
            if s > best.score:
                best = Assessment(s, e / c, base, "binomial_error_count",
                                  extra={"errors": e, "count": c,
                                         "pooled_windows": float(span)})
        return best

    def _suspicion(self, errors: float, count: float) -> float:
        """Best pooled surprise of the window without the ``min_errors`` guard."""
        base = self.baseline_rate()
        e1, c1, e2, c2 = self._recent
        best = 0.0
        for e, c in ((errors, count), (errors + e1, count + c1),
                     (errors + e1 + e2, count + c1 + c2)):
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
        return (float(self._n), self._ew_errors, self._ew_count, *self._recent)

    def from_state(self, state: Sequence[float]) -> None:
        if len(state) != _STATE_LEN:
            raise ValueError(f"errors state: expected {_STATE_LEN} numbers, got {len(state)}")
        n, self._ew_errors, self._ew_count, *recent = (float(v) for v in state)
        self._n = int(n)
        self._recent = list(recent)
