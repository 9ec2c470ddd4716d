"""No harm, by construction, on a real broker: a worker's decider driven by windows,
anomalies and changes this test publishes (helpers of test_incident_agents.py), so every
expectation is exact. What is checked (issue 10, docs/mitigation.md "No harm"):

- a change is rolled back at most once: a second incident after the rollback, with the
  rolled-back deploy still inside the suspect window, neither blames it nor rolls it
  back again;
- a traffic surge after a rollback is judged on its own and throttled;
- an action that makes things worse (the isolating caller's error responses jump,
  because its fail-fast answers are errors to its own callers) is reverted at the first
  before/after comparison, and the verdict is on the timeline.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from app.settings import Settings
from tests.integration.test_incident_agents import (
    NO_IDLE_GAPS,
    ONSET,
    SERVICES,
    T0,
    anomaly,
    feed,
    policy_settings,
    start_decider,
    topic,
    wait_for,
    wait_processed,
    window,
)

pytestmark = pytest.mark.integration

CHANGE = {"ts": ONSET + 0.5, "service": "payments", "change_id": "chg-42", "kind": "deploy",
          "from_version": "v41", "to_version": "v42"}


def deploy_then(after: Any) -> Any:
    """payments runs a bad v42 from ONSET until ONSET + 6 (as if the rollback fixed it
    then), healthy afterwards; ``after(t)`` adds anomalies and may override windows."""
    def step(t: float) -> tuple[list[dict], list[dict], list[dict]]:
        bad = ONSET < t < ONSET + 6
        ws = [window(s, t) for s in SERVICES if s != "payments"]
        ws.append(window("payments", t, errors=25 if bad else 0,
                         version="v42" if bad else "v41", p99=240.0 if bad else 80.0))
        an = [anomaly("payments", t, observed=0.25, expected=0.003)] if bad else []
        extra_ws, extra_an = after(t)
        if extra_ws:
            ws = [w for w in ws if w["service"] not in {x["service"] for x in extra_ws}]
            ws += extra_ws
        return ws, an + extra_an, [CHANGE] if t == ONSET else []
    return step


def kinds(commands: list[dict]) -> list[tuple[str, str, str]]:
    return [(c["kind"], c["service"], c["target"]) for c in commands]


@pytest.fixture
def quiet(topics: Settings, tmp_path: Path) -> Settings:
    return policy_settings(topics, tmp_path, NO_IDLE_GAPS)


def test_a_change_is_rolled_back_once_and_is_then_no_suspect(
        quiet: Settings, tmp_path: Path) -> None:
    """The rollback resolves the first incident (stable_s = 60 s of healthy windows);
    payments fails again at ONSET + 100, 99.5 s after the deploy (inside the 300 s
    suspect window): a second incident, no suspect, no second rollback."""
    def again(t: float) -> tuple[list[dict], list[dict]]:
        if ONSET + 100 <= t < ONSET + 110:
            return ([window("payments", t, errors=25, version="v41")],
                    [anomaly("payments", t, observed=0.25, expected=0.003)])
        return [], []

    worker = start_decider(quiet, tmp_path / "worker.log")
    try:
        # in two parts: the decider merges topics, and the few anomalies of the second
        # failure would otherwise overtake the thousand windows of the recovery
        sent = feed(quiet, deploy_then(again), T0, ONSET + 80)
        wait_processed(quiet, sent)
        feed(quiet, deploy_then(again), ONSET + 80, ONSET + 115, sent)
        wait_processed(quiet, sent)
    finally:
        worker.stop()
    commands = topic(quiet, "commands")
    assert [k for k in kinds(commands) if k[0] == "rollback"] == \
        [("rollback", "payments", "v41")]
    entries = topic(quiet, "incidents")
    incidents = sorted({e["incident_id"] for e in entries})
    assert len(incidents) == 2, [(e["at"] - ONSET, e["entry"], e["reason"][:80]) for e in entries
                                 if e["entry"] != "anomaly"]
    first = next(e for e in entries if e["entry"] == "command")["incident_id"]
    (second,) = [i for i in incidents if i != first]
    assert any(e["entry"] == "resolved" and e["incident_id"] == first for e in entries)
    assert not [e for e in entries if e["incident_id"] == second and e["entry"] == "suspect"]


def test_a_surge_after_a_rollback_gets_a_throttle(quiet: Settings, tmp_path: Path) -> None:
    """10 s after the deploy payments' traffic surges 5x, in the same incident: the
    surge is not the rolled-back deploy's doing, it is throttled."""
    def surge(t: float) -> tuple[list[dict], list[dict]]:
        if ONSET + 10 <= t < ONSET + 25:
            return [], [anomaly("payments", t, "traffic", route="/charge", observed=500.0,
                                expected=100.0, direction="surge")]
        return [], []

    worker = start_decider(quiet, tmp_path / "worker.log")
    try:
        sent = feed(quiet, deploy_then(surge), T0, ONSET + 8)  # the rollback first
        wait_processed(quiet, sent)
        feed(quiet, deploy_then(surge), ONSET + 8, ONSET + 30, sent)
        wait_processed(quiet, sent)
    finally:
        worker.stop()
    commands = topic(quiet, "commands")
    got = kinds(commands)
    assert got.count(("rollback", "payments", "v41")) == 1, got
    throttles = [c for c in commands if c["kind"] == "throttle"]
    assert throttles and throttles[0]["service"] == "payments", got
    assert throttles[0]["params"] == {"rate_per_s": 120.0, "route": "/charge"}
    rollback = next(c for c in commands if c["kind"] == "rollback")
    assert throttles[0]["issued_at"] >= ONSET + 10 > rollback["issued_at"]
    assert {c["incident_id"] for c in commands} == {rollback["incident_id"]}


def test_an_action_that_makes_things_worse_is_reverted_and_recorded(
        quiet: Settings, tmp_path: Path) -> None:
    """payments fails; checkout fails 90 % of its calls to it and is isolated. Once the
    isolation is in force checkout answers 80 errors a window instead of 5: the scope's
    error responses rose far beyond noise, the isolation is reverted with a restore at
    the first comparison and the verdict is on the timeline."""
    issued: list[float] = []

    def step(t: float) -> tuple[list[dict], list[dict], list[dict]]:
        down = t >= ONSET
        worse = bool(issued) and t >= issued[0] + 1
        ws = [window(s, t) for s in SERVICES if s not in ("payments", "checkout")]
        ws.append(window("payments", t, errors=60 if down else 0))
        ws.append(window("checkout", t, errors=80 if worse else 5 if down else 0))
        ws += [{**window("gateway", t, count=50), "dependency": "checkout"},
               {**window("checkout", t, count=50), "dependency": "payments"}]
        an = [anomaly("payments", t, route="/charge", observed=0.6, expected=0.01),
              anomaly("checkout", t, route="/pay", dep="payments", observed=0.9,
                      expected=0.01)] if down else []
        return ws, an, []

    worker = start_decider(quiet, tmp_path / "worker.log")
    try:
        sent = feed(quiet, step, T0, ONSET + 3)
        isolate = wait_for(quiet, "commands", lambda cs: any(c["kind"] == "isolate"
                                                             for c in cs))
        issued.append(next(c["issued_at"] for c in isolate if c["kind"] == "isolate"))
        feed(quiet, step, ONSET + 3, ONSET + 25, sent)
        wait_processed(quiet, sent)
    finally:
        worker.stop()
    commands = topic(quiet, "commands")
    got = kinds(commands)
    assert got[0] == ("isolate", "checkout", "payments"), got
    restores = [c for c in commands if c["kind"] == "restore"]
    assert len(restores) == 1, got
    assert restores[0]["service"] == "checkout" and restores[0]["target"] == "payments"
    assert restores[0]["params"] == {"kind": "isolate"} and "worse" in restores[0]["reason"]
    # at the first comparison: settle_s + compare_windows after the isolation
    assert restores[0]["issued_at"] - issued[0] <= 3.0 + 5.0 + 5.0
    # not tried again for this incident (only renewals could follow, and none did)
    assert got.count(("isolate", "checkout", "payments")) == 1
    entries = topic(quiet, "incidents")
    verdicts = [e for e in entries if (e.get("details") or {}).get("verdict") == "worse"]
    assert {e["entry"] for e in verdicts} == {"decision", "restore_step"}
    judged = next(e for e in verdicts if e["entry"] == "decision")
    assert set(judged["details"]["scope"]) == {"checkout", "gateway", "payments"}
    before, after = judged["details"]["before"], judged["details"]["after"]
    assert after[0] / after[1] > before[0] / before[1]
    assert Counter(e["entry"] for e in entries)["escalated"] == 0
