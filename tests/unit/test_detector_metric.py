"""Metric detector: calibrated on the series' own z-scores."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from models.detectors import MetricDetector
from models.series import DetectorConfig, SeriesDetector

CFG = DetectorConfig()


def feed(det: MetricDetector, values: np.ndarray) -> list[float]:
    out = []
    for v in values:
        x = {"metrics": {"value": float(v)}}
        out.append(det.score_one(x))
        det.learn_one(x)
    return out


def test_a_new_extreme_value_is_surprising() -> None:
    rng = np.random.default_rng(1)
    det = MetricDetector()
    feed(det, 10 + rng.standard_normal(1000))
    assert det.score_one({"metrics": {"value": 30.0}}) >= CFG.metric_threshold
    assert det.score_one({"metrics": {"value": 10.5}}) == 0.0


def test_routine_spikes_are_learned() -> None:
    rng = np.random.default_rng(2)
    values = 10 + rng.standard_normal(3000)
    values[10::20] += 15.0  # a spike every 20 windows is this series' normal
    det = MetricDetector()
    scores = feed(det, values)
    late = [s for i, s in enumerate(scores) if i > 2000 and i % 20 == 10]
    # the odd spike that also rides a noise peak may still stand out; most must not
    assert sum(s >= CFG.metric_threshold for s in late) <= 0.05 * len(late)


def test_refractory_one_finding_per_episode() -> None:
    rng = np.random.default_rng(3)
    det = SeriesDetector("svc||")
    values = np.concatenate([10 + rng.standard_normal(800), 40 + rng.standard_normal(100)])
    findings = [f for i, v in enumerate(values)
                for f in det.update({"window_start": float(i), "metrics": {"value": float(v)}})]
    assert len(findings) == 1 and findings[0].window_start == 800.0
    assert findings[0].signal == "metric:value" and findings[0].evidence["direction"] == "up"


def _x(v: float) -> dict:
    return {"metrics": {"value": v}}


def test_a_value_beyond_the_learned_range_is_a_record() -> None:
    rng = np.random.default_rng(4)
    values = 10 + rng.standard_normal(1000)
    values[500] = 30.0
    det = MetricDetector()
    feed(det, values)
    lo, hi = float(values.min()), float(values.max())
    margin = det.record_margin * (hi - lo)
    inside = det.assess(_x(29.0))  # large, but the gauge has been there
    assert inside.score > 0.0 and inside.extra["record"] == 0.0
    assert det.assess(_x(hi + 0.5 * margin)).extra["record"] == 0.0  # within the margin
    above = det.assess(_x(hi + 2.0 * margin))
    assert above.score > 0.0 and above.extra["record"] == 1.0
    below = det.assess(_x(lo - 20.0))
    assert below.score > 0.0 and below.extra["record"] == 1.0 and below.direction == "down"
    # a window not learned (w=0: flagged request signal, mitigated series) does not widen it
    det.learn_one(_x(100.0), w=0.0)
    assert det.assess(_x(60.0)).extra["record"] == 1.0
    with pytest.raises(ValueError, match="record_margin"):
        MetricDetector(record_margin=-0.1)


def _findings(values: np.ndarray, config: DetectorConfig | None = None) -> list:
    det = SeriesDetector("svc||", config)
    return [f for i, v in enumerate(values)
            for f in det.update({"window_start": float(i), "metrics": {"value": float(v)}})]


def test_a_record_escapes_the_refractory_and_a_repeat_does_not() -> None:
    rng = np.random.default_rng(5)
    values = 10 + rng.standard_normal(1000)
    values[800] = 30.0  # a finding: opens the refractory
    values[830] = 30.0  # as large again: the same episode, silent
    values[860] = 60.0  # beyond anything this gauge has shown: news, even now
    values[865] = 90.0  # a record again, but within metric_record_gap of that finding
    found = _findings(values)
    assert [f.window_start for f in found] == [800.0, 860.0]
    assert found[1].evidence["record"] == 1.0
    # metric_record_gap >= metric_refractory turns the escape off
    off = _findings(values, DetectorConfig(metric_record_gap=CFG.metric_refractory))
    assert [f.window_start for f in off] == [800.0]


def run_series(values: np.ndarray, step_s: float = 300.0, t0: float = 1_700_000_000.0,
               ) -> list:
    det = SeriesDetector("svc||")
    return [f for i, v in enumerate(values)
            for f in det.update({"window_start": t0 + step_s * i,
                                 "metrics": {"value": float(v)}})]


def test_a_missing_daily_peak_is_found_by_the_time_of_day_predictor() -> None:
    # 5-minute gauge, high (80) for 8 hours a day, low (20) otherwise; day 12 has no peak
    rng = np.random.default_rng(4)
    per_day = 288
    hours = (np.arange(14 * per_day) % per_day) / 12.0
    values = np.where((hours >= 8) & (hours < 16), 80.0, 20.0) + rng.standard_normal(hours.size)
    missing = slice(12 * per_day + 8 * 12, 12 * per_day + 16 * 12)
    values[missing] = 20.0 + rng.standard_normal(values[missing].size)
    findings = run_series(values)
    starts = [int((f.window_start - 1_700_000_000.0) / 300.0) for f in findings]
    assert any(missing.start <= s < missing.stop for s in starts)
    assert all(s >= missing.start for s in starts if s >= 3 * per_day)  # quiet before it
    hit = next(f for f, s in zip(findings, starts, strict=True) if s >= missing.start)
    assert hit.evidence["statistic"].endswith("time_of_day")


def test_a_sustained_moderate_shift_is_found_by_the_likelihood_path() -> None:
    # +3.5 sd for 60 windows: never z >= z_min on a single window, but a sustained change
    rng = np.random.default_rng(5)
    values = 10 + rng.standard_normal(1500)
    values[1000:1060] += 3.5
    findings = run_series(values)
    assert [f.window_start for f in findings if f.window_start < 1_700_000_000.0 + 300 * 1000]\
        == []
    first = findings[0]
    assert 1000 <= (first.window_start - 1_700_000_000.0) / 300 < 1020
    assert first.evidence["statistic"].startswith("likelihood")


def test_a_gaussian_gauge_stays_quiet() -> None:
    rng = np.random.default_rng(6)
    assert run_series(50 + 5 * rng.standard_normal(20_000), step_s=1.0) == []


def test_state_is_small_numbers_and_round_trips() -> None:
    rng = np.random.default_rng(7)
    det = MetricDetector()
    stamps = 1_700_000_000.0 + 300.0 * np.arange(400)
    for t, v in zip(stamps, rng.standard_normal(400), strict=True):
        det.learn_one({"window_start": float(t), "metrics": {"value": float(v)}})
    state = det.to_state()
    assert len(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)) <= 400
    clone = MetricDetector()
    clone.from_state(state)
    probe = {"window_start": float(stamps[-1] + 300.0), "metrics": {"value": 9.0}}
    assert clone.assess(probe) == det.assess(probe)


def test_a_spike_at_the_same_time_every_day_becomes_routine() -> None:
    # 5-minute gauge with one spike a day at 03:10 (a nightly job) and one off-schedule
    # spike on day 11 at 15:00: the nightly spike stops being reported once it was
    # surprising at that time of day on each of the two previous days; the other is found.
    rng = np.random.default_rng(8)
    per_day = 288
    values = 1.0 + 0.05 * rng.standard_normal(13 * per_day)
    nightly = [d * per_day + 38 for d in range(13)]
    values[nightly] = 3.0
    off = 11 * per_day + 180
    values[off] = 3.0
    findings = run_series(values)
    starts = [int((f.window_start - 1_700_000_000.0) / 300.0) for f in findings]
    late_nightly = [s for s in starts if s in nightly and s >= 5 * per_day]
    assert late_nightly == []
    assert off in starts


def test_recurrence_marks_round_trip_and_bound() -> None:
    det = MetricDetector()
    stamps = 1_700_000_000.0 + 300.0 * np.arange(3 * 288)
    for i, t in enumerate(stamps):
        v = 5.0 if i % 288 == 40 else 1.0 + 0.01 * (i % 5)
        det.learn_one({"window_start": float(t), "metrics": {"value": v}})
    clone = MetricDetector()
    clone.from_state(det.to_state())
    assert clone.to_state() == det.to_state()
    with pytest.raises(ValueError, match="recur_days"):
        MetricDetector(season_buckets=16, recur_days=3)


def test_start_up_z_does_not_enter_the_calibration() -> None:
    # The first windows' z is measured against a variance of a few values (the second
    # value is "thousands of sd" from the first). Kept in the histogram, those z would
    # sit in its top bins for ~1,000 windows, so the first genuine spike of that size
    # would look as if it had happened before.
    rng = np.random.default_rng(11)
    values = 10 + rng.standard_normal(600)
    det, old = MetricDetector(), MetricDetector(calibrate_after=1)
    feed(det, values)
    feed(old, values)
    assert sum(old._hist) > sum(det._hist)  # the start-up z of the old rule
    total = det._total()
    assert total == pytest.approx((1 - 0.999 ** (600 - 20)) / 0.001)
    z = det._zs(40.0, None)[0]
    assert 30.0 <= z < 33.0  # a size this series has never shown (top bin)
    # tail path: never seen, so the tail is the prior alone and the surprise is the most
    # this history allows; the old rule counted the start-up z as earlier spikes
    tail_new, tail_old = det._surprises(z)[0], old._surprises(z)[0]
    assert tail_new == pytest.approx(np.log10((total + 0.5) / 0.5))
    assert tail_new > tail_old + 0.25
    with pytest.raises(ValueError, match="calibrate_after"):
        MetricDetector(calibrate_after=0)
