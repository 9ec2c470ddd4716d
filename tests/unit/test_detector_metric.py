"""Metric detector: calibrated on the series' own z-scores."""

from __future__ import annotations

import numpy as np

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
