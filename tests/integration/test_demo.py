"""``stanch demo``: the closed loop end to end, enforced by real ``stanch sidecar`` processes.

Also a piece that makes the sidecar path work, tested on its own: a sidecar judging
leases by a simulated clock. (The fleet enforces commands through the sidecar's own
code, ``models.fleet.FleetSidecars``: tests/unit/test_fleet.py.)
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest

from app.demo import demo_main, format_summary
from app.keys import generate_keypair
from app.settings import Settings
from app.sidecar import Sidecar, SidecarOptions
from app.sidecar.main import OptionError, SimulatedClock, parse_clock_origin
from schemas.signing import load_private_key, sign_command
from tests.integration.test_sidecar import Acks, publish, start_app, upstream_app

pytestmark = pytest.mark.integration


def test_demo_bad_deploy_through_sidecars(kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("STANCH_KAFKA_BOOTSTRAP", kafka_bootstrap)
    assert demo_main("bad-deploy", as_json=True) == 0
    captured = capsys.readouterr()
    summary = orjson.loads(captured.out.strip().splitlines()[-1])  # progress is on stderr
    for key in ("time_to_detect_s", "time_to_mitigate_s", "time_to_recover_s",
                "errors_avoided", "slow_with_stanch", "slow_without_stanch",
                "actions_in_force_at_end"):
        assert key in summary
    assert summary["actions_in_force_at_end"] == 0  # a rollback holds no lease
    assert [(c["kind"], c["service"], c["target"]) for c in summary["commands"]] == \
        [("rollback", "payments", "v41")]
    rollback_id = summary["commands"][0]["id"]
    # one real sidecar per service ran; the rollback ack came from payments' sidecar,
    # after its webhook hook rolled the fleet model back
    sidecars = summary["sidecars"]
    assert sidecars["ran"] == 6
    assert "payments-sidecar" in sidecars["instances"]
    assert [(a["instance"], a["status"]) for a in summary["acks_from"]
            if a["command_id"] == rollback_id] == [("payments-sidecar", "applied")]
    assert sidecars["acks_by_instance"] == {"payments-sidecar": 1}
    assert sidecars["acks_sent"] == 1
    assert summary["acks"]["applied"] == 1
    assert [(r["command_id"], r["service"], r["target"], r["status"])
            for r in sidecars["rollbacks"]] == [(rollback_id, "payments", "v41", "applied")]
    assert sidecars["status_polls"] > 100
    # the fleet enforced, through the sidecar's own code, what the sidecars reported
    # (the two read the commands topic independently: a poll apart now and then)
    agreement = sidecars["enforcement_agreement"]
    assert agreement["checks"] > 100 and agreement["same"] >= 0.95 * agreement["checks"]
    assert "rollback webhook from payments-sidecar: applied" in captured.err
    # and the fleet recovered because of it
    assert 0 < summary["time_to_detect_s"] <= summary["time_to_mitigate_s"] <= 20
    assert summary["time_to_recover_s"] >= summary["time_to_mitigate_s"]
    assert summary["errors_avoided"] > 0
    assert summary["errors_without_stanch"] > summary["errors_with_stanch"]
    assert "6 ran (one per service), 1 acks sent (applied 1)" in format_summary(summary)
    assert summary["wall_s"] < 180, "the demo must finish in under three minutes"


def test_demo_latency_spike_reports_what_the_bench_reports(
        kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The broker path reports the figures ``stanch bench scenarios`` reports offline,
    counted the same way, for a scenario whose mitigation holds leases."""
    monkeypatch.setenv("STANCH_KAFKA_BOOTSTRAP", kafka_bootstrap)
    assert demo_main("latency-spike", as_json=True) == 0
    captured = capsys.readouterr()
    summary = orjson.loads(captured.out.strip().splitlines()[-1])
    for key in ("errors_with_stanch", "errors_without_stanch", "errors_avoided",
                "slow_with_stanch", "slow_without_stanch", "actions_issued",
                "actions_in_force_at_end", "time_to_detect_s", "time_to_mitigate_s",
                "time_to_recover_s", "time_to_restore_s"):
        assert key in summary, key
    assert summary["errors_avoided"] == (summary["errors_without_stanch"]
                                         - summary["errors_with_stanch"])
    assert summary["actions_issued"] == len(summary["commands"])
    assert summary["actions_in_force_at_end"] == len(summary["in_force_at_end"])
    assert summary["time_to_detect_s"] is not None  # the spike is seen
    assert summary["slow_without_stanch"] > 0  # the spike makes responses slow
    # the fleet held what the sidecars held (a renewal reaches them a poll apart)
    agreement = summary["sidecars"]["enforcement_agreement"]
    assert agreement["checks"] > 100 and agreement["same"] >= 0.9 * agreement["checks"]
    assert "time to restore" in format_summary(summary)


# --------------------------------------------------------------------------- the clock


def test_sidecar_clock_options_are_checked() -> None:
    assert parse_clock_origin("100.5@200") == (100.5, 200.0)
    for bad in ("100", "x@1", "1@nan", ""):
        with pytest.raises(OptionError, match="--clock-origin"):
            parse_clock_origin(bad)
    with pytest.raises(OptionError, match="--clock-speed needs --clock-origin"):
        SidecarOptions(service="s", upstream="http://x", clock_speed=8.0).validate()
    with pytest.raises(OptionError, match="--clock-speed"):
        SidecarOptions(service="s", upstream="http://x", clock_origin=(1.0, 1.0),
                       clock_speed=0.0).validate()
    clock = SimulatedClock(1000.0, time.time() - 2.0, 8.0)
    assert 1015.0 < clock() < 1020.0  # 2 wall seconds at 8x


def test_sidecar_judges_leases_by_the_simulated_clock(topics: Settings, tmp_path: Path) -> None:
    """Commands stamped in simulated time, an hour in the past: a wall-clock sidecar
    would find them expired; one on the fleet's clock applies them, enforces, and lets
    the lease lapse after lease / speed wall seconds, acking on that clock."""
    generate_keypair(tmp_path / "keys", "k1")
    key = load_private_key(tmp_path / "keys" / "k1.key.pem")
    (tmp_path / "keys" / "k1.key.pem").unlink()  # the sidecar gets the public key only
    speed = 8.0
    clock = SimulatedClock(time.time() - 3600.0, time.time(), speed)

    async def scenario() -> None:
        up, up_url = await start_app(upstream_app("checkout"))
        options = SidecarOptions(
            service="checkout", upstream=up_url, listen="127.0.0.1:0", admin_port=0,
            trusted_keys_dir=tmp_path / "keys", clock_origin=(clock.sim_ts, clock.wall_ts),
            clock_speed=speed)
        sidecar = Sidecar(topics, options)
        await sidecar.start()
        try:
            await asyncio.wait_for(sidecar.commands.ready.wait(), 30)
            now = clock()
            command = sign_command({
                "id": "inc-1:throttle:1", "kind": "throttle", "service": "checkout",
                "target": "*", "params": {"rate_per_s": 0}, "incident_id": "inc-1",
                "issued_at": now, "expires_at": now + 40.0, "reason": "test"}, key, "k1")
            async with Acks(topics) as acks:
                await publish(topics, command, key="checkout")
                applied = await acks.wait(command["id"], "applied")
                assert abs(applied["at"] - clock()) < 8.0  # acked on the simulated clock
                status = sidecar.status()
                assert status["clock"] == {"sim_ts": clock.sim_ts, "wall_ts": clock.wall_ts,
                                           "speed": speed}
                assert abs(status["now"] - clock()) < 1.0
                assert [(e["kind"], e["command_id"]) for e in status["active"]] == \
                    [("throttle", command["id"])]
                expired = await acks.wait(command["id"], "expired", timeout=15)
                assert expired["reason"] == "lease ended without renewal"
                assert command["expires_at"] <= expired["at"] < command["expires_at"] + 8.0
                assert sidecar.status()["active"] == []
        finally:
            await sidecar.stop()
            await up.cleanup()

    asyncio.run(asyncio.wait_for(scenario(), 90))
