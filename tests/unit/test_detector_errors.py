"""Error-rate detector: respects the count, fast on a 10x error rate."""

from __future__ import annotations

import numpy as np

from models.detectors import ErrorRateDetector
from models.series import DetectorConfig, SeriesDetector
from tests.unit.test_detector_contract import window

T0 = 1_700_000_000.0
THRESHOLD = DetectorConfig().threshold


def learned(rate: float = 0.01, count: int = 40, n: int = 300) -> ErrorRateDetector:
    rng = np.random.default_rng(0)
    det = ErrorRateDetector()
    for _ in range(n):
        det.learn_one({"count": count, "errors": int(rng.binomial(count, rate))})
    return det


def test_three_of_four_is_not_three_hundred_of_four_hundred() -> None:
    det = learned()
    assert det.score_one({"count": 4, "errors": 3}) < THRESHOLD
    assert det.score_one({"count": 400, "errors": 300}) >= THRESHOLD


def test_zero_error_baseline_does_not_alarm_on_one_error() -> None:
    det = learned(rate=0.0)
    assert det.score_one({"count": 40, "errors": 1}) == 0.0
    assert det.score_one({"count": 40, "errors": 2}) < THRESHOLD


def windows_to_detection(seed: int, rate: float = 200.0) -> int | None:
    rng = np.random.default_rng(seed)
    det = SeriesDetector("svc|/r|")
    for i in range(400):
        assert det.update(window(rng, T0 + i, rate=rate, err=0.01)) == []
    for j in range(1, 11):
        found = det.update(window(rng, T0 + 400 + j, rate=rate, err=0.10))
        if any(f.signal == "errors" for f in found):
            return j
    return None


def test_10x_error_rate_detected_within_3_windows_p99() -> None:
    # 200 requests per window, 1 % -> 10 %: ~2 errors expected per window, ~20 observed.
    # (At 100 per window the p99 is 4 windows: binomial draws of 3-4 errors of 100 at a
    # 10 % rate happen, and no test at a ~1e-6 false-alarm rate can call those early.)
    delays = [windows_to_detection(seed) for seed in range(40)]
    assert None not in delays
    assert float(np.percentile(delays, 99)) <= 3


def test_finding_carries_evidence_and_version_mix() -> None:
    rng = np.random.default_rng(3)
    det = SeriesDetector("svc|/r|")
    for i in range(300):
        det.update(window(rng, T0 + i))
    found: list = []
    for j in range(5):
        w = window(rng, T0 + 300 + j, err=0.6)
        w["version_counts"] = {"v1": 10, "v2": w["count"] - 10}
        found += [f for f in det.update(w) if f.signal == "errors"]
    f = found[0]
    assert f.observed > f.expected
    assert f.evidence["statistic"] == "binomial_error_count"
    assert f.evidence["version_counts"]["v1"] == 10
    assert f.evidence["windows"] and f.evidence["p_value"] < 1e-7
    assert f.id == f"svc|/r||errors|{f.window_start:.3f}"
    assert f.severity in ("minor", "major", "critical")
