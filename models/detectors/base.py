"""The shared shape of every detector, and the small statistics they all use.

Every detector follows River's anomaly-detector contract (``river.base.AnomalyDetector``):
hyperparameters are stored verbatim in ``__init__``, learned state lives in private
attributes, ``score_one(x)`` is called first and ``learn_one(x)`` after it, and the caller
decides whether to learn at all (River's ``protect_anomaly_detector`` idea: a baseline that
learns the incident stops seeing it, online-ml/river #948).

Scores are *surprises*: ``-log10(p)`` of a one-sided test, so 0 means "nothing unusual" and
7 means "p = 1e-7". Using log p-values makes one threshold meaningful for every signal and
makes the multiple-testing budget explicit: with 86,400 one-second windows per series per
day, a per-window false-alarm rate around 1e-7 needs a threshold near 7 (before debounce).

Why not River's ``stats.EWMean`` / ``stats.EWVar`` objects as the state? They are Rust
objects of 176-205 pickled bytes each and cannot be rebuilt from plain numbers, while the
whole per-series budget is 2048 bytes for every detector of a series. We keep River's math
(Finch's incremental exponentially weighted mean/variance, the same recurrence River uses,
checked against River in tests/unit/test_detector_contract.py) on plain floats, which
``to_state()`` can return as a tuple of numbers.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Largest surprise reported; p-values below 1e-300 are all "certain".
MAX_SURPRISE = 300.0
_LN10 = math.log(10.0)


@dataclass(frozen=True, slots=True)
class Assessment:
    """What a detector concluded about one window, before debounce.

    ``score`` is the surprise (-log10 p, >= 0). ``direction`` is "up" or "down".
    """

    score: float
    observed: float
    expected: float
    statistic: str
    direction: str = "up"
    extra: dict[str, float] = field(default_factory=dict)


NOTHING = Assessment(score=0.0, observed=0.0, expected=0.0, statistic="none")


class Detector(ABC):
    """River-shaped detector over one window summary (a plain dict).

    Subclasses implement ``assess`` (score with evidence), ``learn_one`` and the compact
    state pair ``to_state`` / ``from_state``. Pickling goes through the compact state so
    that a pickled detector is as small as what the Faust table stores.
    """

    #: Names of the hyperparameters, in ``__init__`` order (for pickling and repr).
    _params: tuple[str, ...] = ()

    @abstractmethod
    def assess(self, x: Mapping[str, Any]) -> Assessment:
        """Score one window and explain the score; must not mutate ``x`` or learn."""

    def score_one(self, x: Mapping[str, Any]) -> float:
        """Surprise of the window (-log10 p-value, >= 0, finite)."""
        return self.assess(x).score

    @abstractmethod
    def learn_one(self, x: Mapping[str, Any], w: float = 1.0) -> None:
        """Update the baseline with the window; ``w`` in [0, 1] down-weights it."""

    @property
    @abstractmethod
    def n_learned(self) -> int:
        """Windows learned so far (warm-up is counted on this)."""

    @abstractmethod
    def to_state(self) -> tuple[float, ...]:
        """The learned state as a flat tuple of plain numbers."""

    @abstractmethod
    def from_state(self, state: Sequence[float]) -> None:
        """Restore what ``to_state`` returned."""

    # -- pickling through the compact state ---------------------------------------
    def get_params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._params}

    def __getstate__(self) -> tuple[dict[str, Any], tuple[float, ...]]:
        return self.get_params(), self.to_state()

    def __setstate__(self, packed: tuple[dict[str, Any], tuple[float, ...]]) -> None:
        params, state = packed
        self.__init__(**params)  # type: ignore[misc]
        self.from_state(state)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


# -- exponentially weighted moments (River's EWMean / EWVar recurrence) ------------


def ew_update(mean: float, var: float, x: float, alpha: float) -> tuple[float, float]:
    """One step of River's EWMean/EWVar (Finch 2009) with fading factor ``alpha``."""
    d = x - mean
    mean += alpha * d
    var = (1.0 - alpha) * (var + alpha * d * d)
    return mean, var


# -- tail probabilities as surprises (-log10 p) ------------------------------------


def _clip(s: float) -> float:
    if s != s or s <= 0.0:  # NaN or negative
        return 0.0
    return min(s, MAX_SURPRISE)


def normal_surprise(z: float) -> float:
    """-log10 P(Z >= z) for a standard normal (one-sided, upper)."""
    if z <= 0.0:
        return _clip(-math.log10(0.5 * math.erfc(z / math.sqrt(2.0))))
    if z < 30.0:
        return _clip(-math.log10(0.5 * math.erfc(z / math.sqrt(2.0))))
    # Mills ratio asymptote: log P ~ -z^2/2 - log(z sqrt(2 pi))
    return _clip((0.5 * z * z + math.log(z * math.sqrt(2.0 * math.pi))) / _LN10)


def binomial_surprise(k: float, n: float, p: float) -> float:
    """-log10 P(X >= k) for X ~ Binomial(n, p), exact (log-space tail sum).

    Respects the count: 3 of 4 is weak evidence, 300 of 400 is overwhelming. Only the
    upper tail matters (k > n p); otherwise the surprise is 0. The sum stops once terms
    no longer change it, so the cost is a few dozen terms even for large n.
    """
    k_i = int(round(k))
    n_i = int(round(n))
    if n_i <= 0 or k_i <= 0 or k_i <= n_i * p:
        return 0.0
    if p <= 0.0:
        return MAX_SURPRISE
    if p >= 1.0:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    log_term = (
        math.lgamma(n_i + 1) - math.lgamma(k_i + 1) - math.lgamma(n_i - k_i + 1)
        + k_i * lp + (n_i - k_i) * lq
    )
    total = 1.0  # terms relative to the first one
    term = 1.0
    ratio_base = p / (1.0 - p)
    for j in range(k_i, min(n_i, k_i + 2000)):
        term *= (n_i - j) / (j + 1) * ratio_base
        total += term
        if term < total * 1e-12:
            break
    return _clip(-(log_term + math.log(total)) / _LN10)


def poisson_surprise_upper(k: float, mu: float) -> float:
    """-log10 P(X >= k) for X ~ Poisson(mu)."""
    k_i = int(math.ceil(k))
    if k_i <= 0 or k_i <= mu:
        return 0.0
    if mu <= 0.0:
        return MAX_SURPRISE
    log_term = k_i * math.log(mu) - mu - math.lgamma(k_i + 1)
    total = term = 1.0
    for j in range(k_i + 1, k_i + 2000):
        term *= mu / j
        total += term
        if term < total * 1e-12:
            break
    return _clip(-(log_term + math.log(total)) / _LN10)


def poisson_surprise_lower(k: float, mu: float) -> float:
    """-log10 P(X <= k) for X ~ Poisson(mu)."""
    k_i = int(math.floor(k))
    if k_i < 0 or k_i >= mu:
        return 0.0
    log_term = k_i * math.log(mu) - mu - math.lgamma(k_i + 1) if mu > 0 else 0.0
    total = term = 1.0
    for j in range(k_i, 0, -1):
        term *= j / mu
        total += term
        if term < total * 1e-12:
            break
    return _clip(-(log_term + math.log(total)) / _LN10)


def as_float(x: Mapping[str, Any], key: str) -> float | None:
    """A finite float field of the window, or None when missing or unusable."""
    v = x.get(key)
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def severity_of(score: float, threshold: float) -> str:
    """minor / major / critical by how far the surprise exceeds the threshold."""
    if score >= 2.0 * threshold:
        return "critical"
    if score >= 1.4 * threshold:
        return "major"
    return "minor"
