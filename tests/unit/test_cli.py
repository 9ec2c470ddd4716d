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


# --------------------------------------------------------------------------- clear errors
def _one_clear_line(output: str, expected: str) -> None:
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert any(expected in line for line in lines), output
    assert len([line for line in lines if expected in line]) == 1


@pytest.mark.parametrize("args", [["incidents"], ["incidents", "show", "inc-1"],
                                  ["replay", "--topic", "windows"]])
def test_read_commands_without_kafka_say_so_in_one_line(
    args: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STANCH_KAFKA_BOOTSTRAP", "127.0.0.1:1")  # nothing listens there
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    _one_clear_line(result.output, "cannot reach Kafka at 127.0.0.1:1")


def test_second_worker_on_a_taken_web_port_is_told_which_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv("STANCH_WEB_PORT", str(port))
        monkeypatch.setenv("STANCH_DATA_DIR", str(tmp_path / "data"))
        monkeypatch.setenv("STANCH_KAFKA_BOOTSTRAP", "127.0.0.1:1")  # never reached
        result = CliRunner().invoke(cli, ["worker"])
    assert result.exit_code == 1
    _one_clear_line(result.output, f"web port {port} is already in use")
    assert "STANCH_WEB_PORT" in result.output and "STANCH_DATA_DIR" in result.output


def test_second_worker_on_a_used_data_dir_is_told_which_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl

    from app.broker import free_port

    data = tmp_path / "data"
    data.mkdir()
    with open(data / "worker.lock", "a+") as held:  # what a running worker holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242\n")
        held.flush()
        monkeypatch.setenv("STANCH_WEB_PORT", str(free_port()))
        monkeypatch.setenv("STANCH_DATA_DIR", str(data))
        monkeypatch.setenv("STANCH_KAFKA_BOOTSTRAP", "127.0.0.1:1")  # never reached
        result = CliRunner().invoke(cli, ["worker"])
    assert result.exit_code == 1
    _one_clear_line(result.output, "is in use by worker pid 4242")
    assert "STANCH_DATA_DIR" in result.output


def test_broker_is_ready_at_once_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from app.broker import free_port, port_open

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STANCH_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "broker", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )
    try:
        started = time.monotonic()
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        # was ~20 s to stop; start is the Tansu launch (~0.1 s) plus Python start-up
        assert f"listening on 127.0.0.1:{port}" in ready, ready
        assert time.monotonic() - started < 15
        assert port_open("127.0.0.1", port)
        stopping = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)  # an impatient second Ctrl-C
        out, err = proc.communicate(timeout=15)
        assert time.monotonic() - stopping < 10
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "Traceback" not in out
    assert "embedded broker stopped" in out
    assert not port_open("127.0.0.1", port)
