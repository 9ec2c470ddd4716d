"""SeriesDetector: quiet on a long clean series, compact state, config validation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.detectors import MetricDetector
from models.series import DetectorConfig, SeriesDetector, anomaly_score, state_size_bytes
from tests.unit.test_detector_contract import GAMMA

T0 = 1_700_000_000.0
LOG_GAMMA = math.log(GAMMA)


def clean_windows(seed: int, n: int, rate: float = 30.0):
    """n one-second windows of a healthy service (vectorised; ~10 µs per window)."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(rate, n)
    lat = 20.0 * np.exp(0.3 * rng.standard_normal(int(counts.sum())))
    idx = np.ceil(np.log(lat) / LOG_GAMMA).astype(int)
    errors = rng.binomial(counts, 0.01)
    cpu = 50 + 5 * rng.standard_normal(n)
    ends = np.cumsum(counts)
    starts = ends - counts
    for i in range(n):
        c = int(counts[i])
        sl = lat[starts[i]:ends[i]]
        bins: dict[str, int] = {}
        for b in idx[starts[i]:ends[i]].tolist():
            bins[str(b)] = bins.get(str(b), 0) + 1
        srt = np.sort(sl)
        yield {
            "service": "svc", "route": "/r", "window_start": T0 + i, "window_s": 1.0,
            "count": c, "errors": int(errors[i]),
            "p50": float(srt[int(0.5 * (c - 1))]) if c else 0.0,
            "p90": float(srt[int(0.9 * (c - 1))]) if c else 0.0,
            "p99": float(srt[int(0.99 * (c - 1))]) if c else 0.0,
            "sketch": {"relative_accuracy": 0.01, "zero_count": 0, "bins": bins},
            "metrics": {"cpu": float(cpu[i])},
        }


def test_a_clean_day_of_one_second_windows_raises_nothing() -> None:
    det = SeriesDetector("svc|/r|")
    found = []
    for w in clean_windows(seed=21, n=86_400):
        found += det.update(w)
    assert found == []


def test_state_stays_within_budget_with_all_signals_and_max_metrics() -> None:
    det = SeriesDetector("svc|/r|", DetectorConfig())
    for i, w in enumerate(clean_windows(seed=22, n=500)):
        w["metrics"] = {f"gauge_{j}": float(i % 7 + j) for j in range(12)}
        det.update(w)
    n_metrics = sum(1 for s in det.last_scores if s.startswith("metric:"))
    assert n_metrics == DetectorConfig().max_metrics
    assert state_size_bytes(det) <= 2048


def test_mitigated_series_does_not_learn() -> None:
    det = SeriesDetector("svc|/r|")
    windows = list(clean_windows(seed=23, n=300))
    for w in windows[:200]:
        det.update(w)
    before = det.to_state()
    for w in windows[200:]:
        det.update(w, mitigated=True)
    after = det.to_state()
    # only the short pooling memories and bookkeeping move, never the baselines
    lat_b, lat_a = before[1][0][1], after[1][0][1]
    assert lat_b[:7] == lat_a[:7]


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="debounce_k"):
        DetectorConfig(debounce_k=4, debounce_n=3)
    with pytest.raises(ValueError, match="threshold"):
        DetectorConfig(threshold=0)
    with pytest.raises(ValueError, match="warmup_windows"):
        DetectorConfig(warmup_windows=-1)


def test_config_rejects_a_negative_record_rule() -> None:
    with pytest.raises(ValueError, match="metric_record_gap"):
        DetectorConfig(metric_record_gap=-1)
    with pytest.raises(ValueError, match="metric_record_margin"):
        DetectorConfig(metric_record_margin=-0.5)


def test_a_version_1_state_keeps_request_baselines_and_restarts_gauges() -> None:
    # Version 2 changed the gauge layout (same length): after an upgrade the stored
    # request baselines are kept and the gauges relearn rather than being misread.
    det = SeriesDetector("svc|/r|")
    for w in clean_windows(seed=24, n=300):
        det.update(w)
    version, signals, starts = det.to_state()
    assert version == 2
    restored = SeriesDetector.restore("svc|/r|", (1, signals, starts))
    before = {sig: state for sig, state, _ in signals}
    after = {sig: state for sig, state, _ in restored.to_state()[1]}
    for sig in ("latency", "errors", "traffic"):
        assert after[sig] == before[sig]
    assert after["metric:cpu"] == MetricDetector(name="cpu").to_state() != before["metric:cpu"]
    with pytest.raises(ValueError, match="version"):
        SeriesDetector.restore("svc|/r|", (3, signals, starts))


def test_anomaly_score_is_half_at_threshold() -> None:
    assert anomaly_score(7.0, 7.0) == 0.5
    assert anomaly_score(0.0, 7.0) == 0.0
    assert 0.5 < anomaly_score(20.0, 7.0) < 1.0


def _latency_windows(rng: np.random.Generator, n: int, p99_ms: float, t0: float) -> list[dict]:
    """Windows of a healthy, busy route whose p99 is ``p99_ms`` (log-normal latency)."""
    from models import sketch as sk

    out = []
    for i in range(n):
        lat = (p99_ms / math.exp(0.3 * 2.326)) * np.exp(0.3 * rng.standard_normal(200))
        s = sk.build(lat)
        p50, p90, p99 = sk.quantiles(s, (0.5, 0.9, 0.99))
        out.append({"service": "svc", "route": "/r", "window_start": t0 + i, "window_s": 1.0,
                    "count": 200, "errors": 0, "sketch": s, "p50": p50, "p90": p90,
                    "p99": p99})
    return out


def test_a_small_certain_latency_move_is_not_critical() -> None:
    """10 -> 18 ms p99 on a healthy route: found (it is certain), but minor - users do not
    notice 8 ms; a move of seconds on the same route is critical."""
    rng = np.random.default_rng(3)
    det = SeriesDetector("svc|/r|")
    for w in _latency_windows(rng, 300, 10.0, T0):
        det.update(w)
    found = [f for w in _latency_windows(rng, 10, 18.0, T0 + 300) for f in det.update(w)
             if f.signal == "latency"]
    assert found and all(f.severity == "minor" for f in found)
    assert found[0].score >= 2 * DetectorConfig().threshold  # statistically "critical"

    det = SeriesDetector("svc|/r|")
    for w in _latency_windows(rng, 300, 10.0, T0):
        det.update(w)
    slow = [f for w in _latency_windows(rng, 10, 3000.0, T0 + 300) for f in det.update(w)
            if f.signal == "latency"]
    assert slow and slow[0].severity == "critical"
