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


# ---- no harm, by construction (issue 10) --------------------------------------------------

def egress(svc: str, dep: str, t: float, count: int = 50, errors: int = 0) -> dict:
    """An egress window (the call graph the book learns: svc calls dep)."""
    return {**window(svc, t, count=count, errors=errors), "dependency": dep}


def graph(t: float) -> list[dict]:
    """gateway -> checkout -> payments, as the egress windows show it."""
    return [egress("gateway", "checkout", t), egress("checkout", "payments", t)]


def dep_down(onset: int = 100, until: int = 190, checkout_errors: Callable | None = None,
             extra: Callable | None = None) -> Callable:
    """payments fails from onset to until; checkout fails 90 % of its calls to it (an
    isolation's pre-condition); windows carry each service's error responses:
    payments 60 a window while down, checkout what ``checkout_errors(h, t)`` says."""
    def scenario(h: Harness, t: int) -> tuple[list, list, list]:
        down = onset <= t < until
        ws = healthy(t, skip=("payments", "checkout")) + graph(t)
        ws.append(window("payments", t, errors=60 if down else 0))
        ws.append(window("checkout", t, errors=checkout_errors(h, t) if checkout_errors
                         else (5 if down else 0)))
        an: list[dict] = []
        if down:
            an = [anomaly("payments", t, "errors", route="/charge", observed=0.6,
                          expected=0.01),
                  anomaly("checkout", t, "errors", route="/pay", dep="payments",
                          observed=0.9, expected=0.01)]
        if extra is not None:
            an += extra(h, t)
        return ws, an, []
    return scenario


def test_isolation_needs_most_calls_to_fail_slow_or_partly_failing_is_left_alone() -> None:
    """An open circuit fails every call: a dependency that is only slow (latency-spike)
    or fails 20 % of calls (error-burst) is not isolated, and the timeline says why."""
    def scenario(share: float | None) -> Callable:
        def s(h: Harness, t: int) -> tuple[list, list, list]:
            an: list[dict] = []
            if 100 <= t < 160:
                an = [anomaly("payments", t, "latency", route="/charge", observed=900.0,
                              expected=80.0),
                      anomaly("checkout", t, "latency", route="/pay", dep="payments",
                              observed=900.0, expected=80.0)]
                if share is not None:
                    an.append(anomaly("checkout", t, "errors", route="/pay", dep="payments",
                                      observed=share, expected=0.01))
            return healthy(t) + graph(t), an, []
        return s

    for share in (None, 0.2):
        h = Harness()
        h.run(0, 300, scenario(share))
        assert h.decisions == [], h.kinds()
        notes = [e["reason"] for e in h.entries if e["entry"] == "decision"]
        assert any(n.startswith("no isolation of payments at checkout") for n in notes)
        assert h.book.incidents()[0].state == "resolved"
    h = Harness()
    h.run(0, 300, scenario(0.9))
    assert h.issued("isolate", "checkout")


def test_upstream_of_an_isolation_is_judged_with_it_in_mind() -> None:
    """checkout isolates payments; gateway, upstream of checkout, now gets checkout's
    fail-fast answers as errors. Its anomalies are recorded on the incident's timeline
    but neither hold the incident open nor open an incident of their own nor get
    checkout blamed; gateway is a mitigated service (its detectors do not learn)."""
    def gateway_sees_failfast(h: Harness, t: int) -> list[dict]:
        if not h.issued("isolate") or t >= 200:
            return []
        return [anomaly("gateway", t, "errors", route="/buy"),
                anomaly("gateway", t, "errors", route="/buy", dep="checkout")]

    h = Harness()
    scenario = dep_down(extra=gateway_sees_failfast)
    h.run(0, 110, scenario)
    issued = h.first_issue("isolate")
    assert issued is not None
    assert {"gateway", "checkout", "payments"} <= h.mit.mitigated_services(109)
    h.run(110, 400, scenario)
    (inc,) = h.book.incidents()
    shaped = [e for e in h.entries if e["entry"] == "anomaly"
              and e.get("details", {}).get("shaped")]
    assert shaped and all(e["incident_id"] == inc.id for e in shaped)
    assert all(e["details"]["counted"] is False for e in shaped)
    assert "gateway" not in inc.anomalous and "gateway" not in inc.edges
    assert inc.root_service == "payments"
    assert [(k, s) for k, s, _ in h.kinds() if k == "isolate"] and \
        {s for k, s, _ in h.kinds()} == {"checkout"}
    assert inc.state == "resolved"
    assert h.mit.active() == []


def test_half_open_probe_is_reached_while_the_incident_goes_on() -> None:
    """payments recovers at 130 while checkout's own latency stays out of baseline until
    200 (the incident does not look stable): the isolation is judged by its target,
    goes half-open restore.step_s after payments went quiet and closes one step later."""
    def checkout_slow(h: Harness, t: int) -> list[dict]:
        return [anomaly("checkout", t, "latency", route="/cart", observed=900.0,
                        expected=80.0)] if 100 <= t < 200 else []

    h = Harness()
    h.run(0, 400, dep_down(until=130, extra=checkout_slow))
    iso = [(t, d) for t, d in h.decisions if d.service == "checkout"]
    half = [t for t, d in iso if d.kind == "isolate" and "half_open_share" in d.params]
    closed = [t for t, d in iso if d.kind == "restore"]
    step = h.policy.restore.step_s
    assert half and half[0] == 129 + step, iso
    assert closed and closed[0] == half[0] + step
    resolved = next(e["at"] for e in h.entries if e["entry"] == "resolved")
    assert closed[0] < 199 + h.policy.restore.stable_s <= resolved
    assert h.book.incidents()[0].state == "resolved" and h.mit.active() == []


def test_action_that_makes_things_worse_is_reverted_at_once_and_recorded() -> None:
    """After the isolation checkout answers 80 errors a window instead of 5 (its
    fail-fast answers are errors to its own callers): the scope's error responses rose
    far beyond noise, so the isolation is reverted at the first comparison, the verdict
    is on the timeline and the same isolation is not tried again for this incident."""
    def checkout_errors(h: Harness, t: int) -> int:
        isolating = h.issued("isolate") and not h.issued("restore")
        return 80 if isolating else 5 if 100 <= t < 190 else 0

    h = Harness()
    h.run(0, 400, dep_down(checkout_errors=checkout_errors))
    issued = h.first_issue("isolate")
    vp = h.policy.verify
    reverted = [(t, d) for t, d in h.decisions if d.kind == "restore"]
    assert issued is not None and reverted
    t_rev, rev = reverted[0]
    assert t_rev == issued + vp.settle_s + vp.compare_windows
    assert rev.params == {"kind": "isolate"} and "worse" in rev.reason
    verdicts = [e for e in h.entries if e.get("details", {}).get("verdict") == "worse"]
    assert {e["entry"] for e in verdicts} == {"decision", "restore_step"}
    (judged,) = [e for e in verdicts if e["entry"] == "decision"]
    assert judged["details"]["before"][0] / judged["details"]["before"][1] == 65
    assert set(judged["details"]["scope"]) == {"checkout", "gateway", "payments"}
    assert [t for t, d in h.decisions if d.kind == "isolate"] == [issued]


def test_action_that_does_not_help_is_lifted_and_the_incident_escalated() -> None:
    """payments stays down; the isolation changes nothing measurable: it is lifted
    verify.improve_within_s after it was issued (fail open), never renewed forever,
    and the incident goes to a human."""
    h = Harness()
    h.run(0, 500, dep_down(until=600))
    issued = h.first_issue("isolate")
    assert issued is not None
    limit = h.policy.verify.improve_within_s
    restores = [(t, d) for t, d in h.decisions if d.kind == "restore"]
    assert [t for t, _ in restores] == [issued + limit]
    assert "no improvement" in restores[0][1].reason
    (inc,) = h.book.incidents()
    assert inc.state == "escalated" and "not improved" in inc.reason
    assert max(t for t, _ in h.decisions) == issued + limit
    assert h.mit.active() == []


def test_no_renewal_without_fresh_telemetry_of_the_action() -> None:
    """checkout's telemetry stops at 110: Stanch can no longer see what its isolation
    does, so it does not renew it (the lease lapses, the sidecar fails open) and
    escalates."""
    def scenario(h: Harness, t: int) -> tuple[list, list, list]:
        ws, an, ch = dep_down(until=600)(h, t)
        if t >= 110:
            ws = [w for w in ws if w["service"] != "checkout"]
        return ws, an, ch

    h = Harness()
    h.run(0, 260, scenario)
    isolates = [(t, d) for t, d in h.decisions if d.kind == "isolate"]
    assert len(isolates) == 1, isolates
    t0 = isolates[0][0]
    (inc,) = [i for i in h.book.incidents() if i.root_service == "payments"]
    assert inc.state == "escalated" and "telemetry of checkout stopped" in inc.reason
    assert any("lease of isolate" in e["reason"] for e in h.entries)
    assert h.mit.mitigated_services(t0 + h.policy.safeguards.lease_s + 5) == set()


def test_stragglers_of_a_lifted_isolation_open_no_incident() -> None:
    """A finding of checkout whose windows are from the isolation's time arrives after
    the incident resolved: it is the isolation's doing, not a new fault."""
    h = Harness()
    h.run(0, 400, dep_down())
    (inc,) = h.book.incidents()
    assert inc.state == "resolved"
    closed = max(t for t, d in h.decisions if d.kind == "restore")
    late = anomaly("checkout", closed - 1, "errors", route="/cart")
    entries = [e.to_dict() for e in h.book.on_anomaly(late, 401)]
    assert len(h.book.incidents()) == 1
    assert entries and entries[0]["details"]["shaped"] is True
    assert entries[0]["incident_id"] == inc.id


def test_a_change_is_rolled_back_once_and_then_is_no_suspect() -> None:
    """After the rollback the incident resolves; payments fails again 100 s later (a
    new incident, the rolled-back deploy still within suspect_window_s of it): the
    change is not blamed again, nor rolled back a second time."""
    first = bad_deploy(onset=100, length=200)

    def scenario(h: Harness, t: int) -> tuple[list, list, list]:
        if t < 250:
            return first(h, t)
        ws = healthy(t, skip=("payments",))
        ws.append(window("payments", t, errors=25, version="v41"))
        an = [anomaly("payments", t, "errors", observed=0.25, expected=0.003)] \
            if t < 300 else []
        return ws, an, []

    h = Harness()
    h.run(0, 450, scenario)
    assert [k for k, _, _ in h.kinds()].count("rollback") == 1
    incs = h.book.incidents()
    assert len(incs) == 2
    assert incs[1].suspect is None
    assert h.book.changes.rolled_back("chg-42")


def test_a_surge_after_a_rollback_is_judged_on_its_own_and_throttled() -> None:
    """The deploy is rolled back; 10 s later payments' traffic surges 5x (same incident,
    same service). The surge is not blamed on the rolled-back deploy: it is throttled."""
    deploy = bad_deploy(onset=100, length=200)

    def scenario(h: Harness, t: int) -> tuple[list, list, list]:
        ws, an, ch = deploy(h, t)
        if 112 <= t < 170:
            an = an + [anomaly("payments", t, "traffic", route="/charge", observed=500.0,
                               expected=100.0, direction="surge")]
        return ws, an, ch

    h = Harness()
    h.run(0, 450, scenario)
    kinds = [k for k, _, _ in h.kinds()]
    assert kinds.count("rollback") == 1
    throttles = [(t, d) for t, d in h.decisions if d.kind == "throttle"]
    assert throttles and throttles[0][0] <= 114
    assert throttles[0][1].service == "payments"
    assert throttles[0][1].params["rate_per_s"] == pytest.approx(120.0)
    assert len(h.book.incidents()) == 1
    assert h.mit.active() == []


@pytest.mark.parametrize("cut", [103, 108, 112, 150])
def test_restart_keeps_verdicts_shaped_spans_and_probes(cut: int) -> None:
    """The no-harm state (verdicts, reverted actions, shaped spans, the ledger, probes)
    is in the snapshot: a worker restarted at `cut` decides what an uninterrupted one
    does, in a run with a harmful isolation reverted and gateway shaped upstream."""
    def checkout_errors(h: Harness, t: int) -> int:
        isolating = h.issued("isolate") and not h.issued("restore")
        return 80 if isolating else 5 if 100 <= t < 190 else 0

    def gateway(h: Harness, t: int) -> list[dict]:
        return [anomaly("gateway", t, "errors", route="/buy")] if h.issued("isolate") \
            and t < 140 else []

    scenario = dep_down(checkout_errors=checkout_errors, extra=gateway)
    ref = Harness()
    ref.run(0, 300, scenario)
    assert any("worse" in d.reason for _, d in ref.decisions)
    h = Harness()
    h.run(0, cut, scenario)
    snap = json.loads(json.dumps({"book": h.book.to_state(), "mit": h.mit.to_state()}))
    again = Harness()
    again.book = IncidentBook.from_state(snap["book"], again.policy)
    again.mit = Mitigator.from_state(snap["mit"], again.policy)
    again.decisions, again.entries = list(h.decisions), list(h.entries)
    again.run(cut, 300, scenario)
    assert again.decisions == ref.decisions
    assert [e["id"] for e in again.entries] == [e["id"] for e in ref.entries]
