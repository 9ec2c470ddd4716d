"""The simulated fleet: deterministic traffic, a diurnal curve, consistent calls between
services, and reactions to enforcement commands."""

from __future__ import annotations

import statistics
from typing import Any

import pytest

from models.fleet import (
    Call,
    Fleet,
    FleetConfig,
    FleetOutput,
    RouteSpec,
    ServiceSpec,
    default_fleet_config,
    diurnal_factor,
    series_key,
)
from models.scenarios import SCENARIO_NAMES, Scenario, build_scenario, labels_for
from schemas.records import ChangeEvent, ErrorEvent, RequestEvent

TICK = 0.5


def advance(fleet: Fleet, seconds: float) -> FleetOutput:
    """Run ``seconds`` more of simulated time; everything produced, merged."""
    merged = FleetOutput()
    end = fleet.now + seconds
    while fleet.now < end - 1e-9:
        out = fleet.events_between(fleet.now, fleet.now + TICK)
        for service, events in out.requests.items():
            merged.requests.setdefault(service, []).extend(events)
        merged.errors.extend(out.errors)
        merged.changes.extend(out.changes)
    return merged


def series(out: FleetOutput, key: str) -> list[dict[str, Any]]:
    service = key.split("|", 1)[0]
    return [e for e in out.requests.get(service, [])
            if series_key(e["service"], e["route"], e.get("dependency") or "") == key]


def command(kind: str, service: str, now: float, *, target: Any = None,
            params: dict[str, Any] | None = None, ttl: float = 600.0) -> dict[str, Any]:
    return {"id": f"inc1:{kind}:1", "kind": kind, "service": service, "target": target,
            "params": params or {}, "incident_id": "inc1", "issued_at": now,
            "expires_at": now + ttl, "reason": "test"}


def error_rate(events: list[dict[str, Any]]) -> float:
    assert events
    return sum(e["status"] >= 500 for e in events) / len(events)


def median_latency(events: list[dict[str, Any]]) -> float:
    assert events
    return statistics.median(e["latency_ms"] for e in events)


def fleet_for(name: str = "clean", seed: int = 3, **kwargs: Any) -> Fleet:
    config = default_fleet_config()
    return Fleet(config, build_scenario(name, config, **kwargs), seed)


# ----------------------------------------------------------------- determinism, shape


def test_same_seed_same_events_different_seed_different_events() -> None:
    a, b, c = (fleet_for("bad-deploy", seed, onset_s=2.0) for seed in (5, 5, 6))
    outs = [advance(f, 10.0) for f in (a, b, c)]
    assert outs[0] == outs[1]
    assert outs[0].request_count > 5000
    assert outs[0].requests != outs[2].requests
    # the same command at the same time keeps runs identical
    for f in (a, b):
        f.apply_command(command("throttle", "gateway", f.now, params={"rate_per_s": 50}),
                        f.now)
    assert advance(a, 5.0) == advance(b, 5.0)


def test_events_match_the_record_types() -> None:
    fleet = fleet_for("bad-deploy", onset_s=1.0)
    out = advance(fleet, 15.0)
    for events in out.requests.values():
        for event in events[::50]:
            assert RequestEvent.from_dict(event).to_dict() == event
    assert out.errors and out.changes
    for event in out.errors:
        ErrorEvent.from_dict(event)
    for event in out.changes:
        ChangeEvent.from_dict(event)


def test_fleet_has_routes_dependencies_instances_and_versions() -> None:
    out = advance(fleet_for(), 10.0)
    services = set(out.requests)
    assert services == {"gateway", "checkout", "payments", "inventory", "search", "users"}
    events = [e for batch in out.requests.values() for e in batch]
    assert {e["instance"] for e in events if e["service"] == "payments"} == {
        "payments-0", "payments-1", "payments-2"}
    assert {e["version"] for e in events if e["service"] == "payments"} == {"v41"}
    egress = {(e["service"], e["dependency"]) for e in events if e.get("dependency")}
    assert {("gateway", "checkout"), ("checkout", "payments"), ("checkout", "inventory"),
            ("gateway", "search"), ("gateway", "users"), ("users", "payments")} <= egress
    ingress = [e for e in events if not e.get("dependency")]
    assert 0.0005 < error_rate(ingress) < 0.02  # background errors, small
    assert len({(e["service"], e["route"]) for e in ingress}) == 16
    start = default_fleet_config().start_ts
    assert all(start <= e["ts"] < start + 10.0 for e in events)


def test_every_labelled_series_is_a_series_the_fleet_emits() -> None:
    fleet = fleet_for()
    out = advance(fleet, 20.0)
    emitted = {series_key(e["service"], e["route"], e.get("dependency") or "")
               for batch in out.requests.values() for e in batch}
    config = fleet.config
    for name in SCENARIO_NAMES[1:]:
        for label in labels_for(build_scenario(name, config), config):
            assert set(label["affected_series"]) <= emitted, name


def test_egress_events_mirror_the_callee() -> None:
    """With no outside traffic to the callee, every callee request is a caller's call:
    counts match one for one and the caller sees the callee's latency plus the wire."""
    config = FleetConfig(services=(
        ServiceSpec("front", (RouteSpec("/a", "GET", 1.0, 30.0, 0.3,
                                        (Call("back", "/b", 0.7),)),), external_share=1.0),
        ServiceSpec("back", (RouteSpec("/b", "GET", 1.0, 50.0, 0.3),), external_share=0.0),
    ), base_rate_per_s=300.0)
    fleet = Fleet(config, Scenario("clean"), 9)
    out = advance(fleet, 20.0)
    calls = series(out, "front|/b|back")
    served = series(out, "back|/b|")
    front = series(out, "front|/a|")
    assert len(calls) == len(served) > 1000
    assert len(calls) / len(front) == pytest.approx(0.7, abs=0.05)
    assert median_latency(calls) == pytest.approx(median_latency(served) + 0.8, rel=0.02)
    assert median_latency(front) > median_latency(served)


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="cycle"):
        FleetConfig(services=(
            ServiceSpec("a", (RouteSpec("/x", calls=(Call("b", "/y"),)),)),
            ServiceSpec("b", (RouteSpec("/y", calls=(Call("a", "/x"),)),)),
        ))
    with pytest.raises(ValueError, match="unknown route"):
        FleetConfig(services=(ServiceSpec("a", (RouteSpec("/x", calls=(Call("a", "/z"),)),)),))
    with pytest.raises(ValueError, match="base_rate_per_s"):
        default_fleet_config(base_rate_per_s=-1.0)
    with pytest.raises(ValueError, match="t0 < t1"):
        fleet_for().events_between(10.0, 10.0)


def test_fleet_size_is_configurable() -> None:
    small = default_fleet_config(services=2)
    assert small.service_names == ("gateway", "checkout")
    big = default_fleet_config(services=10)
    assert len(big.services) == 10
    assert big.services[7] == default_fleet_config(services=8).services[7]
    out = advance(Fleet(big, Scenario("clean"), 1), 3.0)
    assert set(out.requests) == set(big.service_names)


# ----------------------------------------------------------------- diurnal curve


def test_diurnal_curve_over_a_simulated_day() -> None:
    config = default_fleet_config()
    hours = [diurnal_factor(config, h * 3600.0) for h in range(24)]
    assert max(hours) == pytest.approx(1.0, abs=0.01)
    assert min(hours) == pytest.approx(config.diurnal_min_fraction, abs=0.01)
    peak_offset = (config.diurnal_peak_hour - config.start_hour) * 3600.0
    assert diurnal_factor(config, peak_offset) == pytest.approx(1.0)
    # sampled counts follow the curve: 4 s of real events at the top of every 3rd hour
    fleet = Fleet(config, Scenario("clean"), 2)
    ratios = []
    for hour in range(0, 24, 3):
        t0 = config.start_ts + hour * 3600.0
        count = 0
        for k in range(8):
            out = fleet.events_between(t0 + k * TICK, t0 + (k + 1) * TICK)
            count += sum(1 for e in out.requests.get("gateway", []) if not e.get("dependency"))
        expected = fleet.expected_rate("gateway", hour * 3600.0 + 2.0) * 4.0
        ratios.append(count / expected)
    assert all(0.85 < r < 1.15 for r in ratios), ratios


# ----------------------------------------------------------------- commands


def test_rollback_restores_the_old_versions_behaviour() -> None:
    fleet = fleet_for("bad-deploy", onset_s=5.0, duration_s=300.0)
    during = advance(fleet, 25.0)
    payments = [e for e in during.requests["payments"] if not e.get("dependency")]
    assert error_rate([e for e in payments if e["version"] == "v42"]) > 0.18
    result = fleet.apply_command(command("rollback", "payments", fleet.now, target="v41"),
                                 fleet.now)
    assert result.status == "applied"
    after = advance(fleet, 30.0)
    [change] = after.changes
    assert (change["from_version"], change["to_version"]) == ("v42", "v41")
    ChangeEvent.from_dict(change)
    served = [e for e in after.requests["payments"] if not e.get("dependency")]
    assert {e["version"] for e in served} == {"v41"}
    assert error_rate(served) < 0.02
    # the scenario's own manual rollback at the end does not fire a second time
    assert advance(fleet, 260.0).changes == []


def test_throttle_caps_the_accepted_rate_and_lowers_latency() -> None:
    surging = fleet_for("traffic-surge", onset_s=5.0, duration_s=300.0)
    plain = fleet_for("traffic-surge", onset_s=5.0, duration_s=300.0)
    advance(surging, 30.0)
    advance(plain, 30.0)
    cap = 60.0
    result = surging.apply_command(
        command("throttle", "search", surging.now, params={"rate_per_s": cap}), surging.now)
    assert result.status == "applied"
    throttled = advance(surging, 30.0)
    unthrottled = advance(plain, 30.0)
    ingress = [e for e in throttled.requests["search"] if not e.get("dependency")]
    accepted = [e for e in ingress if e["status"] != 429]
    rejected = [e for e in ingress if e["status"] == 429]
    assert len(accepted) / 30.0 < cap * 1.15
    assert len(rejected) > len(accepted)
    assert max(e["latency_ms"] for e in rejected) < 2.0
    free = [e for e in unthrottled.requests["search"]
            if not e.get("dependency") and e["route"] == "/search"]
    capped = [e for e in accepted if e["route"] == "/search"]
    assert median_latency(capped) < 0.6 * median_latency(free)


def test_isolate_fails_egress_fast_and_unloads_the_dependency() -> None:
    fleet = fleet_for("dependency-failure", onset_s=2.0, duration_s=300.0)
    before = advance(fleet, 20.0)
    result = fleet.apply_command(command("isolate", "checkout", fleet.now, target="payments"),
                                 fleet.now)
    assert result.status == "applied"
    after = advance(fleet, 20.0)
    calls = series(after, "checkout|/charge|payments")
    assert calls and {e["status"] for e in calls} == {503}
    assert max(e["latency_ms"] for e in calls) < 2.0
    assert len(series(after, "payments|/charge|")) < 0.8 * len(series(before, "payments|/charge|"))
    # other callers are not affected by checkout's isolation
    assert error_rate(series(after, "users|/status|payments")) > 0.4


def test_shed_rejects_a_share_of_the_named_routes() -> None:
    fleet = fleet_for()
    fleet.apply_command(command("shed", "gateway", fleet.now,
                                params={"share": 0.5, "routes": ["/api/search"]}), fleet.now)
    out = advance(fleet, 20.0)
    shed = series(out, "gateway|/api/search|")
    share = sum(e["status"] == 503 for e in shed) / len(shed)
    assert share == pytest.approx(0.5, abs=0.05)
    assert error_rate(series(out, "gateway|/api/account|")) < 0.02


def test_expired_commands_stop_applying() -> None:
    fleet = fleet_for()
    now = fleet.now
    assert fleet.apply_command(command("throttle", "users", now, params={"rate_per_s": 5.0},
                                       ttl=5.0), now).status == "applied"
    first = advance(fleet, 5.0)
    later = advance(fleet, 10.0)
    assert any(e["status"] == 429 for e in first.requests["users"])
    assert not any(e["status"] == 429 for e in later.requests["users"])
    assert fleet.active_commands("users", fleet.now) == []
    stale = command("throttle", "users", fleet.now - 100.0, params={"rate_per_s": 5.0},
                    ttl=10.0)
    assert fleet.apply_command(stale, fleet.now).status == "expired"


def test_restore_removes_or_ramps_a_mitigation() -> None:
    fleet = fleet_for()
    now = fleet.now
    fleet.apply_command(command("throttle", "gateway", now, params={"rate_per_s": 40.0}), now)
    restore = command("restore", "gateway", now, params={"kind": "throttle", "step": 0.5})
    assert fleet.apply_command(restore, now).status == "applied"
    [active] = fleet.active_commands("gateway", now)
    assert active["params"]["rate_per_s"] == pytest.approx(60.0)
    # a restore names the kind it undoes in params.kind, as the sidecar requires
    fleet.apply_command(command("restore", "gateway", now, params={"kind": "throttle"}), now)
    assert fleet.active_commands("gateway", now) == []
    out = advance(fleet, 5.0)
    assert not any(e["status"] == 429 for e in out.requests["gateway"])


@pytest.mark.parametrize("bad", [
    "not a dict",
    {"kind": "reboot", "service": "gateway"},
    {"kind": "throttle", "service": "mainframe", "params": {"rate_per_s": 5}},
    {"kind": "throttle", "service": "gateway", "params": {"rate_per_s": "fast"}},
    {"kind": "throttle", "service": "gateway", "params": {"rate_per_s": 5}, "expires_at": "x"},
    {"kind": "isolate", "service": "payments", "target": "gateway"},
    {"kind": "shed", "service": "gateway", "params": {"share": 2}},
    {"kind": "rollback", "service": "payments", "target": "latest"},
    {"kind": "shed", "service": "gateway", "params": "all"},
    {"kind": "shed", "service": "gateway", "params": {"share": 0.5, "routes": "/api/home"}},
    {"kind": "throttle", "service": "gateway", "params": {"rate_per_s": float("nan")}},
    {"kind": "restore", "service": "gateway", "params": {"kind": "throttle", "step": "x"}},
])
def test_bad_commands_are_rejected_with_a_reason_not_raised(bad: Any) -> None:
    fleet = fleet_for()
    result = fleet.apply_command(bad, fleet.now)
    assert result.status == "rejected" and result.reason
    assert fleet.active_commands("gateway", fleet.now) == []


def test_restore_by_dependency_undoes_only_that_isolation() -> None:
    fleet = fleet_for()
    now = fleet.now
    fleet.apply_command(command("isolate", "checkout", now, target="payments"), now)
    fleet.apply_command(command("isolate", "checkout", now, target="inventory"), now)
    fleet.apply_command(command("restore", "checkout", now, target="payments",
                                params={"kind": "isolate"}), now)
    assert [c["target"] for c in fleet.active_commands("checkout", now)] == ["inventory"]
    out = advance(fleet, 5.0)
    assert error_rate(series(out, "checkout|/charge|payments")) < 0.05
    assert {e["status"] for e in series(out, "checkout|/reserve|inventory")} == {503}


# ----------------------------------------------------------------- the sidecars' code


def _signed_sidecars(tmp_path: Any, fleet: Fleet) -> tuple[Any, Any]:
    from app.keys import generate_keypair
    from models.fleet import FleetSidecars
    from schemas.signing import KeyRing, load_private_key, sign_command

    private, public = generate_keypair(tmp_path, "test-kid")
    key = load_private_key(private)
    sidecars = FleetSidecars(fleet, KeyRing.from_dir(tmp_path).verify)
    return sidecars, lambda c: sign_command(c, key, "test-kid")


def test_fleet_sidecars_gate_apply_ack_and_expire_like_a_sidecar(tmp_path: Any) -> None:
    """Commands reach the fleet through the sidecar's gate and table: a forged or
    replayed command is rejected with an ack, an applied throttle refuses requests
    with error false, and a lapsed lease is lifted with an expiry ack."""
    fleet = fleet_for()
    sidecars, sign = _signed_sidecars(tmp_path, fleet)
    now = fleet.now
    throttle = sign(command("throttle", "users", now, params={"rate_per_s": 5.0}, ttl=5.0))
    [ack] = sidecars.deliver(throttle, "users", now)
    assert (ack["service"], ack["status"]) == ("users", "applied")
    [replayed] = sidecars.deliver(throttle, "users", now)
    assert (replayed["status"], replayed["reason"]) == ("rejected", "replayed")
    forged = {**throttle, "params": {"rate_per_s": 500.0}}
    [bad] = sidecars.deliver(forged, "users", now)
    assert bad["status"] == "rejected"
    out = advance(fleet, 4.0)
    refused = [e for e in out.requests["users"] if e["status"] == 429]
    assert refused and all(e["error"] is False for e in refused)
    assert sidecars.expiry_acks(fleet.now) == []
    advance(fleet, 2.0)  # the lease passed at now + 5
    [expired] = sidecars.expiry_acks(fleet.now)
    assert (expired["command_id"], expired["status"]) == (throttle["id"], "expired")
    assert fleet.active_commands("users", fleet.now) == []


def test_fleet_sidecars_run_a_rollback_once(tmp_path: Any) -> None:
    fleet = fleet_for("bad-deploy", onset_s=2.0, duration_s=300.0)
    sidecars, sign = _signed_sidecars(tmp_path, fleet)
    advance(fleet, 15.0)
    rollback = sign(command("rollback", "payments", fleet.now, target="v41"))
    [ack] = sidecars.deliver(rollback, "payments", fleet.now)
    assert ack["status"] == "applied" and "rolled back to v41" in ack["reason"]
    assert fleet.version_of("payments") == ["v41"] * 3
    # the same command applied again (e.g. by another path) is not run a second time
    assert fleet.apply_command(rollback, fleet.now).reason == "rollback already done"
