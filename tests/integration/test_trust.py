"""Trust on the real broker, with real worker and sidecar processes: signed operator
control, the decider's one clock, bounded leases at the sidecar, the policy file's
mode at start-up, and one view of what is mitigated across workers (issue 11 items
3-5, issue 10 item 4)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agents.incidents import read_records
from app.broker import free_port
from app.control import LOCAL_OPERATOR_KID, build_control, publish_raw_control
from app.processes import settings_env
from app.settings import Settings
from app.status import read_status
from tests.integration.test_incident_agents import (
    NO_IDLE_GAPS,
    ONSET,
    SERVICES,
    T0,
    Feed,
    anomaly,
    control,
    feed,
    policy_settings,
    start_decider,
    surge_until,
    topic,
    wait_for,
    wait_processed,
    window,
)
from tests.integration.test_sidecar import (  # noqa: F401  (fixtures)
    Acks,
    Signer,
    keys_dir,
    publish,
    run,
    signer,
    start_app,
    start_sidecar,
    status_of,
    upstream_app,
)
from tests.processes import ProcessRunner, start_worker

pytestmark = pytest.mark.integration

DAY = 86_400.0


def send_raw_control(settings: Settings, message: dict[str, Any], sent: Counter[str]) -> None:
    asyncio.run(publish_raw_control(settings, message))
    sent["control"] += 1


def my_dead_letters(settings: Settings) -> list[dict[str, Any]]:
    return [x for x in topic(settings, "deadletter") if x.get("agent") == "incidents"]


def web_json(port: int, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_unsigned_forged_and_replayed_control_do_nothing(
        topics: Settings, tmp_path: Path) -> None:
    """Approval mode holds a throttle; an unsigned approve from "mallory", an approve
    signed by another key under the trusted kid, and a replay of a signed pause are
    dead-lettered with their reasons and change nothing; the operator's signed approve
    then releases the throttle."""
    settings = policy_settings(topics, tmp_path,
                               NO_IDLE_GAPS + "[safeguards]\napproval = true\n")
    runner = start_decider(settings, tmp_path / "worker.log")
    try:
        sent = feed(settings, surge_until(ONSET + 300), T0, ONSET + 10)
        wait_processed(settings, sent)
        (waiting,) = [e for e in topic(settings, "incidents")
                      if "awaiting approval" in e["reason"]]
        reserved = waiting["command_id"]
        unsigned = build_control("approve", target=reserved, operator="mallory")
        forged = build_control("approve", target=reserved, operator="mallory",
                               key=Ed25519PrivateKey.generate(), kid=LOCAL_OPERATOR_KID)
        send_raw_control(settings, unsigned, sent)
        send_raw_control(settings, forged, sent)
        # a genuine pause and resume, then the pause replayed: the replay must not pause
        said = subprocess.run([sys.executable, "-m", "app.cli", "pause", "--reason", "drill"],
                              env=settings_env(settings), capture_output=True, text=True,
                              timeout=60)
        sent["control"] += 1
        assert said.returncode == 0, said.stderr
        pause = topic(settings, "control")[-1]  # one partition: the newest is the CLI's
        assert said.stdout.startswith(f"sent to {settings.topic('control')}: pause "
                                      "mitigation (kill switch) as ")
        assert f"(id {pause['id']}, signed with key {LOCAL_OPERATOR_KID})" in said.stdout
        control(settings, "resume", sent)
        send_raw_control(settings, pause, sent)
        wait_processed(settings, sent)
        assert topic(settings, "commands") == [], "no forged or unsigned approval acted"
        letters = {x["raw"]: x for x in my_dead_letters(settings)}
        assert letters[orjson.dumps(unsigned).decode()]["reason"].startswith(
            "control: unsigned")
        assert "bad signature" in letters[orjson.dumps(forged).decode()]["reason"]
        replays = [x for x in letters.values() if "replayed" in x["reason"]]
        assert len(replays) == 1 and pause["id"] in replays[0]["reason"]
        status = asyncio.run(read_status(settings))
        assert status is not None and status["mode"]["paused"] is False, \
            "the replayed pause changed nothing"
        # the operator's own, signed approve acts (of the incident: the pause dropped the
        # pending command, the resume proposed it again under a new id)
        incident = waiting["incident_id"]
        control(settings, "approve", sent, target=incident)
        wait_processed(settings, sent)
        assert [(c["kind"], c["service"], c["incident_id"])
                for c in topic(settings, "commands")] == [("throttle", "search", incident)]
        log = "".join(runner.lines)
        assert "mallory approved" not in log and f"test approved {incident}" in log
    finally:
        runner.stop()


def test_far_future_change_and_window_neither_move_leases_nor_are_trusted(
        topics: Settings, tmp_path: Path) -> None:
    """A plain producer stamps a change and a window 30 days ahead in the middle of a
    surge: both are dead-lettered as "future", the decider's clock does not move, and
    every command it signs has the policy's 60 s lease on the data's own clock."""
    settings = policy_settings(topics, tmp_path, NO_IDLE_GAPS)
    runner = start_decider(settings, tmp_path / "worker.log")
    ahead = time.time() + 30 * DAY
    try:
        sent = feed(settings, surge_until(ONSET + 300), T0, ONSET + 5)
        change = {"ts": ahead, "service": "search", "change_id": "evil-1", "kind": "deploy",
                  "from_version": "v1", "to_version": "v2"}
        far_window = window("search", ahead)

        async def send_future() -> None:
            async with Feed(settings, sent) as f:
                await f.send("changes", change, "search")
                await f.send("windows", far_window, "search")
                await f.send("anomalies", anomaly("search", ahead, "traffic", route="/q",
                                                  observed=500.0, expected=100.0,
                                                  direction="surge"), "search")

        asyncio.run(send_future())
        feed(settings, surge_until(ONSET + 300), ONSET + 5, ONSET + 40, sent)
        wait_processed(settings, sent)
        commands = topic(settings, "commands")
        assert commands, "the surge was throttled"
        for c in commands:
            assert c["expires_at"] - c["issued_at"] == 60.0
            assert c["issued_at"] < ONSET + 40, c  # on the data's clock, not 30 days on
        future = [x for x in my_dead_letters(settings) if "future" in x["reason"]]
        assert sorted(x["key"] for x in future) == ["anomaly", "change", "window"]
        status = asyncio.run(read_status(settings))
        assert status is not None and status["clock"] < ONSET + 40
        assert all(a["expires_at"] < ONSET + 200 for a in status["active"])
    finally:
        runner.stop()


def test_sidecar_refuses_a_ten_year_lease_and_a_command_from_tomorrow(
        topics: Settings, keys_dir: Path, signer: Signer) -> None:  # noqa: F811
    async def scenario() -> None:
        up, up_url = await start_app(upstream_app("checkout"))
        sidecar = await start_sidecar(topics, keys_dir, up_url)
        stop_all = {"rate_per_s": 0.001, "burst": 1}
        try:
            async with aiohttp.ClientSession() as http, Acks(topics) as acks:
                decade = signer.command("throttle", params=stop_all, lease_s=3650 * DAY)
                tomorrow = signer.command("throttle", params=stop_all,
                                          issued_at=time.time() + DAY)
                await publish(topics, decade, tomorrow)
                ack = await acks.wait(decade["id"], "rejected")
                assert "exceeds the max lease 600 s" in ack["reason"], ack
                ack = await acks.wait(tomorrow["id"], "rejected")
                assert "in the future" in ack["reason"], ack
                codes = [await status_of(http, f"{sidecar.ingress_url}/orders/{i}")
                         for i in range(5)]
                assert codes == [200] * 5, "neither command acts"
                fine = signer.command("throttle", params={"rate_per_s": 1000.0})
                await publish(topics, fine)
                await acks.wait(fine["id"], "applied")
        finally:
            await sidecar.stop()
            await up.cleanup()

    run(scenario())


def test_restart_with_approval_in_the_policy_keeps_approval_mode(
        topics: Settings, tmp_path: Path) -> None:
    """A worker acts on its own (no approval) and snapshots that mode; it is restarted
    with approval = true in the policy file: the file holds, a new surge waits for an
    approve, the change is logged and shown by `stanch status`."""
    log = tmp_path / "worker.log"
    plain = policy_settings(topics, tmp_path, NO_IDLE_GAPS)
    runner = start_decider(plain, log)
    try:
        sent = feed(plain, surge_until(ONSET + 300), T0, ONSET + 10)
        wait_for(plain, "commands", lambda c: len(c) >= 1)
        wait_processed(plain, sent)
    finally:
        runner.stop()
    before = len(topic(plain, "commands"))
    approval_file = tmp_path / "approval.toml"
    approval_file.write_text(NO_IDLE_GAPS + "[safeguards]\napproval = true\n")
    approval = topics.model_copy(update={"policy_file": approval_file})
    runner = start_decider(approval, log)
    try:
        def users_surge(t: float) -> tuple[list[dict], list[dict], list[dict]]:
            an = [anomaly("users", t, "traffic", route="/u", observed=500.0, expected=100.0,
                          direction="surge"), anomaly("search", t, "traffic", route="/q",
                                                      observed=500.0, expected=100.0,
                                                      direction="surge")]
            return [window(s, t) for s in SERVICES], an, []

        feed(approval, users_surge, ONSET + 10, ONSET + 20, sent)
        wait_processed(approval, sent)
        new = topic(approval, "commands")[before:]
        assert not [c for c in new if c["service"] == "users"], "approval mode held"
        assert any("awaiting approval" in e["reason"] and e["service"] == "users"
                   for e in topic(approval, "incidents"))
        text = log.read_text()
        assert "start-up: policy file sets approval=True dry_run=False (saved state had " \
               "approval=False dry_run=False)" in text
        env = settings_env(approval)
        out = subprocess.run([sys.executable, "-m", "app.cli", "status"], env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "approval on" in out.stdout and "policy file: start-up" in out.stdout
        assert "awaiting approval: 1" in out.stdout, out.stdout
    finally:
        runner.stop()


def test_two_workers_agree_on_what_is_mitigated(topics: Settings, tmp_path: Path) -> None:
    """The decider runs in one of two workers; a throttle it issues shows as mitigated
    in both workers' views (read from Kafka), and both are healthy with every agent and
    task covered."""
    settings = policy_settings(topics, tmp_path, NO_IDLE_GAPS)
    before = subprocess.run([sys.executable, "-m", "app.cli", "status"],
                            env=settings_env(settings), capture_output=True, text=True,
                            timeout=60)
    assert before.returncode == 1 and before.stderr.startswith(
        "stanch status: no decider status on"), before.stderr  # one line, no traceback
    assert len(before.stderr.strip().splitlines()) == 1
    ports = [free_port(), free_port()]
    first = start_decider(settings, tmp_path / "a.log", STANCH_WEB_PORT=str(ports[0]))
    second: ProcessRunner | None = None
    try:
        second = start_worker(settings.model_copy(update={"data_dir": tmp_path / "b"}),
                              tmp_path / "b.log", STANCH_WEB_PORT=str(ports[1]))
        sent = feed(settings, surge_until(ONSET + 300), T0, ONSET + 10)
        wait_for(settings, "commands", lambda c: any(x["kind"] == "throttle" for x in c))
        wait_processed(settings, sent)
        # a fresh surge second each poll keeps the throttle's lease on the event clock
        deadline = time.monotonic() + 60
        views: list[list[str]] = []
        while time.monotonic() < deadline:
            views = [web_json(p, "/stanch/status")[1]["mitigated"] for p in ports]
            if views == [["search"], ["search"]]:
                break
            time.sleep(0.5)
        assert views == [["search"], ["search"]], views
        for port in ports:
            code, health = web_json(port, "/stanch/health")
            assert code == 200 and health["status"] == "ok", health
            assert set(health["tasks"]) == {"decider", "mitigation_view"}
            assert health["tasks"]["mitigation_view"]["state"] == "running"
            assert "stanch.forward.window" in " ".join(health["agents"])
        deciding = [web_json(p, "/stanch/health")[1]["tasks"]["decider"]["assigned"]
                    for p in ports]
        assert sorted(deciding) == [False, True], "exactly one worker decides"
        records = asyncio.run(read_records(settings, f"{settings.topic_prefix}"
                                                     "mitigation-state"))
        assert records, "the fact is on Kafka"
    finally:
        if second is not None:
            second.stop()
        first.stop()
