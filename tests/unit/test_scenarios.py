"""Every scenario really injects what its label says, where and when it says it."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

import pytest

from models.fleet import Fleet, FleetConfig, default_fleet_config, series_key
from models.scenarios import SCENARIO_NAMES, Scenario, build_scenario, labels_for
from schemas.records import ScenarioLabel

ONSET = 40.0
DURATION = 40.0
TICK = 0.5


@dataclass
class Run:
    config: FleetConfig
    scenario: Scenario
    requests: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    changes: list[dict[str, Any]] = field(default_factory=list)

    def offset(self, event: dict[str, Any]) -> float:
        return event["ts"] - self.config.start_ts

    def series(self, key: str, lo: float, hi: float) -> list[dict[str, Any]]:
        """Events of one series with lo <= offset < hi."""
        return [e for e in self.requests
                if series_key(e["service"], e["route"], e.get("dependency") or "") == key
                and lo <= self.offset(e) < hi]


def simulate(name: str, seconds: float = ONSET + DURATION + 20.0, seed: int = 11,
             duration: float = DURATION, **kwargs: Any) -> Run:
    config = default_fleet_config()
    scenario = build_scenario(name, config, onset_s=ONSET, duration_s=duration, **kwargs)
    fleet = Fleet(config, scenario, seed)
    run = Run(config, scenario)
    t = config.start_ts
    while t < config.start_ts + seconds:
        out = fleet.events_between(t, t + TICK)
        for events in out.requests.values():
            run.requests.extend(events)
        run.errors.extend(out.errors)
        run.changes.extend(out.changes)
        t += TICK
    return run


def error_rate(events: list[dict[str, Any]]) -> float:
    assert events, "no events to measure"
    return sum(e["status"] >= 500 for e in events) / len(events)


def median_latency(events: list[dict[str, Any]]) -> float:
    assert events, "no events to measure"
    return statistics.median(e["latency_ms"] for e in events)


def the_label(run: Run) -> dict[str, Any]:
    labels = labels_for(run.scenario, run.config)
    assert len(labels) == 1
    ScenarioLabel.from_dict(labels[0])  # the record type accepts it
    return labels[0]


def test_clean_has_no_labels_and_names_are_checked() -> None:
    config = default_fleet_config()
    assert labels_for(build_scenario("clean", config), config) == []
    with pytest.raises(ValueError, match="unknown"):
        build_scenario("meteor-strike", config)
    with pytest.raises(ValueError, match="not a service"):
        build_scenario("latency-spike", config, service="nope")


def test_labels_carry_onset_end_and_root_cause() -> None:
    config = default_fleet_config()
    for name in SCENARIO_NAMES[1:]:
        [label] = labels_for(build_scenario(name, config, onset_s=ONSET), config)
        assert label["scenario"] == name and label["kind"] == name
        assert label["onset"] == config.start_ts + ONSET
        assert label["end"] > label["onset"]
        assert label["root_service"] in config.service_names
        assert label["affected_series"], name
        ScenarioLabel.from_dict(label)
    [deploy] = labels_for(build_scenario("bad-deploy", config), config)
    assert deploy["root_cause"] == "deploy payments v42"
    [dep] = labels_for(build_scenario("dependency-failure", config), config)
    assert dep["root_cause"] == "dependency payments"


def test_latency_spike_shows_on_the_route_and_upstream_only_inside_the_window() -> None:
    run = simulate("latency-spike")
    label = the_label(run)
    key = "payments|/charge|"
    assert key in label["affected_series"]
    assert "checkout|/charge|payments" in label["affected_series"]
    before = median_latency(run.series(key, 0, ONSET))
    during = median_latency(run.series(key, ONSET + 1, ONSET + DURATION))
    after = median_latency(run.series(key, ONSET + DURATION + 1, 1e9))
    assert during > 4.0 * before
    assert after < 1.5 * before
    egress = "checkout|/charge|payments"
    assert median_latency(run.series(egress, ONSET + 1, ONSET + DURATION)) > 3.0 * (
        median_latency(run.series(egress, 0, ONSET)))
    # a route not on the label is untouched
    other = "payments|/status|"
    assert other not in label["affected_series"]
    assert median_latency(run.series(other, ONSET + 1, ONSET + DURATION)) < 1.5 * (
        median_latency(run.series(other, 0, ONSET)))


def test_error_burst_raises_the_error_rate_tenfold() -> None:
    run = simulate("error-burst")
    label = the_label(run)
    key = "inventory|/stock|"
    assert key in label["affected_series"]
    before = run.series(key, 0, ONSET)
    during = run.series(key, ONSET, ONSET + DURATION)
    assert error_rate(during) > 0.15
    assert error_rate(during) > 10 * max(error_rate(before), 0.005)
    assert error_rate(run.series(key, ONSET + DURATION, 1e9)) < 0.03


def test_bad_deploy_hits_the_new_version_only() -> None:
    run = simulate("bad-deploy")
    label = the_label(run)
    deploy, rollback = run.changes
    assert (deploy["from_version"], deploy["to_version"]) == ("v41", "v42")
    assert deploy["ts"] == pytest.approx(label["onset"])
    assert (rollback["to_version"], rollback["ts"]) == ("v41", pytest.approx(label["end"]))
    payments = [e for e in run.requests
                if e["service"] == "payments" and not e.get("dependency")]
    new = [e for e in payments if e["version"] == "v42"]
    old_during = [e for e in payments if e["version"] == "v41"
                  and ONSET <= run.offset(e) < ONSET + DURATION]
    old_before = [e for e in payments if run.offset(e) < ONSET]
    assert all(ONSET <= run.offset(e) < ONSET + DURATION + TICK for e in new)
    assert error_rate(new) > 0.18
    assert error_rate(old_before) < 0.02
    assert error_rate(old_during) < 0.05  # old instances mid-rollout keep behaving
    by_route = [e for e in new if e["route"] == "/charge"]
    old_route = [e for e in old_before if e["route"] == "/charge"]
    assert median_latency(by_route) > 2.5 * median_latency(old_route)
    # the rollout reached every instance within a few seconds
    late = [e for e in payments if e["version"] == "v41"
            and ONSET + 8 <= run.offset(e) < ONSET + DURATION]
    assert late == []


def test_traffic_surge_multiplies_load_and_latency_follows() -> None:
    run = simulate("traffic-surge")
    label = the_label(run)
    key = "search|/search|"
    assert key in label["affected_series"]
    before = run.series(key, 0, ONSET)
    during = run.series(key, ONSET + 20, ONSET + DURATION)  # after the 15 s ramp
    rate_before = len(before) / ONSET
    rate_during = len(during) / (DURATION - 20)
    assert 3.5 * rate_before < rate_during < 7.0 * rate_before
    assert median_latency(during) > 2.0 * median_latency(before)


def test_dependency_failure_is_seen_by_every_caller() -> None:
    run = simulate("dependency-failure")
    label = the_label(run)
    for key in ("payments|/charge|", "checkout|/charge|payments", "users|/status|payments"):
        assert key in label["affected_series"]
        before = run.series(key, 0, ONSET)
        during = run.series(key, ONSET, ONSET + DURATION)
        assert error_rate(before) < 0.03, key
        assert error_rate(during) > 0.45, key
    egress = run.series("checkout|/charge|payments", ONSET, ONSET + DURATION)
    timeouts = [e for e in egress if e["status"] == 504]
    assert timeouts and min(e["latency_ms"] for e in timeouts) >= 1000.0
    assert any(e["error_type"] == "TimeoutError" and e["service"] == "payments"
               for e in run.errors)


def test_slow_degradation_creeps_up() -> None:
    duration = 120.0
    run = simulate("slow-degradation", seconds=ONSET + duration, duration=duration)
    key = "users|/users/{id}|"
    assert key in the_label(run)["affected_series"]
    baseline = median_latency(run.series(key, 0, ONSET))
    quarters = [median_latency(run.series(key, ONSET + q * 30, ONSET + (q + 1) * 30))
                for q in range(4)]
    assert quarters == sorted(quarters)
    assert quarters[0] < 1.8 * baseline
    assert quarters[-1] > 3.0 * baseline


def test_telemetry_gap_silences_the_service_but_not_its_callers() -> None:
    run = simulate("telemetry-gap")
    label = the_label(run)
    assert "inventory|/stock|" in label["affected_series"]
    own = [e for e in run.requests if e["service"] == "inventory"]
    in_gap = [e for e in own if ONSET <= run.offset(e) < ONSET + DURATION]
    assert in_gap == []
    assert [e for e in run.errors if e["service"] == "inventory"
            and ONSET <= run.offset(e) < ONSET + DURATION] == []
    assert any(run.offset(e) < ONSET for e in own)
    assert any(run.offset(e) >= ONSET + DURATION for e in own)
    # the traffic is real: callers still see their calls to inventory answered
    callers = run.series("checkout|/reserve|inventory", ONSET, ONSET + DURATION)
    assert len(callers) > 0.5 * DURATION


def test_scenarios_compose_one_after_another() -> None:
    config = default_fleet_config()
    scenario = build_scenario("latency-spike,error-burst", config, onset_s=ONSET,
                              duration_s=30.0, gap_s=60.0)
    first, second = labels_for(scenario, config)
    assert (first["kind"], second["kind"]) == ("latency-spike", "error-burst")
    assert second["onset"] == first["end"] + 60.0
    assert first["label_id"] != second["label_id"]


def test_small_fleets_fall_back_to_an_existing_target() -> None:
    config = default_fleet_config(services=3)  # gateway, checkout, payments
    for name in SCENARIO_NAMES[1:]:
        [label] = labels_for(build_scenario(name, config), config)
        assert label["root_service"] in config.service_names
        emitted = {s.name for s in config.services}
        assert all(key.split("|")[0] in emitted for key in label["affected_series"])


def test_bad_deploy_label_names_the_change_the_fleet_publishes() -> None:
    run = simulate("bad-deploy", seconds=ONSET + 1.0)
    label = the_label(run)
    [deploy] = run.changes
    assert label["details"]["change_id"] == deploy["change_id"]
    assert label["details"]["to_version"] == deploy["to_version"] == "v42"
