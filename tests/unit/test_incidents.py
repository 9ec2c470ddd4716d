"""Incident grouping, lifecycle, suspect-change correlation and input validation."""

from __future__ import annotations

import itertools
import json

import pytest

from models.changes import Change, ChangeLog
from models.incidents import IncidentBook, IncidentInputError, TimelineEntry
from models.policy import Policy, RollbackPolicy


def anomaly(svc: str, t: float, signal: str = "errors", route: str = "/", dep: str = "",
            direction: str | None = None) -> dict:
    series = f"{svc}|{route}|{dep}"
    return {"id": f"{series}|{signal}|{t:.3f}", "service": svc, "series": series,
            "signal": signal, "window_start": float(t), "observed": 0.3, "expected": 0.01,
            "score": 8.0, "severity": "major",
            "evidence": {"direction": direction} if direction else {}}


def window(svc: str, t: float, counts: dict[str, int] | None = None,
           errors: dict[str, int] | None = None, p99: float = 80.0) -> dict:
    counts = counts if counts is not None else {"v1": 100}
    errors = errors or {}
    return {"service": svc, "route": "/", "window_start": float(t), "window_s": 1.0,
            "count": sum(counts.values()), "errors": sum(errors.values()), "p99": p99,
            "version_counts": counts, "version_errors": errors}


def feed(book: IncidentBook, anomalies: list[dict]) -> list[TimelineEntry]:
    out: list[TimelineEntry] = []
    for a in anomalies:
        out += book.on_anomaly(a, a["window_start"])
    return out


def test_same_service_within_window_is_one_incident() -> None:
    book = IncidentBook()
    entries = feed(book, [anomaly("search", 10), anomaly("search", 11, "latency"),
                          anomaly("search", 40, route="/q")])
    (inc,) = book.open_incidents()
    assert inc.id == "inc-search-10" and inc.root_service == "search"
    assert [e.entry for e in entries] == ["opened", "anomaly", "anomaly", "anomaly"]
    assert [e.id for e in entries] == [f"inc-search-10:{i}" for i in range(1, 5)]
    assert all(e.state == "open" for e in entries)


def test_different_unrelated_services_are_separate_incidents() -> None:
    book = IncidentBook()
    feed(book, [anomaly("search", 10), anomaly("users", 10)])
    assert sorted(i.root_service for i in book.open_incidents()) == ["search", "users"]


@pytest.mark.parametrize("perm", list(itertools.permutations(range(4))))
def test_shared_failing_dependency_is_one_incident_rooted_at_it(perm: tuple) -> None:
    src = [anomaly("payments", 10),
           anomaly("checkout", 10, route="/pay", dep="payments"),
           anomaly("gateway", 10, route="/charge", dep="payments"),
           anomaly("checkout", 10, "latency", route="/cart")]
    book = IncidentBook()
    feed(book, [src[i] for i in perm])
    (inc,) = book.open_incidents()
    assert inc.root_service == "payments"
    assert inc.services() == ["checkout", "gateway", "payments"]
    assert inc.callers_of("payments") == ["checkout", "gateway"]
    assert inc.anomaly_count == 4
    for other in book.incidents():
        if other.id != inc.id:  # a caller's incident opened first is folded in
            assert other.state == "resolved" and other.reason.startswith(f"merged into {inc.id}")


def test_two_callers_failing_on_a_quiet_dependency_root_it() -> None:
    book = IncidentBook()
    feed(book, [anomaly("checkout", 10, dep="payments"), anomaly("gateway", 10, dep="payments")])
    (inc,) = book.open_incidents()
    assert inc.root_service == "payments"


def test_single_caller_on_a_healthy_dependency_stays_the_callers_incident() -> None:
    book = IncidentBook()
    feed(book, [anomaly("checkout", 10, dep="payments"), anomaly("checkout", 11, "latency")])
    (inc,) = book.open_incidents()
    assert inc.root_service == "checkout"


def test_cascade_roots_at_the_deepest_failing_service() -> None:
    book = IncidentBook()
    feed(book, [anomaly("gateway", 10, dep="checkout"), anomaly("checkout", 10, dep="payments"),
                anomaly("payments", 11)])
    (inc,) = book.open_incidents()
    assert inc.root_service == "payments"
    assert inc.id == "inc-gateway-10", "the id keeps naming the first root candidate"


def test_root_change_is_a_timeline_entry() -> None:
    book = IncidentBook()
    entries = feed(book, [anomaly("checkout", 10, dep="payments"), anomaly("payments", 10)])
    moves = [e for e in entries if e.entry == "state"]
    assert len(moves) == 1 and moves[0].reason.startswith("root candidate is now payments")
    assert moves[0].details == {"previous_root": "checkout"}


def test_duplicate_anomaly_id_is_ignored() -> None:
    book = IncidentBook()
    a = anomaly("search", 10)
    assert feed(book, [a]) and feed(book, [dict(a)]) == []
    assert book.open_incidents()[0].anomaly_count == 1


def test_recovery_needs_stable_time_and_telemetry_present() -> None:
    book = IncidentBook()
    feed(book, [anomaly("search", 10)])
    inc = book.open_incidents()[0]
    assert not book.is_recovered(inc, 100.0), "no window yet: silence is not health"
    for t in range(11, 70):
        book.on_window(window("search", t), float(t))
    assert not book.is_recovered(inc, 69.0)
    book.on_window(window("search", 70), 70.0)
    assert book.is_recovered(inc, 70.0)
    assert not book.is_recovered(inc, 200.0), "windows stopped arriving: not recovered"


def test_lifecycle_transitions_are_entries_and_terminal_states_stick() -> None:
    book = IncidentBook()
    feed(book, [anomaly("search", 10)])
    iid = book.open_incidents()[0].id
    e1 = book.transition(iid, "mitigating", 12.0, "throttle issued")
    e2 = book.transition(iid, "monitoring", 80.0, "stable")
    e3 = book.resolve(iid, 120.0, "restored")
    assert [(e.entry, e.state, e.at) for e in (e1, e2, e3)] == [
        ("state", "mitigating", 12.0), ("state", "monitoring", 80.0),
        ("resolved", "resolved", 120.0)]
    assert book.escalate(iid, 130.0, "late") is None
    assert book.open_incidents() == []
    with pytest.raises(IncidentInputError, match="state"):
        book.transition(iid, "bogus", 1.0, "x")


def test_anomaly_during_monitoring_goes_back_to_mitigating() -> None:
    book = IncidentBook()
    feed(book, [anomaly("search", 10)])
    iid = book.open_incidents()[0].id
    book.transition(iid, "mitigating", 11.0, "x")
    book.transition(iid, "monitoring", 80.0, "y")
    entries = feed(book, [anomaly("search", 85)])
    assert [e.state for e in entries if e.entry == "state"] == ["mitigating"]


def test_resolved_incident_does_not_absorb_new_anomalies() -> None:
    book = IncidentBook()
    feed(book, [anomaly("search", 10)])
    book.resolve("inc-search-10", 90.0, "ok")
    feed(book, [anomaly("search", 100)])
    assert [i.id for i in book.open_incidents()] == ["inc-search-100"]


def test_escalation_timeout_on_tick() -> None:
    book = IncidentBook()
    feed(book, [anomaly("search", 10)])
    assert book.tick(500.0) == []
    (e,) = book.tick(10.0 + Policy().incidents.escalate_after_s)
    assert e.entry == "escalated" and "not recovered" in e.reason


def test_entries_are_wire_shaped_and_json_serialisable() -> None:
    book = IncidentBook()
    entries = feed(book, [anomaly("search", 10)])
    d = entries[0].to_dict()
    assert set(d) >= {"id", "incident_id", "service", "state", "entry", "at", "reason"}
    assert "command_id" not in d
    json.dumps([e.to_dict() for e in entries])


@pytest.mark.parametrize("bad, field", [
    ({"service": "a", "series": "a|/|", "signal": "errors", "window_start": 1.0}, "id"),
    ({"id": "x", "service": "a", "series": "a|/", "signal": "errors", "window_start": 1.0},
     "series"),
    ({"id": "x", "service": "a", "series": "a|/|", "signal": "errors",
      "window_start": float("nan")}, "window_start"),
    ({"id": "x", "service": "a", "series": "a|/|", "signal": "errors", "window_start": 1.0,
      "evidence": [1]}, "evidence"),
    ("not a dict", "<anomaly>"),
])
def test_bad_anomaly_is_a_clear_error(bad: object, field: str) -> None:
    with pytest.raises(IncidentInputError) as exc:
        IncidentBook().on_anomaly(bad, 1.0)  # type: ignore[arg-type]
    assert exc.value.field == field


def test_bad_change_and_window_are_clear_errors() -> None:
    book = IncidentBook()
    with pytest.raises(IncidentInputError) as exc:
        book.on_change({"ts": 1.0, "service": "a", "change_id": "c", "kind": "restart"})
    assert exc.value.field == "kind"
    with pytest.raises(IncidentInputError) as exc:
        book.on_window({"service": "a", "window_start": "soon"})
    assert exc.value.field == "window_start"


# ---- suspect changes ----------------------------------------------------------------

def deploy(ts: float, svc: str = "payments", cid: str = "c1") -> dict:
    return {"ts": ts, "service": svc, "change_id": cid, "kind": "deploy",
            "from_version": "v1", "to_version": "v2"}


def test_suspect_is_latest_change_of_root_or_dependency_within_window() -> None:
    log = ChangeLog()
    pol = RollbackPolicy()
    log.add(deploy(100.0, cid="old"))
    log.add(deploy(500.0, cid="recent"))
    log.add(deploy(520.0, svc="inventory", cid="other-service"))
    log.add(deploy(900.0, cid="after-onset"))
    s = log.suspect(["payments"], 600.0, pol)
    assert s is not None and s.change_id == "recent"
    assert log.suspect(["payments", "inventory"], 600.0, pol).change_id == "other-service"
    assert log.suspect(["payments"], 1300.0, pol) is None  # 400 s before: too old
    assert log.suspect(["search"], 600.0, pol) is None


def test_duplicate_and_out_of_order_changes() -> None:
    log = ChangeLog()
    assert log.add(deploy(10.0, cid="b"))[1] is True
    assert log.add(deploy(10.0, cid="b"))[1] is False
    log.add(deploy(5.0, cid="a"))
    assert log.suspect(["payments"], 20.0, RollbackPolicy()).change_id == "b"


def _fill(log: ChangeLog, change: Change, new_err: int, old_err: int, concurrent: bool) -> None:
    for t in range(int(change.ts) - 30, int(change.ts)):
        log.add_window(window("payments", t, {"v1": 100}, {"v1": 1}))
    for t in range(int(change.ts), int(change.ts) + 5):
        counts = {"v2": 50, "v1": 50} if concurrent else {"v2": 100}
        errs = {"v2": new_err, "v1": old_err} if concurrent else {"v2": new_err}
        log.add_window(window("payments", t, counts, errs))


@pytest.mark.parametrize("concurrent", [True, False])
def test_evidence_confirms_a_clearly_worse_new_version(concurrent: bool) -> None:
    log = ChangeLog()
    c, _ = log.add(deploy(100.0))
    _fill(log, c, new_err=15, old_err=0, concurrent=concurrent)
    ev = log.evidence(c, RollbackPolicy())
    assert ev.confirmed, ev.reason
    assert ev.old_basis == ("concurrent" if concurrent else "before")
    assert ev.new_error_rate > 0.1 and ev.old_error_rate < 0.02


def test_evidence_does_not_confirm_an_equally_healthy_version() -> None:
    log = ChangeLog()
    c, _ = log.add(deploy(100.0))
    _fill(log, c, new_err=1, old_err=1, concurrent=True)
    ev = log.evidence(c, RollbackPolicy())
    assert not ev.confirmed and "not clearly worse" in ev.reason


def test_evidence_needs_enough_requests_on_the_new_version() -> None:
    log = ChangeLog()
    c, _ = log.add(deploy(100.0))
    log.add_window(window("payments", 100, {"v2": 5}, {"v2": 5}))
    ev = log.evidence(c, RollbackPolicy())
    assert not ev.confirmed and "too few" in ev.reason


def test_evidence_from_latency_when_errors_do_not_differ() -> None:
    log = ChangeLog()
    c, _ = log.add(deploy(100.0))
    for t in range(80, 100):
        log.add_window(window("payments", t, {"v1": 100}, p99=80.0))
    for t in range(100, 110):
        log.add_window(window("payments", t, {"v2": 100}, p99=300.0))
    ev = log.evidence(c, RollbackPolicy())
    assert ev.confirmed and "p99" in ev.reason


def test_egress_windows_do_not_count_as_the_services_versions() -> None:
    log = ChangeLog()
    c, _ = log.add(deploy(100.0))
    w = window("payments", 101, {"v2": 100}, {"v2": 90})
    w["dependency"] = "bank"
    log.add_window(w)
    assert log.evidence(c, RollbackPolicy()).new_requests == 0


def test_late_change_becomes_suspect_of_open_incident() -> None:
    book = IncidentBook()
    feed(book, [anomaly("payments", 100)])
    entries = book.on_change(deploy(99.0), 101.0)
    assert [e.entry for e in entries] == ["suspect"]
    assert book.open_incidents()[0].suspect["change"]["change_id"] == "c1"


def test_suspect_confirmed_later_by_windows_emits_a_second_suspect_entry() -> None:
    book = IncidentBook()
    book.on_change(deploy(99.5), 99.5)
    first = feed(book, [anomaly("payments", 100)])
    assert [e.suspect_change["confirmed"] for e in first if e.entry == "suspect"] == [False]
    later: list[TimelineEntry] = []
    for t in range(100, 103):
        later += book.on_window(window("payments", t, {"v2": 100}, {"v2": 30}), float(t))
    confirmed = [e for e in later if e.entry == "suspect"]
    assert len(confirmed) == 1 and confirmed[0].suspect_change["confirmed"] is True


def test_state_round_trip_preserves_everything() -> None:
    book = IncidentBook()
    book.on_change(deploy(99.5), 99.5)
    feed(book, [anomaly("checkout", 100, dep="payments"), anomaly("payments", 100)])
    book.on_window(window("payments", 101, {"v2": 100}, {"v2": 30}), 101.0)
    snap = json.loads(json.dumps(book.to_state()))
    again = IncidentBook.from_state(snap)
    assert again.to_state() == book.to_state()
    nxt = anomaly("payments", 102)
    assert [e.to_dict() for e in again.on_anomaly(nxt, 102.0)] == \
        [e.to_dict() for e in book.on_anomaly(dict(nxt), 102.0)]


def test_closed_incidents_are_evicted_beyond_the_bound() -> None:
    from dataclasses import replace

    from models.policy import IncidentPolicy
    policy = replace(Policy(), incidents=replace(IncidentPolicy(), max_open=3))
    book = IncidentBook(policy)
    for i in range(6):
        feed(book, [anomaly(f"svc{i}", 10.0 * i)])
        book.resolve(book.open_incidents()[0].id, 10.0 * i + 1, "ok")
    assert len(book.incidents()) == 3


# ---- telemetry gaps: presence is a service's own windows, on the windows' clock ------
FLEET = ("gateway", "checkout", "inventory", "search")


def _healthy(book: IncidentBook, t: float, skip: tuple[str, ...] = ()) -> list[TimelineEntry]:
    out: list[TimelineEntry] = []
    for s in FLEET:
        if s not in skip:
            out += book.on_window(window(s, t), t)
    return out + book.tick(t)


def _gaps(book: IncidentBook) -> list[str]:
    return sorted(i.root_service for i in book.incidents()
                  if i.reason.startswith("telemetry gap"))


def test_callers_failing_on_a_silent_dependency_do_not_hide_its_silence() -> None:
    """Callers' anomalies on calls to inventory say nothing about inventory's own
    telemetry: they used to refresh its 'last seen' time, so a silent inventory whose
    callers kept reporting errors on it was never declared a gap (flaky escalation)."""
    book = IncidentBook()
    for t in range(0, 60):
        _healthy(book, float(t))
    for t in range(60, 90):
        t = float(t)
        book.on_window(window("checkout", t), t)  # inventory: no windows from here on
        book.on_anomaly(anomaly("checkout", t, route="/stock", dep="inventory"), t)
        book.on_anomaly(anomaly("gateway", t, route="/stock", dep="inventory"), t)
        _healthy(book, t, skip=("inventory", "checkout"))
    assert _gaps(book) == ["inventory"]
    (gap,) = [i for i in book.incidents() if i.reason.startswith("telemetry gap")]
    assert gap.state == "escalated" and gap.opened_at == 74.0


def test_anomalies_running_ahead_of_windows_are_not_a_telemetry_gap() -> None:
    """The decider merges topics: a backlog of windows may be forwarded after anomalies
    of later seconds. Silence is measured on the windows' own clock, so the fleet's
    windows lagging the anomaly clock is not a gap for every service (nor a storm)."""
    book = IncidentBook()
    for t in range(0, 40):
        _healthy(book, float(t))
    for t in range(60, 90):  # anomalies first, the clock jumps ahead of the windows
        book.on_anomaly(anomaly("search", float(t)), float(t))
        book.tick(float(t))
    for t in range(40, 90):  # then the windows backlog arrives
        _healthy(book, float(t))
    assert _gaps(book) == []
    assert not book.storm_status(90.0)[0]


def test_a_silent_service_is_a_gap_on_the_windows_clock_and_idle_counts() -> None:
    book = IncidentBook()
    for t in range(0, 40):
        _healthy(book, float(t))
    for t in range(40, 54):
        _healthy(book, float(t), skip=("search",))
    assert _gaps(book) == [], "14 s of silence < telemetry_gap_s"
    _healthy(book, 54.0, skip=("search",))
    assert _gaps(book) == ["search"]
    # no input at all: only the decider's idle clock moves, and then everyone is silent
    book.on_idle(80.0)
    book.tick(80.0)
    assert _gaps(book) == sorted(FLEET)
    again = IncidentBook.from_state(json.loads(json.dumps(book.to_state())), book.policy)
    assert again.tick(81.0) == [], "one gap incident per silence, also after a restore"


def test_anomalous_windows_count_the_findings_windows_of_evidence() -> None:
    """A finding that needed two anomalous windows (listed, or pooled by its test)
    counts them for the hysteresis; one that says nothing counts its own window."""
    book = IncidentBook()
    debounced = anomaly("search", 100, "traffic", direction="surge")
    debounced["evidence"]["windows"] = [99.0, 100.0]
    book.on_anomaly(debounced, 100)
    assert book.open_incidents()[0].anomalous_windows == 2
    later = anomaly("search", 101, "traffic", direction="surge")
    later["evidence"]["windows"] = [99.0, 100.0, 101.0]
    book.on_anomaly(later, 101)
    assert book.open_incidents()[0].anomalous_windows == 3
    pooled = IncidentBook()
    a = anomaly("users", 100, "traffic", direction="surge")
    a["evidence"].update(windows=[100.0], pooled_windows=2.0)
    pooled.on_anomaly(a, 100)
    assert pooled.open_incidents()[0].anomalous_windows == 2
    plain = IncidentBook()
    plain.on_anomaly(anomaly("users", 100), 100)
    assert plain.open_incidents()[0].anomalous_windows == 1
    errors = IncidentBook()  # an error finding (isolation) keeps the full hysteresis
    e = anomaly("users", 100)
    e["evidence"]["windows"] = [99.0, 100.0]
    errors.on_anomaly(e, 100)
    assert errors.open_incidents()[0].anomalous_windows == 1


@pytest.mark.parametrize("evidence", [
    {"windows": "junk", "pooled_windows": "2"}, {"windows": [True, None, float("nan")]},
    {"pooled_windows": float("inf")}, {"windows": [1e12], "pooled_windows": -4},
])
def test_malformed_evidence_counts_one_window(evidence: dict) -> None:
    book = IncidentBook()
    a = anomaly("users", 100, "traffic", direction="surge")  # traffic: its evidence counts
    a["evidence"] = {**evidence, "direction": "surge"}
    book.on_anomaly(a, 100)
    assert book.open_incidents()[0].anomalous_windows == 1


def test_evidence_windows_are_capped() -> None:
    book = IncidentBook()
    a = anomaly("users", 100, "traffic", direction="surge")
    a["evidence"] = {"pooled_windows": 1e9}
    book.on_anomaly(a, 100)
    assert book.open_incidents()[0].anomalous_windows == 30


# ---- what the no-harm rules read from the book --------------------------------------------

def test_ledger_sums_error_responses_per_service_and_edge_over_windows() -> None:
    book = IncidentBook()
    for t in (10, 11, 12):
        book.on_window(window("checkout", t, counts={"v1": 100}, errors={"v1": 5}))
        book.on_window({**window("checkout", t, counts={"v1": 40}, errors={"v1": 1}),
                        "route": "/cart"})  # a second route of the same window: merged
        book.on_window({**window("checkout", t, counts={"v1": 50}, errors={"v1": 45}),
                        "dependency": "payments"})
    assert book.errors_between(["checkout"], 10, 12) == (12.0, 280.0, 2)
    assert book.errors_between(["checkout>payments"], 10, 13) == (135.0, 150.0, 3)
    assert book.errors_between(["checkout", "payments"], 12, 13) == (6.0, 140.0, 1)
    assert book.errors_between(["nobody"], 0, 100) == (0.0, 0.0, 0)


def test_upstream_follows_the_call_graph_of_the_egress_windows() -> None:
    book = IncidentBook()
    for caller, dep in (("gateway", "checkout"), ("checkout", "payments"),
                        ("users", "payments"), ("gateway", "users"), ("search", "inventory")):
        book.on_window({**window(caller, 1), "dependency": dep})
    assert book.upstream("payments") == {"checkout", "users", "gateway"}
    assert book.upstream("checkout") == {"gateway"}
    assert book.upstream("gateway") == set()


def test_shaped_service_anomalies_are_recorded_not_grouped_until_settle_after_lift() -> None:
    policy = Policy()
    book = IncidentBook(policy)
    feed(book, [anomaly("payments", 10)])
    (inc,) = book.open_incidents()
    book.set_shaped(inc.id, {"gateway": 12.0}, 12.0)
    (e,) = book.on_anomaly(anomaly("gateway", 20), 20)
    assert e.incident_id == inc.id and e.details["shaped"] is True
    assert e.details["counted"] is False
    assert "gateway" not in inc.members and inc.last_ws == 10
    book.set_shaped(inc.id, {}, 30.0)  # lifted at 30
    settle = policy.verify.settle_s
    (e,) = book.on_anomaly(anomaly("gateway", 30 + settle - 0.5), 34)
    assert e.details.get("shaped") is True
    entries = book.on_anomaly(anomaly("gateway", 30 + settle), 35)
    assert entries[0].entry == "opened" and len(book.open_incidents()) == 2
    # a finding whose evidence windows reach back into the shaped period is shaped too
    late = {**anomaly("gateway", 40, route="/x"), "evidence": {"pooled_windows": 12}}
    (e,) = book.on_anomaly(late, 40)
    assert e.details.get("shaped") is True


def test_rolled_back_change_is_no_suspect_and_the_book_state_round_trips() -> None:
    book = IncidentBook()
    book.on_change({"ts": 9.0, "service": "payments", "change_id": "c1", "kind": "deploy",
                    "from_version": "v1", "to_version": "v2"}, 9.0)
    book.on_window({**window("checkout", 9), "dependency": "payments"})
    book.mark_rolled_back("c1", 9.5)
    feed(book, [anomaly("payments", 10)])
    (inc,) = book.open_incidents()
    assert inc.suspect is None
    book.set_shaped(inc.id, {"checkout": 10.0}, 10.0)
    again = IncidentBook.from_state(json.loads(json.dumps(book.to_state())))
    assert again.changes.rolled_back("c1")
    assert again.upstream("payments") == {"checkout"}
    assert again.errors_between(["checkout>payments"], 0, 100) == \
        book.errors_between(["checkout>payments"], 0, 100)
    assert again.get(inc.id).shaped == {"checkout": [10.0, None]}  # type: ignore[union-attr]
