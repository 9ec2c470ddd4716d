"""Traffic detector: a daily cycle is normal; a 3x surge and a drop to zero are not."""

from __future__ import annotations

import math

import numpy as np

from models.detectors import TrafficDetector
from models.detectors.traffic import hour_and_day
from models.series import DetectorConfig, SeriesDetector

T0 = 1_700_006_400.0  # a Wednesday, 00:00 UTC
STEP = 60.0  # one-minute windows: 1440 per day
THRESHOLD = DetectorConfig().threshold


def expected_rate(t: float) -> float:
    hour = (t % 86400.0) / 3600.0
    return 300.0 * (1.0 + 0.6 * math.sin(2 * math.pi * (hour - 6.0) / 24.0))


def run_days(det: SeriesDetector, rng: np.random.Generator, days: int) -> list:
    found = []
    for i in range(int(days * 86400 / STEP)):
        t = T0 + i * STEP
        found += det.update({"window_start": t, "count": int(rng.poisson(expected_rate(t)))})
    return found


def test_daily_cycle_does_not_alarm() -> None:
    det = SeriesDetector("svc|/r|")
    assert [f for f in run_days(det, np.random.default_rng(1), 7) if f.signal == "traffic"] == []


def test_surge_and_drop_to_zero_are_detected_with_direction() -> None:
    det = SeriesDetector("svc|/r|")
    rng = np.random.default_rng(2)
    run_days(det, rng, 3)
    t = T0 + 3 * 86400.0 + 12 * 3600.0
    surge = [f for k in range(3) for f in det.update(
        {"window_start": t + k * STEP, "count": int(3 * rng.poisson(expected_rate(t)))})]
    assert surge and surge[0].signal == "traffic" and surge[0].evidence["direction"] == "surge"
    drop = [f for k in range(3, 6) for f in det.update({"window_start": t + k * STEP, "count": 0})]
    assert drop and drop[0].evidence["direction"] == "drop"
    assert drop[0].expected > 100


def test_seasonal_baseline_learns_the_hour() -> None:
    det = TrafficDetector()
    rng = np.random.default_rng(3)
    for i in range(int(4 * 86400 / STEP)):
        t = T0 + i * STEP
        det.learn_one({"window_start": t, "count": int(rng.poisson(expected_rate(t)))})
    for hour in (0, 6, 12, 18):
        t = T0 + hour * 3600.0 + 1800.0
        got = math.exp(det.expected_log(t)) - 1.0
        assert abs(got / expected_rate(t) - 1.0) < 0.3
    assert hour_and_day(T0) == (0, 2)
