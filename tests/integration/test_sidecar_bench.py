"""The sidecar benchmark runs end to end and reports the figures the issue asks for.

Durations are tiny: this proves the measurement machinery (processes, both load
generators, telemetry through the real broker), not the performance targets, which are
machine-dependent and reported by `stanch bench sidecar --json`.
"""

from __future__ import annotations

import math

import pytest

from app.bench_sidecar import run_bench
from app.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_bench_reports_added_latency_and_max_rps(topics: Settings) -> None:
    result = run_bench(topics, rate=300, duration_s=1.0, concurrency=8, max_duration_s=1.0)
    assert result["telemetry_kafka"] == "configured"
    for key in ("added_p50_ms", "added_p99_ms", "max_rps", "direct_max_rps"):
        assert isinstance(result[key], float) and math.isfinite(result[key])
    assert result["max_rps"] > 100
    assert result["max_rps_errors"] == 0
    assert result["direct"]["errors"] == 0 and result["sidecar"]["errors"] == 0
    assert result["sidecar"]["requests"] == 300
    assert result["telemetry"]["connected"] is True
    assert result["telemetry"]["published"] > 0
    assert result["telemetry"]["dropped"] == 0
