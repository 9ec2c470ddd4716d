"""Scenario tests for the mitigation policy: for each simulator scenario the right
command and nothing else, plus every safeguard and the crash/restart round trip.

A small event-time harness plays the role of the fleet, the detector and the agent:
each simulated second every service publishes a window, the scenario injects the
anomalies the detector would emit, and the harness reacts to the commands the way the
simulated services do (a rollback restores the old version, a throttle or an isolation
ends the symptoms)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace

import pytest

from models.incidents import IncidentBook
from models.mitigation import Decision, MitigationInputError, Mitigator
from models.policy import Policy, SafeguardPolicy, ShedPolicy, ThrottlePolicy

SERVICES = ["gateway", "checkout", "payments", "inventory", "search", "users"]


def anomaly(svc: str, t: float, signal: str = "errors", route: str = "/", dep: str = "",
            observed: float = 30.0, expected: float = 1.0, direction: str | None = None,
            severity: str = "major") -> dict:
    series = f"{svc}|{route}|{dep}"
    evidence = {"direction": direction} if direction else {}
    return {"id": f"{series}|{signal}|{t:.3f}", "service": svc, "series": series,
            "signal": signal, "window_start": float(t), "observed": observed,
            "expected": expected, "score": 9.0, "severity": severity, "evidence": evidence,
            "route": route, "dependency": dep or None, "window_s": 1.0}


def window(svc: str, t: float, count: int = 100, errors: int = 0, version: str = "v41",
           p99: float = 80.0, route: str = "/") -> dict:
    return {"service": svc, "route": route, "window_start": float(t), "window_s": 1.0,
            "count": count, "errors": errors, "p50": p99 / 3, "p90": p99 / 1.5, "p99": p99,
            "version_counts": {version: count}, "version_errors": {version: errors}}


class Harness:
    """Drives an IncidentBook + Mitigator the way the agent will, one second at a time."""

    def __init__(self, policy: Policy | None = None) -> None:
        self.policy = policy or Policy()
        self.book = IncidentBook(self.policy)
        self.mit = Mitigator(self.policy)
        self.decisions: list[tuple[float, Decision]] = []
        self.entries: list[dict] = []
        self.controls: dict[float, list[dict]] = {}

    def feed(self, t: float, windows: list[dict], anomalies: list[dict],
             changes: list[dict] = ()) -> list[Decision]:
        for c in changes:
            self.entries += [e.to_dict() for e in self.book.on_change(c, t)]
        for w in windows:
            self.entries += [e.to_dict() for e in self.book.on_window(w, t)]
        for a in anomalies:
            self.entries += [e.to_dict() for e in self.book.on_anomaly(a, t)]
        for msg in self.controls.pop(t, []):
            self.mit.apply_control(msg, t)
        self.entries += [e.to_dict() for e in self.book.tick(t)]
        res = self.mit.step(self.book, t)
        self.entries += [e.to_dict() for e in res.entries]
        self.decisions += [(t, d) for d in res.decisions]
        return res.decisions

    def run(self, t0: int, t1: int, scenario: Callable[[Harness, int], tuple[list, list, list]]
            ) -> None:
        for t in range(t0, t1):
            windows, anomalies, changes = scenario(self, t)
            self.feed(t, windows, anomalies, changes)

    def kinds(self) -> list[tuple[str, str, str]]:
        return [(d.kind, d.service, d.target) for _, d in self.decisions]

    def first_issue(self, kind: str) -> float | None:
        return next((t for t, d in self.decisions if d.kind == kind), None)

    def issued(self, kind: str, service: str | None = None) -> bool:
        return any(d.kind == kind and (service is None or d.service == service)
                   for _, d in self.decisions)

    def states(self, incident_id: str) -> list[str]:
        return [e["state"] for e in self.entries if e["incident_id"] == incident_id]


def healthy(t: float, skip: tuple[str, ...] = ()) -> list[dict]:
    return [window(s, t) for s in SERVICES if s not in skip]


# ---- scenarios ---------------------------------------------------------------------------

def bad_deploy(onset: int = 100, length: int = 200) -> Callable:
    change = {"ts": onset + 0.5, "service": "payments", "change_id": "chg-42", "kind": "deploy",
              "from_version": "v41", "to_version": "v42"}

    def scenario(h: Harness, t: int) -> tuple[list, list, list]:
        rolled = h.first_issue("rollback")
        bad = onset < t < onset + length and (rolled is None or t < rolled + 2)
        ws = healthy(t, skip=("payments",))
        if bad:
            ws.append(window("payments", t, errors=25, version="v42", p99=240.0))
            an = [anomaly("payments", t, "errors", observed=0.25, expected=0.003),
                  anomaly("checkout", t, "errors", route="/pay", dep="payments")]
        else:
            version = "v42" if onset < t and rolled is None else "v41"
            ws.append(window("payments", t, version=version))
            an = []
        return ws, an, [change] if t == onset else []
    return scenario


def test_bad_deploy_rolls_back_to_previous_version_and_nothing_else() -> None:
    h = Harness()
    h.run(0, 400, bad_deploy())
    assert h.kinds() == [("rollback", "payments", "v41")]
    (t, d), = h.decisions
    assert d.params["change_id"] == "chg-42" and d.params["to_version"] == "v41"
    assert t <= 103, "rollback must come within a few windows of onset"
    assert d.command_id == f"{d.incident_id}:rollback:1"
    assert len(h.book.incidents()) == 1
    inc = h.book.incidents()[0]
    assert inc.root_service == "payments"
    assert inc.state == "resolved"
    suspects = [e for e in h.entries if e["entry"] == "suspect"]
    assert suspects and suspects[-1]["suspect_change"]["confirmed"] is True
    ev = suspects[-1]["suspect_change"]["evidence"]
    assert ev["new_error_rate"] > 0.2 > 0.01 > ev["old_error_rate"]


def test_confirmed_suspect_rolls_back_on_the_first_anomalous_window() -> None:
    """The detector's finding already carries debounce_k windows and the version
    evidence confirms the deploy: waiting for a second anomalous window only costs time."""
    h = Harness()
    h.run(0, 400, bad_deploy())
    first_anomaly = 101
    assert h.first_issue("rollback") == first_anomaly
    # without a confirmed suspect the hysteresis still holds (min_anomalies = 2)
    h2 = Harness()
    h2.run(0, 130, traffic_surge())
    assert h2.first_issue("throttle") == 100 + h2.policy.safeguards.min_anomalies - 1


def test_unrelated_change_is_not_rolled_back() -> None:
    """A deploy whose new version is as healthy as the old one is no confirmed suspect."""
    change = {"ts": 100.5, "service": "payments", "change_id": "chg-ok", "kind": "deploy",
              "from_version": "v41", "to_version": "v42"}

    def scenario(h: Harness, t: int) -> tuple[list, list, list]:
        ws = healthy(t, skip=("payments",))
        ws.append(window("payments", t, version="v42" if t > 100 else "v41"))
        an = [anomaly("payments", t, "latency")] if 101 <= t < 140 else []
        return ws, an, [change] if t == 100 else []

    h = Harness()
    h.run(0, 300, scenario)
    assert not h.issued("rollback")
    suspects = [e for e in h.entries if e["entry"] == "suspect"]
    assert suspects and suspects[0]["suspect_change"]["confirmed"] is False


def traffic_surge(onset: int = 100, length: int = 60) -> Callable:
    def scenario(h: Harness, t: int) -> tuple[list, list, list]:
        ws = healthy(t)
        an = []
        if onset <= t < onset + length:
            an = [anomaly("search", t, "traffic", route="/q", observed=500.0, expected=100.0,
                          direction="surge")]
            if not h.issued("throttle"):
                an.append(anomaly("search", t, "latency", route="/q", observed=900.0,
                                  expected=80.0))
        return ws, an, []
    return scenario


def test_traffic_surge_throttles_then_ramps_back_and_resolves() -> None:
    h = Harness()
    h.run(0, 400, traffic_surge())
    throttles = [(t, d) for t, d in h.decisions if d.kind == "throttle"]
    first_t, first = throttles[0]
    assert first.service == "search" and first.target == "/q"
    assert first.params["rate_per_s"] == pytest.approx(100.0 * 1.2)
    assert first_t <= 102
    # renewed at the same rate while the surge lasts and until stable_s has passed ...
    before = [d.params["rate_per_s"] for t, d in throttles if "restore step" not in d.reason]
    assert set(before) == {120.0} and len(before) >= 3
    # ... then ramped: rising rates, then one restore, then resolved
    ramp = [d.params["rate_per_s"] for t, d in throttles if "restore step" in d.reason]
    assert ramp == [240.0, 480.0, 960.0, 1920.0]
    restores = [d for _, d in h.decisions if d.kind == "restore"]
    assert len(restores) == 1 and restores[0].params == {"kind": "throttle", "route": "/q"}
    assert not h.issued("rollback") and not h.issued("isolate") and not h.issued("shed")
    inc = h.book.incidents()[0]
    assert inc.state == "resolved"
    order = [s for s in h.states(inc.id)]
    assert order.index("mitigating") < order.index("monitoring") < order.index("resolved")
    steps = [e for e in h.entries if e["entry"] == "restore_step"]
    assert len(steps) == 5
    gaps = [b["at"] - a["at"] for a, b in zip(steps, steps[1:], strict=False)]
    assert all(g >= h.policy.restore.step_s for g in gaps)


@pytest.mark.parametrize("surge_first", [True, False])
def test_surge_at_root_with_callers_egress_errors_throttles_and_isolates_nothing(
        surge_first: bool) -> None:
    """What the simulator's traffic-surge shows: search surges, gateway's calls to it
    fail or slow down. The callers' egress errors are the overload's symptom: throttle
    search, do not open gateway's circuit to it (that would cut its legitimate share)."""
    def scenario(h: Harness, t: int) -> tuple[list, list, list]:
        ws = healthy(t)
        an: list[dict] = []
        if 100 <= t < 160:
            surge = [anomaly("search", t, "traffic", route="/q", observed=500.0,
                             expected=100.0, direction="surge")]
            egress = [anomaly("gateway", t, "errors", route="/api/search", dep="search"),
                      anomaly("gateway", t, "latency", route="/api/search", dep="search",
                              observed=900.0, expected=80.0)]
            an = surge + egress if surge_first else egress + surge
        return ws, an, []

    h = Harness()
    h.run(0, 400, scenario)
    assert h.issued("throttle", "search")
    assert {k for k, _, _ in h.kinds()} <= {"throttle", "restore"}, h.kinds()
    assert not h.issued("isolate")
    first = [d for _, d in h.decisions][0]
    assert (first.kind, first.service, first.target) == ("throttle", "search", "/q")
    ramp = [d.params["rate_per_s"] for _, d in h.decisions if "restore step" in d.reason]
    assert ramp == sorted(ramp) and len(ramp) == h.policy.restore.max_steps
    assert h.book.incidents()[0].state == "resolved"


def test_throttle_lease_is_renewed_while_needed_with_new_ids() -> None:
    h = Harness()
    h.run(0, 170, traffic_surge(length=60))
    throttles = [(t, d) for t, d in h.decisions if d.kind == "throttle"]
    times = [t for t, _ in throttles]
    # issued at ~101, renewed every 30 s while the surge lasts (and then ramps)
    assert times[:3] == [times[0], times[0] + 30, times[0] + 60]
    ids = [d.command_id for _, d in throttles]
    assert len(set(ids)) == len(ids)
    assert all(d.params["rate_per_s"] == 120.0 for _, d in throttles[:3])
    cmd = throttles[0][1].to_command(times[0])
    assert cmd["expires_at"] - cmd["issued_at"] == h.policy.safeguards.lease_s
    assert "search" in h.mit.mitigated_services(times[0] + 1)
    assert "checkout" not in h.mit.mitigated_services(times[0] + 1)


def dependency_failure(onset: int = 100, order: tuple[int, ...] = (0, 1, 2, 3, 4)) -> Callable:
    def scenario(h: Harness, t: int) -> tuple[list, list, list]:
        ws = healthy(t)
        an: list[dict] = []
        if onset <= t < onset + 90:
            isolated = {d.service for _, d in h.decisions if d.kind == "isolate"}
            src = [anomaly("payments", t, "errors", route="/charge"),
                   anomaly("checkout", t, "errors", route="/pay", dep="payments"),
                   anomaly("gateway", t, "errors", route="/charge", dep="payments"),
                   anomaly("checkout", t, "errors", route="/cart"),
                   anomaly("gateway", t, "latency", route="/buy", dep="checkout")]
            an = [src[i] for i in order]
            if isolated:  # isolated callers now fail fast: only their own errors remain
                an = [a for a in an if a["service"] not in isolated or not a["dependency"]]
        return ws, an, []
    return scenario


@pytest.mark.parametrize("order", [(0, 1, 2, 3, 4), (1, 3, 4, 2, 0), (4, 3, 2, 1, 0),
                                   (3, 4, 1, 0, 2)])
def test_dependency_failure_is_one_incident_isolated_at_each_caller(order: tuple) -> None:
    h = Harness()
    h.run(0, 195, dependency_failure(order=order))
    incidents = h.book.incidents()
    assert len(incidents) == 1, [i.id for i in incidents]
    inc = incidents[0]
    assert inc.root_service == "payments"
    assert {"checkout", "gateway", "payments"} <= set(inc.services())
    first = [(d.kind, d.service, d.target) for t, d in h.decisions if t <= 103]
    assert sorted(first) == [("isolate", "checkout", "payments"),
                             ("isolate", "gateway", "payments")]
    assert {k for k, _, _ in h.kinds()} <= {"isolate", "restore"}


def test_dependency_failure_restores_half_open_before_closing() -> None:
    h = Harness()
    h.run(0, 330, dependency_failure())
    per_caller = [d for _, d in h.decisions if d.service == "checkout"]
    half = [d for d in per_caller if d.kind == "isolate" and "half_open_share" in d.params]
    restores = [d for d in per_caller if d.kind == "restore"]
    assert half and restores
    assert per_caller.index(half[0]) < per_caller.index(restores[0])
    assert half[0].params["half_open_share"] == pytest.approx(0.1)
    assert restores[0].target == "payments" and restores[0].params == {"kind": "isolate"}
    assert h.book.incidents()[0].state == "resolved"


def test_half_open_probe_that_fails_reopens_the_circuit() -> None:
    h = Harness()

    def scenario(hh: Harness, t: int) -> tuple[list, list, list]:
        ws, an, ch = dependency_failure()(hh, t)
        half = [tt for tt, d in hh.decisions if "half_open_share" in d.params]
        if half and t in (half[0] + 1, half[0] + 2):  # the probe finds payments still down
            an = [anomaly("checkout", t, "errors", route="/pay", dep="payments")]
        return ws, an, ch

    h.run(0, 300, scenario)
    checkout = [d for _, d in h.decisions if d.service == "checkout" and d.kind == "isolate"]
    opened_again = [i for i, d in enumerate(checkout) if "half_open_share" not in d.params
                    and i > 0 and "half_open_share" in checkout[i - 1].params]
    assert opened_again, [d.params for d in checkout]


def test_isolated_callers_own_errors_do_not_hold_the_circuit_open() -> None:
    # While a caller's calls to the isolated dependency fail fast (fully, or all but the
    # half-open share) its own error rate stays up: that is the isolation's doing. The
    # dependency recovers at onset + 90; the probes find it healthy, so the circuit must
    # close and the incident resolve, not flap between open and half-open.
    h = Harness()

    def scenario(hh: Harness, t: int) -> tuple[list, list, list]:
        ws, an, ch = dependency_failure()(hh, t)
        isolating = {d.service for _, d in hh.decisions if d.kind == "isolate"}
        isolating -= {d.service for _, d in hh.decisions if d.kind == "restore"}
        an += [anomaly(svc, t, "errors", route="/cart") for svc in sorted(isolating)
               if t >= 190]
        return ws, an, ch

    h.run(0, 420, scenario)
    checkout = [d for _, d in h.decisions if d.service == "checkout"]
    half = [d for d in checkout if d.kind == "isolate" and "half_open_share" in d.params]
    reopened = [i for i, d in enumerate(checkout) if i and d.kind == "isolate"
                and "half_open_share" not in d.params
                and "half_open_share" in checkout[i - 1].params]
    assert half and not reopened, [(d.kind, d.params) for d in checkout]
    assert any(d.kind == "restore" and d.target == "payments" for d in checkout)
    assert h.book.incidents()[0].state == "resolved"


def test_clean_fleet_issues_nothing() -> None:
    h = Harness()
    h.run(0, 600, lambda hh, t: (healthy(t), [], []))
    assert h.decisions == [] and h.entries == [] and h.book.incidents() == []


def test_one_off_minor_anomaly_resolves_without_command() -> None:
    h = Harness()
    h.run(0, 200, lambda hh, t: (healthy(t), [anomaly("users", t, "latency", severity="minor")]
                                 if t == 50 else [], []))
    assert h.decisions == []
    assert [i.state for i in h.book.incidents()] == ["resolved"]


def test_telemetry_gap_escalates_without_command() -> None:
    def scenario(h: Harness, t: int) -> tuple[list, list, list]:
        gap = 100 <= t < 160
        ws = healthy(t, skip=("inventory",) if gap else ())
        an = [anomaly("inventory", t, "traffic", observed=0.0, expected=100.0,
                      direction="drop")] if gap else []
        return ws, an, []

    h = Harness()
    h.run(0, 250, scenario)
    assert h.decisions == []
    escalated = [e for e in h.entries if e["entry"] == "escalated"]
    assert escalated and all("telemetry gap" in e["reason"] for e in escalated)
    assert len(h.book.incidents()) == 1


def test_silent_service_escalates_as_telemetry_gap_even_without_anomaly() -> None:
    h = Harness()
    h.run(0, 200, lambda hh, t: (healthy(t, skip=("users",) if t >= 100 else ()), [], []))
    assert h.decisions == []
    (inc,) = h.book.incidents()
    assert inc.root_service == "users" and inc.state == "escalated"
    assert inc.reason.startswith("telemetry gap")


def test_storm_escalates_every_incident_and_issues_nothing() -> None:
    def scenario(h: Harness, t: int) -> tuple[list, list, list]:
        an = []
        if 100 <= t < 160:
            an = [anomaly(s, t, "traffic", observed=400.0, expected=100.0, direction="surge")
                  for s in SERVICES[:5]]
        return healthy(t), an, []

    h = Harness()
    h.run(0, 200, scenario)
    assert h.decisions == []
    incs = h.book.incidents()
    assert len(incs) == 5 and all(i.state == "escalated" for i in incs)
    assert all(i.reason.startswith("storm: suspect telemetry pipeline") for i in incs)


def test_dry_run_records_decisions_but_issues_no_command() -> None:
    policy = replace(Policy(), safeguards=replace(SafeguardPolicy(), dry_run=True))
    h = Harness(policy)
    h.run(0, 300, bad_deploy())
    assert h.decisions == []
    decisions = [e for e in h.entries if e["entry"] == "decision"]
    assert len(decisions) == 1
    assert decisions[0]["reason"].startswith("dry-run: would rollback payments -> v41")
    assert not [e for e in h.entries if e["entry"] == "command"]


def test_dry_run_can_be_switched_off_by_control() -> None:
    policy = replace(Policy(), safeguards=replace(SafeguardPolicy(), dry_run=True))
    h = Harness(policy)
    h.controls[110] = [{"id": "c1", "action": "dry_run_off", "at": 110.0}]
    h.run(0, 300, bad_deploy())
    assert h.kinds() == [("rollback", "payments", "v41")]
    assert h.first_issue("rollback") == 110


@pytest.mark.parametrize("approve_by", ["incident", "command"])
def test_approval_mode_issues_only_after_approve(approve_by: str) -> None:
    policy = replace(Policy(), safeguards=replace(SafeguardPolicy(), approval=True))
    h = Harness(policy)
    h.run(0, 130, traffic_surge(length=120))
    assert not h.issued("throttle")
    (pending,) = h.mit.pending()
    waiting = [e for e in h.entries if e["entry"] == "decision"]
    assert len(waiting) == 1 and "awaiting approval" in waiting[0]["reason"]
    target = pending.incident_id if approve_by == "incident" else pending.command_id
    h.controls[130] = [{"id": "c1", "action": "approve", "at": 130.0, "target": target}]
    h.run(130, 135, traffic_surge(length=120))
    throttles = [(t, d) for t, d in h.decisions if d.kind == "throttle"]
    assert throttles[0][0] == 130
    assert throttles[0][1].command_id == pending.command_id


def test_pause_issues_nothing_until_resume_then_mitigates() -> None:
    h = Harness()
    h.controls[90] = [{"id": "c1", "action": "pause", "at": 90.0, "operator": "ann"}]
    h.run(0, 150, traffic_surge(length=200))
    assert h.decisions == []
    assert any(e["reason"].startswith("paused") for e in h.entries)
    h.controls[150] = [{"id": "c2", "action": "resume", "at": 150.0}]
    h.run(150, 155, traffic_surge(length=200))
    assert h.first_issue("throttle") == 150


def test_pause_stops_renewals_so_leases_lapse() -> None:
    h = Harness()
    h.controls[110] = [{"id": "c1", "action": "pause", "at": 110.0}]
    h.run(0, 200, traffic_surge(length=200))
    assert [t for t, _ in h.decisions] == [101]
    assert h.mit.mitigated_services(162) == set()
    assert any("lease of throttle" in e["reason"] for e in h.entries)


def test_cooldown_blocks_a_second_throttle_of_the_same_service() -> None:
    h = Harness()
    first = traffic_surge(onset=100, length=60)
    second = traffic_surge(onset=300, length=60)
    h.run(0, 500, lambda hh, t: first(hh, t) if t < 300 else second(hh, t))
    incs = h.book.incidents()
    assert len(incs) == 2
    assert not [d for t, d in h.decisions if t >= 300]
    assert any(e["reason"].startswith("cooldown") for e in h.entries)


def test_fleet_wide_cap_limits_active_mitigations() -> None:
    policy = replace(Policy(), safeguards=replace(SafeguardPolicy(), max_active=1))
    h = Harness(policy)
    h.run(0, 110, dependency_failure())
    isolates = [d for _, d in h.decisions if d.kind == "isolate"]
    assert len(isolates) == 1 and len(h.mit.active()) == 1
    assert any(e["reason"].startswith("cap:") for e in h.entries)


def test_a_debounced_surge_finding_throttles_on_the_first_anomaly() -> None:
    """The detector's finding rests on two anomalous windows (its 2-of-3 debounce, or a
    test that pooled two windows): that meets min_anomalies = 2 at once, one window
    (1 s) earlier than counting only the anomalies' own windows."""

    def scenario(h: Harness, t: int) -> tuple[list, list, list]:
        an = []
        if 100 <= t < 160:
            a = anomaly("search", t, "traffic", route="/q", observed=500.0, expected=100.0,
                        direction="surge")
            a["evidence"].update(windows=[float(t)], pooled_windows=2.0)
            an = [a]
        return healthy(t), an, []

    h = Harness()
    h.run(0, 130, scenario)
    assert h.first_issue("throttle") == 100
    # a policy that asks for more evidence than the finding carries still waits
    h3 = Harness(replace(Policy(), safeguards=replace(SafeguardPolicy(), min_anomalies=3)))
    h3.run(0, 130, scenario)
    assert h3.first_issue("throttle") == 101


def test_hysteresis_waits_for_min_anomalies_and_duration() -> None:
    policy = replace(Policy(), safeguards=replace(SafeguardPolicy(), min_anomalies=5,
                                                  min_duration_s=10.0))
    h = Harness(policy)
    h.run(0, 130, traffic_surge())
    assert h.first_issue("throttle") == 110


def test_shed_low_priority_routes_when_throttling_is_not_allowed() -> None:
    from models.policy import ServicePolicy
    policy = replace(Policy(),
                     shed=replace(ShedPolicy(), low_priority_routes={"search": ("/suggest",)}),
                     services={"search": ServicePolicy(allow=("shed", "isolate"))})
    h = Harness(policy)
    h.run(0, 130, traffic_surge())
    assert h.kinds() == [("shed", "search", "*")]
    assert h.decisions[0][1].params == {"share": 0.5, "routes": ["/suggest"]}


def test_shed_follows_a_throttle_that_does_not_help() -> None:
    policy = replace(Policy(),
                     shed=replace(ShedPolicy(), low_priority_routes={"search": ("/suggest",)}))

    def scenario(h: Harness, t: int) -> tuple[list, list, list]:
        an = []
        if 100 <= t < 200:  # latency stays anomalous even under the throttle
            an = [anomaly("search", t, "traffic", route="/q", observed=500.0, expected=100.0,
                          direction="surge"),
                  anomaly("search", t, "latency", route="/q", observed=900.0, expected=80.0)]
        return healthy(t), an, []

    h = Harness(policy)
    h.run(0, 150, scenario)
    throttle_t, shed_t = h.first_issue("throttle"), h.first_issue("shed")
    assert throttle_t is not None and shed_t is not None
    assert shed_t - throttle_t >= policy.shed.after_s


def test_throttle_disabled_without_shed_routes_issues_nothing() -> None:
    policy = replace(Policy(), throttle=replace(ThrottlePolicy(), enabled=False))
    h = Harness(policy)
    h.run(0, 200, traffic_surge())
    assert h.decisions == []


@pytest.mark.parametrize("cut", [102, 125, 131, 165, 190])
def test_restart_from_snapshot_gives_same_commands_with_same_ids(cut: int) -> None:
    """A worker killed at `cut` and restarted from its snapshot (JSON round trip) neither
    forgets the open incident nor issues a command twice: it continues exactly as an
    uninterrupted worker would."""
    scenario = traffic_surge(length=60)
    ref = Harness()
    ref.run(0, 300, scenario)

    h = Harness()
    h.run(0, cut, scenario)
    snap = json.loads(json.dumps({"book": h.book.to_state(), "mit": h.mit.to_state()}))
    restarted = Harness()
    restarted.book = IncidentBook.from_state(snap["book"], restarted.policy)
    restarted.mit = Mitigator.from_state(snap["mit"], restarted.policy)
    restarted.decisions = list(h.decisions)
    restarted.entries = list(h.entries)
    assert [i.id for i in restarted.book.open_incidents()] == \
        [i.id for i in h.book.open_incidents()]
    restarted.run(cut, 300, scenario)
    assert [(t, d) for t, d in restarted.decisions] == [(t, d) for t, d in ref.decisions]
    ids = [d.command_id for _, d in restarted.decisions]
    assert len(ids) == len(set(ids))
    assert [e["id"] for e in restarted.entries] == [e["id"] for e in ref.entries]


def test_redeciding_from_an_older_snapshot_reuses_the_command_ids() -> None:
    """At-least-once: a worker that dies after publishing but before snapshotting
    re-decides the same commands with the same ids, which consumers drop as replays."""
    scenario = bad_deploy()
    h = Harness()
    h.run(0, 101, scenario)
    snap = json.loads(json.dumps({"book": h.book.to_state(), "mit": h.mit.to_state()}))
    h.run(101, 104, scenario)
    again = Harness()
    again.book = IncidentBook.from_state(snap["book"])
    again.mit = Mitigator.from_state(snap["mit"])
    again.decisions = list(h.decisions[:0])
    again.run(101, 104, scenario)
    assert [d.command_id for _, d in again.decisions] == [d.command_id for _, d in h.decisions]


def test_replayed_anomalies_are_ignored() -> None:
    h = Harness()
    a = anomaly("search", 100, "traffic", observed=500.0, expected=100.0, direction="surge")
    first = h.book.on_anomaly(a, 100.0)
    assert first and h.book.on_anomaly(dict(a), 100.0) == []


def test_failed_rollback_ack_escalates() -> None:
    h = Harness()
    h.run(0, 103, bad_deploy())
    (_, d), = h.decisions
    entries = h.book.on_ack({"command_id": d.command_id, "service": "payments",
                             "instance": "payments-1", "status": "failed",
                             "reason": "image v41 missing", "at": 103.0}, 103.0)
    assert [e.entry for e in entries] == ["ack", "escalated"]
    assert h.book.get(d.incident_id).state == "escalated"


def test_bad_control_messages_are_clear_errors() -> None:
    m = Mitigator()
    with pytest.raises(MitigationInputError, match="action"):
        m.apply_control({"action": "explode"}, 0.0)
    with pytest.raises(MitigationInputError, match="target"):
        m.apply_control({"action": "approve"}, 0.0)
    with pytest.raises(MitigationInputError):
        m.apply_control(["pause"], 0.0)  # type: ignore[arg-type]
