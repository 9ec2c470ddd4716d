"""Pure enforcement logic: routes, token bucket, gate state machine, leases, decisions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from models.enforcement import (
    PASS,
    CommandError,
    CommandGate,
    EnforcementTable,
    RouteMatcher,
    TokenBucket,
    parse_command,
)

T0 = 1_700_000_000.0


def cmd(kind: str = "throttle", /, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": f"inc-1:{kind}:1",
        "kind": kind,
        "service": "checkout",
        "target": "checkout",
        "params": {},
        "incident_id": "inc-1",
        "issued_at": T0,
        "expires_at": T0 + 60,
        "reason": "test",
        "signature": {"kid": "k1", "alg": "ed25519", "sig": "x"},
    }
    defaults = {
        "throttle": {"rate_per_s": 10.0},
        "shed": {"share": 0.5},
        "isolate": {},
        "rollback": {},
        "restore": {"kind": "throttle"},
    }
    base["params"] = defaults.get(kind, {})
    if kind == "isolate":
        base["target"] = "payments"
    if kind == "rollback":
        base["target"] = "v41"
    base.update(overrides)
    return base


def parsed(kind: str = "throttle", /, **overrides: Any):  # noqa: ANN201 - test helper
    return parse_command(cmd(kind, **overrides))


def accept_all(_: Mapping[str, Any]) -> None:
    return None


# --------------------------------------------------------------------------- routes


def test_route_matcher_templates_fallback_and_bound() -> None:
    m = RouteMatcher(["/orders/{id}", "/orders/{id}/items", "/health"], max_fallbacks=2)
    assert m.match("/orders/42") == "/orders/{id}"
    assert m.match("/orders/42/items") == "/orders/{id}/items"
    assert m.match("/health") == "/health"
    assert m.match("/") == "/"
    assert m.match("/users/7/x") == "/users/*"
    assert m.match("/users") == "/users"
    assert m.match("/carts/1") == "/carts/*"
    # the third distinct unknown first segment collapses: cardinality stays bounded
    assert m.match("/random123/a") == "/*"
    assert m.match("/users/8") == "/users/*"
    with pytest.raises(ValueError, match="must start with"):
        RouteMatcher(["orders"])


# --------------------------------------------------------------------------- token bucket


def test_token_bucket_burst_then_rate_and_retry_after() -> None:
    bucket = TokenBucket(rate_per_s=10.0, burst=5.0, now=T0)
    assert [bucket.take(T0) for _ in range(5)] == [0.0] * 5
    wait = bucket.take(T0)
    assert wait == pytest.approx(0.1)
    assert bucket.take(T0 + 0.1) == 0.0  # one token refilled
    # over one second at most rate tokens are granted once the burst is spent
    granted = sum(bucket.take(T0 + 0.1 + i / 100) == 0.0 for i in range(1, 101))
    assert 9 <= granted <= 11


def test_token_bucket_zero_rate_never_refills() -> None:
    bucket = TokenBucket(rate_per_s=0.0, burst=1.0, now=T0)
    assert bucket.take(T0) == 0.0
    assert bucket.take(T0 + 100) == float("inf")


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kind": "reboot"}, "kind"),
        ({"id": ""}, "id"),
        ({"expires_at": "soon"}, "expires_at"),
        ({"issued_at": True}, "issued_at"),
        ({"params": []}, "params"),
        ({"params": {"rate_per_s": -1}}, "params.rate_per_s"),
        ({"params": {"rate_per_s": 1, "route": 5}}, "params.route"),
    ],
)
def test_parse_command_names_the_bad_field(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        parse_command(cmd("throttle", **overrides))


def test_parse_command_kind_specific_params() -> None:
    with pytest.raises(CommandError, match="params.share"):
        parse_command(cmd("shed", params={"share": 1.5}))
    with pytest.raises(CommandError, match="params.routes"):
        parse_command(cmd("shed", params={"share": 0.5, "routes": "/a"}))
    with pytest.raises(CommandError, match="target"):
        parse_command(cmd("isolate", target=""))
    with pytest.raises(CommandError, match="target"):
        parse_command(cmd("rollback", target=""))
    with pytest.raises(CommandError, match="params.kind"):
        parse_command(cmd("restore", params={"kind": "rollback"}))
    with pytest.raises(CommandError, match="params.step"):
        parse_command(cmd("restore", params={"kind": "shed", "step": 0}))


# --------------------------------------------------------------------------- gate


def test_gate_state_machine() -> None:
    gate = CommandGate("checkout", accept_all)
    ok = gate.check(cmd(), "checkout", T0 + 1)
    assert ok.action == "apply" and ok.command is not None
    assert gate.check(cmd(), "checkout", T0 + 2).action == "reject"
    assert gate.check(cmd(), "checkout", T0 + 2).reason == "replayed"
    other = gate.check(cmd(service="payments", id="x"), "payments", T0)
    assert other.action == "ignore"
    mismatch = gate.check(cmd(id="y"), "payments", T0)
    assert mismatch.action == "reject" and "message key" in mismatch.reason
    mismatch2 = gate.check(cmd(service="payments", id="z"), "checkout", T0)
    assert mismatch2.action == "reject"
    late = gate.check(cmd(id="late", expires_at=T0 + 5), "checkout", T0 + 10)
    assert late.action == "expire"
    assert gate.check(cmd(id="bad", kind="nope"), "checkout", T0).reason.startswith("malformed")
    assert gate.check("not a dict", "checkout", T0).action == "reject"  # garbage keyed to us
    assert gate.check("not a dict", "payments", T0).action == "ignore"
    assert gate.check(None, None, T0).action == "ignore"


def test_gate_rejects_bad_signature_without_remembering_the_id() -> None:
    def verify(command: Mapping[str, Any]) -> None:
        if command["signature"]["sig"] != "good":
            raise ValueError("bad signature")

    gate = CommandGate("checkout", verify)
    forged = gate.check(cmd(signature={"kid": "k1", "alg": "ed25519", "sig": "evil"}),
                        "checkout", T0)
    assert (forged.action, forged.reason) == ("reject", "bad signature")
    # the genuine command with the same id is still accepted: forgeries cannot poison ids
    genuine = gate.check(cmd(signature={"kid": "k1", "alg": "ed25519", "sig": "good"}),
                         "checkout", T0)
    assert genuine.action == "apply"


def test_gate_extra_schema_parser_rejects_with_its_text() -> None:
    def strict(_: Any) -> None:
        raise ValueError("reason: '' must not be empty")

    verdict = CommandGate("checkout", accept_all).check(cmd(), "checkout", T0, parse=strict)
    assert verdict.action == "reject" and "must not be empty" in verdict.reason


def test_gate_prunes_expired_ids_but_they_stay_refused() -> None:
    gate = CommandGate("checkout", accept_all)
    for i in range(1500):
        gate.check(cmd(id=f"c{i}", expires_at=T0 + 1), "checkout", T0)
    assert gate.seen("c0")  # nothing has expired yet: everything is remembered
    for i in range(1500):
        assert gate.check(cmd(id=f"f{i}"), "checkout", T0 + 10).action == "apply"
    assert not gate.seen("c0")  # pruned ...
    assert gate.check(cmd(id="c0", expires_at=T0 + 1), "checkout", T0 + 10).action == "expire"


# --------------------------------------------------------------------------- table


def test_throttle_per_route_429_with_retry_after_and_other_routes_pass() -> None:
    table = EnforcementTable()
    out = table.apply(parsed(params={"rate_per_s": 2.0, "burst": 2, "route": "/orders/{id}"}), T0)
    assert out.status == "applied"
    decisions = [table.decide_ingress("/orders/{id}", T0) for _ in range(3)]
    assert [d.status for d in decisions] == [0, 0, 429]
    assert decisions[2].retry_after_s == 1
    assert table.decide_ingress("/health", T0) is PASS


def test_global_throttle_applies_to_every_route() -> None:
    table = EnforcementTable()
    table.apply(parsed(params={"rate_per_s": 1.0}), T0)
    assert table.decide_ingress("/a", T0).status == 0
    assert table.decide_ingress("/b", T0).status == 429


def test_lease_expiry_lifts_fail_open_and_renewal_extends() -> None:
    table = EnforcementTable()
    table.apply(parsed(params={"rate_per_s": 0.0, "burst": 1}, expires_at=T0 + 10), T0)
    table.decide_ingress("/a", T0)
    assert table.decide_ingress("/a", T0 + 5).status == 429
    assert table.decide_ingress("/a", T0 + 5).retry_after_s == 5  # until the lease ends
    # renewal: same kind/key, later lease
    renew = parsed(id="inc-1:throttle:2", params={"rate_per_s": 0.0, "burst": 1},
                   issued_at=T0 + 8, expires_at=T0 + 20)
    assert "renewed" in table.apply(renew, T0 + 8).reason
    assert table.decide_ingress("/a", T0 + 15).status == 429
    assert table.expire(T0 + 15) == []
    lifted = table.expire(T0 + 20)
    assert [e.command_id for e in lifted] == ["inc-1:throttle:2"]
    assert table.decide_ingress("/a", T0 + 20) is PASS
    assert len(table) == 0


def test_decision_ignores_a_passed_lease_even_before_expire_runs() -> None:
    table = EnforcementTable()
    table.apply(parsed(params={"rate_per_s": 0.0, "burst": 1}, expires_at=T0 + 1), T0)
    table.decide_ingress("/a", T0)
    assert table.decide_ingress("/a", T0 + 1.5) is PASS


def test_older_command_does_not_override_a_newer_one() -> None:
    table = EnforcementTable()
    table.apply(parsed(id="new", issued_at=T0 + 5), T0 + 5)
    out = table.apply(parsed(id="old", issued_at=T0), T0 + 6)
    assert out.status == "rejected" and "superseded by new" in out.reason


def test_shed_exact_share_on_listed_routes_only() -> None:
    table = EnforcementTable()
    table.apply(parsed("shed", params={"share": 0.25, "routes": ["/search"]}), T0)
    shed = sum(table.decide_ingress("/search", T0).status == 503 for _ in range(100))
    assert shed == 25
    assert all(table.decide_ingress("/orders", T0).status == 0 for _ in range(20))
    table.apply(parsed("shed", id="s2", target="all", params={"share": 1.0}), T0)
    assert table.decide_ingress("/orders", T0).status == 503


def test_isolate_fails_fast_with_half_open_probes() -> None:
    table = EnforcementTable()
    table.apply(parsed("isolate", params={"half_open_share": 0.1}), T0)
    decisions = [table.decide_egress("payments", T0) for _ in range(50)]
    assert sum(d.status == 0 for d in decisions) == 5
    refused = next(d for d in decisions if d.status)
    assert (refused.status, refused.isolated) == (503, "payments")
    assert table.decide_egress("inventory", T0) is PASS


def test_restore_lifts_or_ramps() -> None:
    table = EnforcementTable()
    table.apply(parsed(params={"rate_per_s": 10.0, "route": "/a"}), T0)
    table.apply(parsed("shed", params={"share": 0.8}), T0)
    table.apply(parsed("isolate"), T0)
    ramp = table.apply(parsed("restore", id="r1", params={"kind": "throttle", "step": 0.5}), T0)
    assert ramp.status == "applied" and "ramped" in ramp.reason
    assert table.throttles["/a"].bucket.rate == pytest.approx(15.0)  # type: ignore[union-attr]
    table.apply(parsed("restore", id="r2", params={"kind": "throttle", "rate_per_s": 40}), T0)
    assert table.throttles["/a"].bucket.rate == 40  # type: ignore[union-attr]
    table.apply(parsed("restore", id="r3", params={"kind": "shed", "step": 0.5}), T0)
    assert table.sheds["checkout"].gate.share == pytest.approx(0.4)  # type: ignore[union-attr]
    lift = table.apply(
        parsed("restore", id="r4", params={"kind": "isolate", "target": "payments"}), T0
    )
    assert "lifted" in lift.reason and not table.isolates
    nothing = table.apply(
        parsed("restore", id="r5", params={"kind": "isolate", "target": "payments"}), T0
    )
    assert nothing.status == "applied" and "nothing active" in nothing.reason
    table.apply(parsed("restore", id="r6", params={"kind": "throttle"}), T0)
    assert not table.throttles


def test_restore_as_the_mitigation_agent_sends_it() -> None:
    # agent: throttle target = route, restore target = same, params {"kind", "route"}
    table = EnforcementTable()
    table.apply(parsed(target="/a", params={"rate_per_s": 1.0, "route": "/a"}), T0)
    table.apply(parsed(id="t2", target="/b", params={"rate_per_s": 1.0, "route": "/b"}), T0)
    table.apply(parsed("shed", target="checkout", params={"share": 0.5}), T0)
    table.apply(parsed("restore", id="r1", target="/a",
                       params={"kind": "throttle", "route": "/a"}), T0)
    assert list(table.throttles) == ["/b"]
    table.apply(parsed("restore", id="r2", target="checkout", params={"kind": "shed"}), T0)
    assert not table.sheds


def test_rollback_runs_once() -> None:
    table = EnforcementTable()
    first = table.apply(parsed("rollback"), T0)
    assert first.run_rollback
    table.mark_rollback_done("inc-1:rollback:1")
    again = table.apply(parsed("rollback"), T0)
    assert not again.run_rollback and "already" in again.reason


def test_status_lists_leases() -> None:
    table = EnforcementTable()
    table.apply(parsed(params={"rate_per_s": 3.0}), T0)
    [entry] = table.status(T0 + 10)
    assert entry["kind"] == "throttle" and entry["key"] == "*"
    assert entry["lease_remaining_s"] == pytest.approx(50.0)
    assert entry["rate_per_s"] == 3.0


# --------------------------------------------------------------------------- batches


def _table_with(*commands: dict[str, Any]) -> EnforcementTable:
    table = EnforcementTable()
    for c in commands:
        assert table.apply(parse_command(c), T0).status == "applied"
    return table


def test_batch_admission_equals_the_per_request_path() -> None:
    """The fleet admits numpy batches through admit_ingress/admit_egress; a sidecar
    decides request by request. Same commands, same arrivals: same answers, in order."""
    commands = (
        cmd("throttle", params={"rate_per_s": 7.0, "burst": 3.0}),
        cmd("throttle", id="t2", params={"rate_per_s": 2.5, "route": "/b"}, expires_at=T0 + 4),
        cmd("shed", params={"share": 0.3, "routes": ["/a"]}),
        cmd("isolate", params={"half_open_share": 0.25}),
    )
    routes = ["/a", "/b", "/c"]
    arrivals = [(T0 + i * 0.013, routes[(i * 7) % 3]) for i in range(900)]  # ~77/s, 11.7 s
    batch, single = _table_with(*commands), _table_with(*commands)
    got = batch.admit_ingress([r for _, r in arrivals], [t for t, _ in arrivals])
    want = [single.decide_ingress(r, t).status for t, r in arrivals]
    assert got == want
    assert {0, 429, 503} <= set(got)  # every kind of answer was exercised
    # the route throttle's lease ended at T0 + 4: later /b requests only meet the global cap
    times = [t for t, _ in arrivals]
    assert batch.admit_egress("payments", times) == [
        single.decide_egress("payments", t).passes for t in times]
    assert batch.admit_egress("inventory", times[:5]) == [True] * 5


def test_batch_admission_without_enforcement_passes_everything() -> None:
    table = EnforcementTable()
    assert table.admit_ingress(["/a", "/b"], [T0, T0 + 1]) == [0, 0]
    table = _table_with(cmd("throttle", params={"rate_per_s": 1.0, "route": "/a"}))
    assert not table.ingress_active("/b", T0)
    assert table.ingress_active("/a", T0)
    assert not table.ingress_active("/a", T0 + 61)  # lease over
    assert table.admit_ingress(["/b"] * 5, [T0] * 5) == [0] * 5
