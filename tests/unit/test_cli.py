"""The command line: every DESIGN.md command is listed, bad settings stop with a message."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from click.testing import CliRunner

from app.cli import cli

DESIGN_COMMANDS = [
    "broker", "worker", "sidecar", "simulate", "demo", "replay", "backtest",
    "incidents", "approve", "pause", "resume", "bench",
]


def test_help_lists_every_design_command() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    listed = {line.split()[0] for line in result.output.splitlines()[1:] if line.startswith("  ")}
    assert set(DESIGN_COMMANDS) <= listed


def test_bad_setting_stops_with_the_variable_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STANCH_PARTITIONS", "-3")
    result = CliRunner().invoke(cli, ["replay", "--topic", "changes"])
    assert result.exit_code == 2
    assert "STANCH_PARTITIONS" in result.output


def test_backtest_writes_scored_csv_at_the_same_relative_path(tmp_path: Path) -> None:
    source = tmp_path / "in" / "cat"
    source.mkdir(parents=True)
    rows = [
        f"2024-01-01 {h:02d}:{m:02d}:00,{(h * 60 + m) % 7}" for h in range(10) for m in range(60)
    ]
    (source / "series.csv").write_text("timestamp,value\r\n" + "\r\n".join(rows) + "\r\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["backtest", "--input", str(tmp_path / "in"),
                                      "--output", str(out)])
    assert result.exit_code == 0, result.output
    with open(out / "cat" / "series.csv", newline="") as handle:
        written = list(csv.DictReader(handle))
    assert len(written) == len(rows)
    assert list(written[0]) == ["timestamp", "value", "anomaly_score", "label"]
    assert all(0.0 <= float(r["anomaly_score"]) <= 1.0 for r in written)
    assert {r["label"] for r in written} <= {"0", "1"}


def test_worker_with_a_bad_policy_stops_before_connecting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[throttle]\nheadroom = "lots"\n')
    monkeypatch.setenv("STANCH_POLICY_FILE", str(policy))
    monkeypatch.setenv("STANCH_KAFKA_BOOTSTRAP", "127.0.0.1:1")  # never reached
    result = CliRunner().invoke(cli, ["worker"])
    assert result.exit_code == 2
    assert "throttle.headroom" in result.output
