"""Signed operator control, the decider's one clock, mode precedence, lease bounds and
the mitigation view: the pure parts (the real-broker tests are in
tests/integration/test_trust.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agents.incidents import DecisionEngine
from app.cli import cli
from app.control import ControlGuard, ControlRejected, build_control
from app.status import MitigationView, format_status, with_remaining
from models.enforcement import CommandGate, Verdict
from models.mitigation import Mitigator
from models.policy import Policy, PolicyError, policy_from_dict
from schemas.records import ControlMessage
from schemas.signing import KeyRing, load_private_key

NOW = 1_800_000_000.0
DAY = 86_400.0


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def guard(key: Ed25519PrivateKey) -> ControlGuard:
    return ControlGuard(KeyRing({"op-ann": key.public_key()}), max_age_s=600, max_skew_s=300)


def signed(key: Ed25519PrivateKey, action: str = "pause", kid: str = "op-ann",
           **kw: Any) -> dict[str, Any]:
    """A control message as it arrives: signed, then through JSON."""
    kw.setdefault("at", NOW)
    msg = build_control(action, operator="ann", key=key, kid=kid, **kw)
    return dict(orjson.loads(orjson.dumps(msg)))


# ------------------------------------------------------------------------ the guard
def test_signed_control_passes_and_names_its_key(key: Ed25519PrivateKey,
                                                 guard: ControlGuard) -> None:
    msg = signed(key, "approve", target="inc-1")
    record, kid = guard.check(msg, NOW + 1)
    assert kid == "op-ann"
    assert (record["action"], record["target"], record["operator"]) == \
        ("approve", "inc-1", "ann")
    ControlMessage.from_dict(msg)  # the wire shape is the schema's


@pytest.mark.parametrize("tamper, category, text", [
    (lambda m: m.pop("signature"), "unsigned", "unsigned"),
    (lambda m: m.update(signature=None), "unsigned", "unsigned"),
    (lambda m: m.update(action="resume"), "forged", "bad signature"),
    (lambda m: m.update(operator="mallory"), "forged", "bad signature"),
    (lambda m: m["signature"].update(kid="op-bob"), "forged", "unknown kid"),
    (lambda m: m["signature"].update(alg="hs256"), "forged", "wrong alg"),
])
def test_unsigned_forged_and_untrusted_control_is_refused(
        key: Ed25519PrivateKey, guard: ControlGuard, tamper: Any, category: str,
        text: str) -> None:
    msg = signed(key)
    tamper(msg)
    with pytest.raises(ControlRejected) as info:
        guard.check(msg, NOW)
    assert info.value.category == category and text in info.value.reason
    assert guard.to_state() == {}  # a refused message's id is not remembered


def test_another_key_under_a_trusted_kid_is_forged(key: Ed25519PrivateKey,
                                                   guard: ControlGuard) -> None:
    mallory = Ed25519PrivateKey.generate()
    with pytest.raises(ControlRejected, match="bad signature"):
        guard.check(signed(mallory, "approve", target="inc-1"), NOW)


def test_replayed_expired_and_future_control_is_refused(key: Ed25519PrivateKey,
                                                        guard: ControlGuard) -> None:
    msg = signed(key)
    guard.check(msg, NOW)
    with pytest.raises(ControlRejected) as info:
        guard.check(msg, NOW + 5)
    assert info.value.category == "replayed"
    with pytest.raises(ControlRejected) as info:
        guard.check(signed(key, at=NOW - 601), NOW)
    assert info.value.category == "expired" and "601 s" in info.value.reason
    with pytest.raises(ControlRejected) as info:
        guard.check(signed(key, at=NOW + DAY), NOW)
    assert info.value.category == "future"
    guard.check(signed(key, at=NOW - 599), NOW)  # inside the bounds: fine
    guard.check(signed(key, at=NOW + 299), NOW)


def test_seen_ids_survive_a_snapshot(key: Ed25519PrivateKey, guard: ControlGuard) -> None:
    msg = signed(key)
    guard.check(msg, NOW)
    other = ControlGuard(guard.ring, 600, 300)
    other.load_state(orjson.loads(orjson.dumps(guard.to_state())))
    with pytest.raises(ControlRejected, match="replayed"):
        other.check(msg, NOW + 1)


def test_unsigned_build_is_only_for_tests_and_fails_the_schema() -> None:
    msg = build_control("pause", operator="x", at=NOW)
    assert "signature" not in msg
    with pytest.raises(ValueError, match="signature"):
        ControlMessage.from_dict(msg)


# ------------------------------------------------------------------- the engine
def engine(key: Ed25519PrivateKey, policy: Policy | None = None,
           skew: float | None = 300.0) -> DecisionEngine:
    policy = policy or Policy()
    guard = ControlGuard(KeyRing({"op-ann": key.public_key()}), 600, 300)
    return DecisionEngine(policy, Mitigator(policy), control_guard=guard, max_skew_s=skew)


def window(t: float, svc: str = "search") -> bytes:
    return orjson.dumps({"service": svc, "route": "/", "window_start": t, "window_s": 1.0,
                         "count": 10, "errors": 0, "p50": 1.0, "p90": 2.0, "p99": 3.0,
                         "sketch": {"relative_accuracy": 0.01, "bins": {"50": 10},
                                    "zero_count": 0}})


def test_unsigned_control_changes_nothing_in_the_engine(key: Ed25519PrivateKey) -> None:
    eng = engine(key)
    unsigned = build_control("approve", target="inc-1", operator="mallory", at=NOW)
    out = eng.feed("control", orjson.dumps(unsigned), NOW)
    assert [c for _, c in out.rejected] == ["unsigned"]
    assert out.rejected[0][0].startswith("control: unsigned")
    assert eng.mitigator is not None and not eng.mitigator._approved
    out = eng.feed("control", orjson.dumps(signed(key, "pause")), NOW)
    assert not out.rejected and out.mode_changed and eng.mode()["paused"]
    assert eng.mode_changes[-1]["by"] == "ann (key op-ann)"


def test_control_without_trusted_keys_is_refused() -> None:
    policy = Policy()
    eng = DecisionEngine(policy, Mitigator(policy), max_skew_s=300.0)
    out = eng.feed("control", orjson.dumps(signed(Ed25519PrivateKey.generate())), NOW)
    assert out.rejected and not eng.mode()["paused"]


def test_future_window_and_change_are_quarantined_not_trusted(key: Ed25519PrivateKey) -> None:
    eng = engine(key)
    eng.feed("window", window(NOW - 2), NOW)
    assert eng.clock == NOW - 2
    out = eng.feed("window", window(NOW + 30 * DAY), NOW)
    assert out.rejected == [(out.rejected[0][0], "future")]
    assert "ahead of its arrival" in out.rejected[0][0]
    change = {"ts": NOW + 30 * DAY, "service": "search", "change_id": "c1", "kind": "deploy",
              "from_version": "v1", "to_version": "v2"}
    out = eng.feed("change", orjson.dumps(change), NOW)
    assert [c for _, c in out.rejected] == ["future"]
    assert eng.clock == NOW - 2  # the clock did not move
    eng.feed("window", window(NOW + 200), NOW)  # within the skew: trusted
    assert eng.clock == NOW + 200


def test_offline_engine_has_no_wall_clock_check(key: Ed25519PrivateKey) -> None:
    eng = engine(key, skew=None)
    out = eng.feed("window", window(NOW + 30 * DAY), NOW)
    assert not out.rejected and eng.clock == NOW + 30 * DAY


def test_policy_file_holds_at_start_up_over_saved_state(key: Ed25519PrivateKey) -> None:
    policy = policy_from_dict({"safeguards": {"approval": True, "dry_run": True}})
    saved = engine(key, Policy())
    saved.feed("control", orjson.dumps(signed(key, "pause")), NOW)
    state = orjson.loads(orjson.dumps(saved.to_state()))
    assert state["mitigator"]["approval"] is False
    eng = engine(key, policy)
    eng.load_state(state)
    assert eng.mode() == {"paused": True, "dry_run": False, "approval": False}
    line = eng.start_up(NOW + 10)
    # approval and dry-run from the file; pause (the operators' kill switch) stays
    assert eng.mode() == {"paused": True, "dry_run": True, "approval": True}
    assert "saved state had approval=False dry_run=False" in line
    assert eng.mode_changes[-1]["by"] == "policy file"
    # a dry-run toggle that reached the input before this start-up (replayed) is
    # superseded; one sent after it holds until the next
    out = eng.feed("control", orjson.dumps(signed(key, "dry-run-off", at=NOW + 5)), NOW + 5)
    assert eng.mode()["dry_run"] and "policy file holds" in out.controls[0]
    eng.feed("control", orjson.dumps(signed(key, "dry-run-off", at=NOW + 20)), NOW + 20)
    assert not eng.mode()["dry_run"]
    assert [(c["by"], c["mode"]["dry_run"]) for c in eng.mode_changes] == [
        ("ann (key op-ann)", False), ("policy file", True), ("ann (key op-ann)", False)]


# ----------------------------------------------------------------- leases bounded
def test_policy_lease_is_bounded_by_max_lease() -> None:
    assert Policy().safeguards.lease_s <= Policy().safeguards.max_lease_s
    with pytest.raises(PolicyError, match="max_lease_s"):
        policy_from_dict({"safeguards": {"lease_s": 700.0}})
    p = policy_from_dict({"safeguards": {"lease_s": 700.0, "max_lease_s": 900.0}})
    assert p.safeguards.max_lease_s == 900.0


def gate_cmd(issued_at: float, expires_at: float, cid: str = "inc-1:throttle:1") -> dict:
    return {"id": cid, "kind": "throttle", "service": "checkout", "target": "*",
            "params": {"rate_per_s": 5.0}, "incident_id": "inc-1", "issued_at": issued_at,
            "expires_at": expires_at, "reason": "r",
            "signature": {"kid": "k1", "alg": "ed25519", "sig": "AAAA"}}


def test_gate_refuses_a_ten_year_lease_and_a_command_from_tomorrow() -> None:
    gate = CommandGate("checkout", lambda _: None)
    decade = gate.check(gate_cmd(NOW, NOW + 3650 * DAY, "a"), "checkout", NOW)
    assert (decade.action, decade.reason) == \
        ("reject", "lease 315360000 s exceeds the max lease 600 s")
    tomorrow = gate.check(gate_cmd(NOW + DAY, NOW + DAY + 60, "b"), "checkout", NOW)
    assert tomorrow.action == "reject" and "86400 s in the future" in tomorrow.reason
    assert not gate.seen("a") and not gate.seen("b")  # not kept in the replay set
    ok: Verdict = gate.check(gate_cmd(NOW + 10, NOW + 70, "c"), "checkout", NOW)
    assert ok.action == "apply"
    wide = CommandGate("checkout", lambda _: None, max_lease_s=4 * DAY, max_skew_s=2 * DAY)
    assert wide.check(gate_cmd(NOW + DAY, NOW + 2 * DAY, "d"), "checkout", NOW).action == \
        "apply"


# -------------------------------------------------------------- the mitigation view
class FakeMonotonic:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def fact(clock: float, mitigated: dict[str, float], **kw: Any) -> dict[str, Any]:
    return {"version": 1, "clock": clock, "at": NOW, "mitigated": mitigated,
            "mode": {"paused": False, "dry_run": False, "approval": True}, "active": [],
            "pending": [], "open_incidents": [], "mode_changes": [], **kw}


def test_view_answers_from_the_fact_and_lets_leases_lapse_without_a_decider() -> None:
    mono = FakeMonotonic()
    view = MitigationView(monotonic=mono)
    assert not view("search")
    view.update(fact(1000.0, {"search": 1060.0, "payments": 1010.0}))
    assert view("search") and view("payments") and not view("users")
    assert view.services() == ["payments", "search"]
    mono.t += 30  # no newer fact (the decider died): its clock advances by local time
    assert view("search") and not view("payments")
    mono.t += 40
    assert view.services() == []
    view.update({"mitigated": "garbage"})
    assert view.stats["unreadable"] == 1 and view.fact is not None


def test_status_text_shows_mode_incidents_and_leases() -> None:
    active = [{"kind": "throttle", "service": "search", "target": "/q",
               "params": {"rate_per_s": 120.0, "route": "/q"}, "incident_id": "inc-1",
               "command_id": "inc-1:throttle:2", "issued_at": 990.0, "expires_at": 1050.0,
               "since": 960.0}]
    f = fact(1000.0, {"search": 1050.0}, active=active,
             open_incidents=[{"id": "inc-1", "root_service": "search", "state": "mitigating",
                              "onset": 950.0, "opened_at": 955.0, "services": ["search"]}],
             pending=[{"command_id": "inc-2:rollback:1", "kind": "rollback",
                       "service": "payments", "target": "v41", "incident_id": "inc-2"}])
    assert with_remaining(f, NOW + 10)["active"][0]["lease_remaining_s"] == 40.0
    text = format_status(f, NOW + 10)
    assert "mode: active, dry-run off, approval on" in text
    assert "open incidents: 1" in text and "inc-1  search  mitigating" in text
    assert "throttle search -> /q rate_per_s=120.0 route=/q  lease 40 s left" in text
    assert "stanch approve inc-2:rollback:1" in text


def test_cli_status_and_operator_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    listed = runner.invoke(cli, ["--help"]).output
    assert "  status " in listed and "  keys " in listed
    out = runner.invoke(cli, ["keys", "generate", "--operator", "--kid", "op-ann", "--out",
                              str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "STANCH_TRUSTED_OPERATOR_KEYS_DIR" in out.output
    ring = KeyRing.from_dir(tmp_path)
    msg = build_control("resume", operator="ann", at=NOW,
                        key=load_private_key(tmp_path / "op-ann.key.pem"), kid="op-ann")
    ring.verify(msg)
    # no operator key: a clear message, nothing sent
    monkeypatch.setenv("STANCH_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("STANCH_KAFKA_BOOTSTRAP", "127.0.0.1:1")
    res = runner.invoke(cli, ["pause"])
    assert res.exit_code == 2 and "no operator key" in res.output


# ------------------------------------------------------------------ health, settings
class _Agent:
    def __init__(self, name: str, crashed: bool = False) -> None:
        self.name, self.crashed = name, crashed


class _Task:
    def __init__(self, state: str) -> None:
        self.state = state
        self.stats: dict[str, int] = {}

    def health(self) -> dict[str, Any]:
        return {"state": self.state}


class _App:
    def __init__(self, decider: str, view: str, crashed: bool = False) -> None:
        self.agents = {"a": _Agent("stanch.forward.window", crashed)}
        self.stanch_decider = _Task(decider)
        self.stanch_mitigated = _Task(view)


@pytest.mark.parametrize("decider, view, crashed, status, failed", [
    ("running", "running", False, "ok", []),
    ("starting", "running", False, "ok", []),
    ("failed", "running", False, "failing", ["decider"]),
    ("running", "stuck", False, "failing", ["mitigation_view"]),
    ("running", "running", True, "failing", []),
])
def test_health_covers_every_agent_the_decider_and_the_view(
        decider: str, view: str, crashed: bool, status: str, failed: list[str]) -> None:
    from app.web import health

    body = health(_App(decider, view, crashed))  # type: ignore[arg-type]
    assert body["status"] == status and body["failed_tasks"] == failed
    assert set(body["tasks"]) == {"decider", "mitigation_view"}
    assert body["crashed_agents"] == (["stanch.forward.window"] if crashed else [])


def test_operator_settings_are_checked(tmp_path: Path) -> None:
    from app.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="STANCH_TRUSTED_OPERATOR_KEYS_DIR"):
        load_settings(trusted_operator_keys_dir=tmp_path / "missing")
    with pytest.raises(SettingsError, match="operator_key_file|OPERATOR_KEY_FILE"):
        load_settings(operator_key_file=tmp_path / "missing.key.pem")
    s = load_settings(trusted_operator_keys_dir=tmp_path)
    assert s.control_max_age_s == 600.0 and s.max_lease_s == Policy().safeguards.max_lease_s


def test_status_says_when_the_fact_is_stale() -> None:
    f = fact(1000.0, {})
    assert "stale" not in format_status(f, NOW + 2)
    assert "stale: the decider publishes every second" in format_status(f, NOW + 60)
