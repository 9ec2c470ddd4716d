"""Backtest: the live SeriesDetector over NAB-format CSV files."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from app.backtest import run_backtest
from models.backtest import SIGNAL, parse_timestamp, score_series
from models.series import SeriesDetector


def rows(n: int = 1200, spike_at: int | None = 1000) -> tuple[list[str], list[float]]:
    rng = np.random.default_rng(5)
    stamps = [f"2014-04-{1 + i // 288:02d} {(i % 288) // 12:02d}:{(i % 12) * 5:02d}:00"
              for i in range(n)]
    values = (50 + rng.standard_normal(n)).tolist()
    if spike_at is not None:
        values[spike_at] = 90.0
    return stamps, values


def test_timestamps_are_utc() -> None:
    assert parse_timestamp("1970-01-02 00:00:00") == 86400.0
    with pytest.raises(ValueError, match="timestamp"):
        parse_timestamp("yesterday")


def test_score_series_flags_the_spike_and_matches_the_live_detector() -> None:
    stamps, values = rows()
    scores, labels = score_series(stamps, values)
    assert labels[1000] == 1 and sum(labels[:1000]) == 0
    assert all(0.0 <= s <= 1.0 for s in scores) and scores[1000] > 0.5
    live = SeriesDetector("live||")
    live_labels = [int(any(f.signal == SIGNAL for f in live.update(
        {"window_start": parse_timestamp(t), "metrics": {"value": v}})))
        for t, v in zip(stamps, values, strict=True)]
    assert live_labels == labels


def test_run_backtest_writes_same_relative_paths(tmp_path: Path) -> None:
    stamps, values = rows()
    src = tmp_path / "in" / "cat"
    src.mkdir(parents=True)
    with (src / "a.csv").open("w", newline="") as fh:
        fh.write("timestamp,value\r\n")
        fh.writelines(f"{t},{v}\r\n" for t, v in zip(stamps, values, strict=True))
    (src / "bad.csv").write_text("when,what\n1,2\n")
    summary = run_backtest(tmp_path / "in", tmp_path / "out")
    assert summary["files"] == 1 and summary["rows"] == len(stamps)
    assert summary["anomalies"] >= 1
    assert summary["errors"][0]["file"].endswith("bad.csv")
    with (tmp_path / "out" / "cat" / "a.csv").open() as fh:
        out = list(csv.DictReader(fh))
    assert list(out[0]) == ["timestamp", "value", "anomaly_score", "label"]
    assert [r["timestamp"] for r in out] == stamps
    assert out[1000]["label"] == "1"
