"""Done-when scenarios, driven by the simulated fleet through the whole pipeline on the
real broker: requests -> aggregation -> detection -> incidents -> mitigation -> signed
commands, which the fleet verifies and applies (app.demo.run_closed_loop plays the
sidecars). For each scenario: the right commands and nothing else.

The storm (many unrelated services anomalous at once) has no simulator scenario; it is
driven with published anomalies in test_incident_agents.py, like approval and pause."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from agents.mitigation import local_keys_dir
from app.demo import run_closed_loop
from app.incidents_cli import build_views, read_topic
from app.settings import Settings
from tests.integration.test_incident_agents import policy_settings, start_decider

pytestmark = pytest.mark.integration

SPEED = 8.0  # faster and the pipeline lags the fleet on a shared 2-core machine
ONSET_S = 130.0  # the detectors learn for 120 windows first


def closed_loop(settings: Settings, tmp_path: Path, scenario: str, after_onset_s: float,
                ) -> tuple[dict[str, Any], list[dict], list[dict]]:
    worker = start_decider(settings, tmp_path / "worker.log")
    try:
        summary = asyncio.run(run_closed_loop(
            settings, scenario, 1, SPEED, ONSET_S, ONSET_S + after_onset_s,
            local_keys_dir(settings), lambda line: None))
    finally:
        worker.stop()
    commands = asyncio.run(read_topic(settings, "commands"))
    entries = asyncio.run(read_topic(settings, "incidents"))
    return summary, commands, entries


def kinds(commands: list[dict]) -> list[tuple[str, str, str]]:
    return [(c["kind"], c["service"], c["target"]) for c in commands]


def test_bad_deploy_rolls_back_to_the_previous_version(topics: Settings,
                                                       tmp_path: Path) -> None:
    summary, commands, entries = closed_loop(topics, tmp_path, "bad-deploy", 60.0)
    assert kinds(commands) == [("rollback", "payments", "v41")]
    assert summary["acks"]["applied"] == 1
    assert summary["time_to_mitigate_s"] is not None and summary["time_to_mitigate_s"] <= 15
    assert summary["errors_avoided"] > 0


def test_traffic_surge_throttles_then_restores_in_steps(topics: Settings,
                                                        tmp_path: Path) -> None:
    """search's load rises 5x over 15 s for 90 s: the traffic detector flags the surge,
    search is throttled (callers' failures on it are a symptom, never isolated), and once
    stable the cap is ramped up step by step, then removed. Nothing else is issued."""
    summary, commands, entries = closed_loop(topics, tmp_path, "traffic-surge", 250.0)
    assert commands, "no command"
    assert {(k, s) for k, s, _ in kinds(commands)} <= {("throttle", "search"),
                                                        ("restore", "search")}, kinds(commands)
    assert commands[0]["kind"] == "throttle"
    ramp: dict[tuple[str, Any], list[float]] = {}
    for c in commands:
        if c["kind"] == "throttle" and "restore step" in c["reason"]:
            ramp.setdefault((c["target"], c["params"].get("route")), []).append(
                c["params"]["rate_per_s"])
    assert ramp, "no restore step"
    for target, rates in ramp.items():
        assert len(rates) >= 2 and rates == sorted(rates), \
            f"restore ramps the cap of {target} up step by step: {rates}"
    assert commands[-1]["kind"] == "restore"
    restored = {(c["target"], c["params"].get("route")) for c in commands
                if c["kind"] == "restore"}
    assert set(ramp) <= restored, "every ramped throttle is removed at the end"
    assert summary["acks"]["rejected"] == 0


def test_dependency_failure_is_one_incident_isolated_at_its_callers(
        topics: Settings, tmp_path: Path) -> None:
    summary, commands, entries = closed_loop(topics, tmp_path, "dependency-failure", 120.0)
    isolates = {(s, t) for k, s, t in kinds(commands) if k == "isolate"}
    assert isolates, kinds(commands)
    assert {t for _, t in isolates} == {"payments"}, "the dependency is isolated"
    assert {k for k, _, _ in kinds(commands)} <= {"isolate", "restore"}
    with_commands = {c["incident_id"] for c in commands}
    assert len(with_commands) == 1
    views = build_views(entries)
    (incident,) = [views[i] for i in with_commands]
    assert incident.root_service == "payments"
    assert {s for s, _ in isolates} <= set(incident.services)


def test_clean_fleet_gets_no_command(topics: Settings, tmp_path: Path) -> None:
    summary, commands, entries = closed_loop(topics, tmp_path, "clean", 60.0)
    assert commands == []


def test_telemetry_gap_escalates_without_command(topics: Settings, tmp_path: Path) -> None:
    """inventory's telemetry stops for 60 s while its callers keep reporting calls to
    it: escalated to humans as a telemetry gap (silence is not health), no command."""
    summary, commands, entries = closed_loop(topics, tmp_path, "telemetry-gap", 60.0)
    assert commands == []
    views = build_views(entries)
    gaps = [v for v in views.values() if v.root_service == "inventory"
            and v.state == "escalated"
            and any(e["entry"] == "escalated" and e["reason"].startswith("telemetry gap")
                    for e in v.entries)]
    assert gaps, [(v.id, v.state, v.entries[-1]["reason"]) for v in views.values()]
    assert not any(e["entry"] == "command" for e in entries)


def test_dry_run_issues_no_command(topics: Settings, tmp_path: Path) -> None:
    settings = policy_settings(topics, tmp_path, "[safeguards]\ndry_run = true\n")
    summary, commands, entries = closed_loop(settings, tmp_path, "bad-deploy", 40.0)
    assert commands == []
    assert any(e["reason"].startswith("dry-run: would rollback payments") for e in entries)
