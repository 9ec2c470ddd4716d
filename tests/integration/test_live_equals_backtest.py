"""The live detector agent on a real broker emits exactly the anomalies the offline code
(models.backtest / the pure SeriesDetector) finds on the same windows."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from app.settings import Settings
from models import sketch as sk
from models.backtest import SIGNAL, score_series
from models.series import SeriesDetector
from schemas.records import WindowSummary
from tests.integration.test_detection_pipeline import consume_until, produce
from tests.processes import start_worker

T0 = 1_700_000_000.0
N = 400


def metric_windows(rng: np.random.Generator) -> list[dict[str, Any]]:
    """A NAB-like gauge with a level shift: windows that carry only ``metrics``."""
    values = rng.normal(50.0, 2.0, N)
    values[300:] += 40.0
    return [
        {"service": "gauge", "route": "/cpu", "window_start": T0 + 60.0 * i, "window_s": 60.0,
         "count": 0, "errors": 0, "sketch": sk.empty(), "p50": None, "p90": None,
         "p99": None, "metrics": {"value": round(float(v), 4)}}
        for i, v in enumerate(values)
    ]


def request_windows(rng: np.random.Generator) -> list[dict[str, Any]]:
    """Request windows with a 5x latency spike and, later, a 10x error rate."""
    out = []
    for i in range(N):
        count = int(rng.poisson(300))
        scale = 5.0 if 200 <= i < 210 else 1.0
        rate = 0.2 if 300 <= i < 310 else 0.02
        lat = rng.lognormal(3.0, 0.4, count) * scale
        s = sk.build(lat)
        p50, p90, p99 = sk.quantiles(s, (0.5, 0.9, 0.99))
        out.append({
            "service": "shop", "route": "/buy", "window_start": T0 + float(i), "window_s": 1.0,
            "count": count, "errors": int(rng.binomial(count, rate)), "sketch": s,
            "p50": p50, "p90": p90, "p99": p99, "version_counts": {"v1": count},
        })
    return out


def offline_ids(windows: list[dict[str, Any]]) -> set[str]:
    series = WindowSummary.from_dict(windows[0]).series
    det = SeriesDetector(series)
    ids = set()
    for w in windows:
        for f in det.update(WindowSummary.from_dict(w).to_dict()):
            ids.add(f.id)
    return ids


@pytest.mark.integration
def test_live_pipeline_emits_the_backtest_anomalies(topics: Settings, tmp_path: Path) -> None:
    settings = topics
    rng = np.random.default_rng(2024)
    gauge, shop = metric_windows(rng), request_windows(rng)
    expected = offline_ids(gauge) | offline_ids(shop)
    # the backtest command's scorer labels the same gauge rows
    _, labels = score_series([w["window_start"] for w in gauge],
                             [w["metrics"]["value"] for w in gauge])
    backtest_starts = {w["window_start"] for w, lab in zip(gauge, labels, strict=True) if lab}
    assert backtest_starts, "the injected level shift must be found offline"
    assert any("|latency|" in i for i in expected) and any("|errors|" in i for i in expected)

    messages = []
    for windows in (gauge, shop):
        series = WindowSummary.from_dict(windows[0]).series.encode()
        for i in range(0, N, 25):  # arrays of summaries, as the aggregation agent sends
            messages.append((series, orjson.dumps(windows[i:i + 25])))
    worker = start_worker(settings, tmp_path / "worker.log")
    try:
        asyncio.run(produce(settings, "windows", messages))
        anomalies = asyncio.run(consume_until(
            settings, "anomalies", lambda vs: {a["id"] for a in vs} >= expected,
            timeout=45, quiet_s=2.0))
        assert worker.proc.poll() is None
    finally:
        worker.stop()

    live = {a["id"] for a in anomalies}
    assert live == expected
    live_gauge = {a["window_start"] for a in anomalies if a["signal"] == SIGNAL}
    assert live_gauge == backtest_starts
