"""Every detector of one series, and the decision policy around them.

``SeriesDetector.update(window)`` is the one call the live detector agent and the offline
backtest both make per window summary: score every signal first, decide (warm-up, k-of-n
debounce, refractory period, severity), then learn - except from what was flagged or while
the series is mitigated, so the baseline never learns the incident (River's
``protect_anomaly_detector`` idea, online-ml/river #948). A baseline that stays flagged for
``relearn_after`` windows accepts the new level (a deploy can legitimately change latency).

State is compact on purpose: the agent keeps it in a changelogged Faust table, one entry per
series, for up to 100,000 series, so ``to_state()`` is a tuple of plain numbers (and metric
names) well under 2048 pickled bytes; see ``state_size_bytes``.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from models.detectors.base import Assessment, Detector, as_float, severity_of
from models.detectors.errors import ErrorRateDetector
from models.detectors.latency import LatencyDetector
from models.detectors.metric import MetricDetector
from models.detectors.traffic import TrafficDetector

#: Version of ``to_state()``. 2: a gauge's state gained its learned range and its z
#: histogram has 8 bins instead of 10 (same length, other meaning). A version-1 state
#: restores the request signals and starts its gauges afresh (see ``from_state``).
_STATE_VERSION = 2
_REQUEST_SIGNALS = ("latency", "errors", "traffic")


@dataclass(frozen=True, slots=True)
class DetectorConfig:
    """Detection defaults (all signals unless prefixed ``metric_``).

    threshold
        Surprise (-log10 p) a window must reach to count as anomalous. 6 means p <= 1e-6:
        with 86,400 one-second windows per series per day and k-of-n debounce this keeps
        clean series quiet (the false-alarm budget is ~1e-7 per series-window).
    warmup_windows
        Windows a detector must have learned before it may report anything.
    debounce_k, debounce_n
        A finding needs ``k`` anomalous windows among the last ``n`` (current included);
        a test that pooled the counts of ``j`` windows counts as ``j`` windows of evidence.
    relearn_after
        After this many consecutive anomalous windows the baseline learns again
        (the change is the new normal); until then anomalous windows are not learned.
    metric_*
        The same knobs for generic gauges (metric:NAME). Gauges are slower and noisier
        than request signals; these defaults were chosen on the NAB training data (see
        docs/detection.md). ``metric_refractory`` windows after a finding no new finding
        is made for that gauge (one event per episode), unless the window is a *record*
        (the gauge beyond everything it has shown, by ``metric_record_margin`` of that
        range) and at least ``metric_record_gap`` windows have passed: an episode that
        gets worse than anything before is news, its ordinary ups and downs are not.
    max_metrics
        Gauges tracked per series (bounded memory); further names are ignored.
    """

    threshold: float = 6.0
    warmup_windows: int = 120
    debounce_k: int = 2
    debounce_n: int = 3
    relearn_after: int = 900
    metric_threshold: float = 2.3
    metric_warmup_windows: int = 150
    metric_debounce_k: int = 1
    metric_debounce_n: int = 1
    metric_refractory: int = 100
    metric_learn_weight_anomalous: float = 0.25
    metric_z_min: float = 5.0
    metric_record_margin: float = 0.02
    metric_record_gap: int = 10
    max_metrics: int = 4

    def __post_init__(self) -> None:
        for name in ("warmup_windows", "relearn_after", "metric_warmup_windows",
                     "metric_refractory", "metric_record_gap", "max_metrics"):
            if getattr(self, name) < 0:
                raise ValueError(f"DetectorConfig.{name}={getattr(self, name)!r}: must be >= 0")
        for k, n in (("debounce_k", "debounce_n"), ("metric_debounce_k", "metric_debounce_n")):
            kv, nv = getattr(self, k), getattr(self, n)
            if not 1 <= kv <= nv <= 30:
                raise ValueError(f"DetectorConfig.{k}={kv}, {n}={nv}: need 1 <= k <= n <= 30")
        for name in ("threshold", "metric_threshold"):
            if not getattr(self, name) > 0:
                raise ValueError(f"DetectorConfig.{name}={getattr(self, name)!r}: must be > 0")
        if not self.metric_record_margin >= 0.0:
            raise ValueError("DetectorConfig.metric_record_margin: must be >= 0")
        if not 0.0 <= self.metric_learn_weight_anomalous <= 1.0:
            raise ValueError("DetectorConfig.metric_learn_weight_anomalous: must be in [0, 1]")


@dataclass(frozen=True, slots=True)
class Finding:
    """One anomaly decision: what the agent turns into a schemas Anomaly record."""

    series: str
    signal: str
    window_start: float
    observed: float
    expected: float
    score: float
    severity: str
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """The idempotent anomaly id (docs/architecture.md)."""
        return f"{self.series}|{self.signal}|{self.window_start:.3f}"


_SEVERITIES = ("minor", "major", "critical")
#: Latency excess (ms) at which a slowdown becomes major / critical: the classic limits
#: of response time (Miller 1968, Nielsen): under 0.1 s a user does not notice the
#: difference, past 1 s the user's flow of thought is broken.
LATENCY_MAJOR_MS = 100.0
LATENCY_CRITICAL_MS = 1000.0
#: Share of a route's requests failing beyond its normal rate at which an error anomaly
#: is major (one request in ten) / critical (most requests: the route is effectively down).
ERRORS_MAJOR_EXCESS = 0.10
ERRORS_CRITICAL_EXCESS = 0.50


def impact_severity(signal: str, a: Assessment, window: Mapping[str, Any]) -> str:
    """How much a finding hurts the route's users, whatever its statistical strength.

    The surprise says how sure we are that something changed; a tiny, certain change (a
    healthy route's p99 from 10 to 18 ms) is still minor. Latency: the excess of the
    window's tested quantile over its baseline in ms; for the slow-fraction test the
    window's p99 over the slow threshold (the baseline p99). Errors: the pooled error
    rate over the baseline rate. Traffic and gauges have no impact scale of their own:
    their severity is the statistical one. The finding's severity is the lower of the two.
    """
    if signal == "latency":
        if a.statistic == "binomial_slow_fraction":
            p99 = as_float(window, "p99")
            slow_ms = a.extra.get("slow_ms")
            excess = (p99 - float(slow_ms)) if p99 is not None and slow_ms is not None else 0.0
        else:
            excess = a.observed - a.expected
        if excess >= LATENCY_CRITICAL_MS:
            return "critical"
        return "major" if excess >= LATENCY_MAJOR_MS else "minor"
    if signal == "errors":
        excess = a.observed - a.expected
        if excess >= ERRORS_CRITICAL_EXCESS:
            return "critical"
        return "major" if excess >= ERRORS_MAJOR_EXCESS else "minor"
    return "critical"


class _Track:
    """Decision bookkeeping of one signal: debounce bits, anomalous run, refractory."""

    __slots__ = ("bits", "run", "since_fire")

    def __init__(self, bits: int = 0, run: int = 0, since_fire: int = 1 << 30) -> None:
        self.bits = bits
        self.run = run
        self.since_fire = since_fire

    def state(self) -> tuple[int, int, int]:
        return self.bits, self.run, min(self.since_fire, 1 << 30)


def anomaly_score(surprise: float, threshold: float) -> float:
    """Map a surprise to [0, 1] with 0.5 exactly at the threshold (backtest output)."""
    if not surprise > 0.0:
        return 0.0
    return surprise / (surprise + threshold) if math.isfinite(surprise) else 1.0


class SeriesDetector:
    """The detectors of one series (latency, errors, traffic and up to ``max_metrics``
    gauges) with warm-up, debounce, severity and protected learning."""

    def __init__(self, series: str, config: DetectorConfig | None = None) -> None:
        self.series = series
        self.config = config or DetectorConfig()
        self._detectors: dict[str, Detector] = {
            "latency": LatencyDetector(),
            "errors": ErrorRateDetector(),
            "traffic": TrafficDetector(),
        }
        self._tracks: dict[str, _Track] = {s: _Track() for s in _REQUEST_SIGNALS}
        self._recent_starts: list[float] = []
        #: surprise per signal of the last update (for backtest scores and metrics)
        self.last_scores: dict[str, float] = {}

    # -- the one call per window ---------------------------------------------------
    def update(self, window: Mapping[str, Any], *, mitigated: bool = False) -> list[Finding]:
        """Score the window on every signal, decide, then learn (see module doc)."""
        cfg = self.config
        start = as_float(window, "window_start")
        start = 0.0 if start is None else start
        self._add_metrics(window)
        assessed = {sig: det.assess(window) for sig, det in self._detectors.items()}
        self._recent_starts = ([start] + self._recent_starts)[: max(cfg.debounce_n,
                                                                    cfg.metric_debounce_n)]
        findings: list[Finding] = []
        self.last_scores = {}
        for sig, a in assessed.items():
            det = self._detectors[sig]
            is_metric = sig.startswith("metric:")
            threshold = cfg.metric_threshold if is_metric else cfg.threshold
            k, n = ((cfg.metric_debounce_k, cfg.metric_debounce_n) if is_metric
                    else (cfg.debounce_k, cfg.debounce_n))
            warm = det.n_learned >= (cfg.metric_warmup_windows if is_metric
                                     else cfg.warmup_windows)
            flagged = warm and a.score >= threshold
            self.last_scores[sig] = a.score if warm else 0.0
            track = self._tracks[sig]
            track.bits = ((track.bits << 1) | int(flagged)) & ((1 << n) - 1)
            track.run = track.run + 1 if flagged else 0
            track.since_fire += 1
            refractory = cfg.metric_refractory if is_metric else 0
            # A test that pooled j windows already carries j windows of evidence.
            evidence = max(bin(track.bits).count("1"), int(a.extra.get("pooled_windows", 1)))
            quiet = track.since_fire > refractory or (
                is_metric and a.extra.get("record", 0.0) > 0.0
                and track.since_fire > cfg.metric_record_gap)
            if flagged and evidence >= k and quiet:
                track.since_fire = 0
                findings.append(self._finding(sig, start, a, threshold, track, n, window))
            if mitigated:
                w = 0.0
            elif flagged and track.run <= cfg.relearn_after:
                w = cfg.metric_learn_weight_anomalous if is_metric else 0.0
            else:
                w = 1.0
            det.learn_one(window, w)
        return findings

    def _finding(self, sig: str, start: float, a: Assessment, threshold: float,
                 track: _Track, n: int, window: Mapping[str, Any]) -> Finding:
        windows = [s for i, s in enumerate(self._recent_starts[:n]) if track.bits >> i & 1]
        evidence: dict[str, Any] = {
            "statistic": a.statistic,
            "surprise": round(a.score, 3),
            "p_value": 10.0 ** -a.score,
            "direction": a.direction,
            "windows": sorted(windows),
            "anomalous_run": track.run,
            **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in a.extra.items()},
        }
        for key in ("version_counts", "version_errors"):
            mix = window.get(key)
            if isinstance(mix, Mapping):
                evidence[key] = {str(v): c for v, c in mix.items()}
        severity = _SEVERITIES[min(_SEVERITIES.index(severity_of(a.score, threshold)),
                                   _SEVERITIES.index(impact_severity(sig, a, window)))]
        return Finding(self.series, sig, start, a.observed, a.expected, a.score,
                       severity, evidence)

    def _add_metrics(self, window: Mapping[str, Any]) -> None:
        metrics = window.get("metrics")
        if not isinstance(metrics, Mapping):
            return
        for name in metrics:
            sig = f"metric:{name}"
            if sig in self._detectors:
                continue
            if len(self._detectors) - len(_REQUEST_SIGNALS) >= self.config.max_metrics:
                break
            if as_float(metrics, name) is None:
                continue
            self._detectors[sig] = self._new_metric(str(name))
            self._tracks[sig] = _Track()

    def _new_metric(self, name: str) -> MetricDetector:
        cfg = self.config
        return MetricDetector(name=name, z_min=cfg.metric_z_min,
                              record_margin=cfg.metric_record_margin)

    # -- compact state ----------------------------------------------------------------
    def to_state(self) -> tuple[Any, ...]:
        """(version, per-signal (name, detector state, track state), recent starts)."""
        return (
            _STATE_VERSION,
            tuple((sig, det.to_state(), self._tracks[sig].state())
                  for sig, det in self._detectors.items()),
            tuple(self._recent_starts),
        )

    def from_state(self, state: Sequence[Any]) -> None:
        """Restore ``to_state()``; raises ValueError on a state of another shape."""
        try:
            version, signals, starts = state
        except (TypeError, ValueError) as exc:
            raise ValueError(f"series state: not a 3-tuple ({exc})") from exc
        if version not in (1, _STATE_VERSION):
            raise ValueError(f"series state: version {version!r}, expected {_STATE_VERSION}")
        for sig, det_state, track_state in signals:
            if sig not in self._detectors:
                if not str(sig).startswith("metric:"):
                    raise ValueError(f"series state: unknown signal {sig!r}")
                self._detectors[sig] = self._new_metric(str(sig)[len("metric:"):])
            self._tracks[sig] = _Track(*(int(v) for v in track_state))
            if version == 1 and str(sig).startswith("metric:"):
                # A version-1 gauge state has the same length but another layout: after an
                # upgrade the gauge relearns (metric_warmup_windows) while the request
                # signals keep their baselines.
                continue
            self._detectors[sig].from_state(det_state)
        self._recent_starts = [float(s) for s in starts]

    def __getstate__(self) -> tuple[str, DetectorConfig, tuple[Any, ...]]:
        return self.series, self.config, self.to_state()

    def __setstate__(self, packed: tuple[str, DetectorConfig, tuple[Any, ...]]) -> None:
        series, config, state = packed
        self.__init__(series, config)  # type: ignore[misc]
        self.from_state(state)

    @classmethod
    def restore(cls, series: str, state: Sequence[Any],
                config: DetectorConfig | None = None) -> SeriesDetector:
        """A detector rebuilt from a stored state (what the agent does on start-up)."""
        det = cls(series, config)
        det.from_state(state)
        return det


def state_size_bytes(detector: SeriesDetector) -> int:
    """Pickled size of the per-series state (what a Faust table entry costs)."""
    return len(pickle.dumps(detector.to_state(), protocol=pickle.HIGHEST_PROTOCOL))
