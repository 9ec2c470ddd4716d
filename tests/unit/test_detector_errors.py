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


def low_volume_burst_delay(seed: int) -> tuple[int | None, float]:
    """A 0.3 % -> 20 % error burst at ~7 requests per window (the simulator's error-burst
    at a tenth of its default traffic): (windows to the finding, baseline after 30)."""
    rng = np.random.default_rng(seed)
    det = SeriesDetector("svc|/r|")
    for i in range(300):
        assert det.update(window(rng, T0 + i, rate=7.0, err=0.003)) == []
    errors = det._detectors["errors"]
    first = None
    for j in range(1, 31):
        found = det.update(window(rng, T0 + 300 + j, rate=7.0, err=0.2))
        if first is None and any(f.signal == "errors" for f in found):
            first = j
    return first, errors.baseline_rate()  # type: ignore[attr-defined]


def test_low_volume_burst_is_not_learned_before_it_is_flagged() -> None:
    # Before the learning guard the baseline climbed from 1 % to ~5 % while every window
    # of the burst was still below the threshold, and the burst was never flagged.
    results = [low_volume_burst_delay(seed) for seed in range(20)]
    delays = [d for d, _ in results]
    assert None not in delays, delays
    assert float(np.percentile(delays, 90)) <= 15
    assert max(rate for _, rate in results) < 0.02


def test_guard_keeps_learning_a_clean_baseline() -> None:
    """A clean series is almost never suspicious: with and without the guard, the
    baseline of a noisy 5 % series (40 requests per window) tracks the same rate."""
    rng = np.random.default_rng(5)
    guarded, plain = ErrorRateDetector(), ErrorRateDetector(guard_surprise=float("inf"))
    samples: list[tuple[float, float]] = []
    for i in range(6000):
        x = {"count": 40, "errors": int(rng.binomial(40, 0.05))}
        guarded.learn_one(x)
        plain.learn_one(x)
        if i >= 1000 and i % 50 == 0:
            samples.append((guarded.baseline_rate(), plain.baseline_rate()))
    mean_guarded = float(np.mean([g for g, _ in samples]))
    mean_plain = float(np.mean([p for _, p in samples]))
    assert abs(mean_plain - 0.05) < 0.003
    assert abs(mean_guarded - mean_plain) < 0.002, (mean_guarded, mean_plain)


def _low_volume(rng: np.random.Generator, n: int, err: float, t0: float) -> list[dict]:
    """Windows of a route at 1 request/s: one request per one-second window."""
    out = []
    t = t0
    while len(out) < n:
        t += 1.0
        w = window(rng, t, rate=1.0)
        if w["count"] == 1:
            out.append({**w, "errors": int(rng.binomial(w["count"], err))})
    return out


def test_one_request_per_second_failing_entirely_is_found_by_the_run_pool() -> None:
    rng = np.random.default_rng(4)
    det = SeriesDetector("svc|/r|")
    history = _low_volume(rng, 300, 0.005, T0)
    for w in history:
        assert det.update(w) == []
    # 30 s of 100 % errors
    burst = _low_volume(rng, 30, 1.0, history[-1]["window_start"])
    found = []
    for i, w in enumerate(burst):
        found += [(i, f) for f in det.update(w) if f.signal == "errors"]
    assert found, "the low-volume outage must be found"
    first, f = found[0]
    assert first <= 8  # min_errors = 5 windows, plus the debounce's slack
    assert f.evidence["pooled_windows"] > 3  # the run pool, not a 1-3 window pool
    # without the run pool (the 1-3 window pools alone) nothing would have been found
    fixed_only = ErrorRateDetector(max_run_windows=3)
    for w in history:
        fixed_only.learn_one(w)
    scores = []
    for w in burst:
        scores.append(fixed_only.score_one(w))
        fixed_only.learn_one(w)
    assert max(scores) < THRESHOLD


def test_a_quiet_low_volume_route_raises_nothing() -> None:
    rng = np.random.default_rng(8)
    det = SeriesDetector("svc|/r|")
    found = []
    for w in _low_volume(rng, 20_000, 0.01, T0):
        found += [f for f in det.update(w) if f.signal == "errors"]
    assert found == []


def test_a_seven_number_state_restores_with_an_empty_run() -> None:
    det = learned()
    old = det.to_state()[:7]
    restored = ErrorRateDetector()
    restored.from_state(old)
    assert restored.to_state()[:7] == old and restored.to_state()[7:] == (0, 0, 0)
