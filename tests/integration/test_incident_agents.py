"""The incident + mitigation agents in a real worker on a real broker, driven by window
summaries, anomalies and changes this test publishes itself (so every expectation is
exact): grouping, signed commands, operator control, the timeline CLI and the plot,
dead letters, the storm guard, and the crash/restart guarantees of the decider's
snapshot.

Waiting is driven by events, not sleeps: ``wait_processed`` returns once the decider
has consumed every message the test published (all of them forwarded onto its input
topic, and a snapshot written at or past that input offset), so "no command yet" is
asserted on a decider that has seen everything. The decider merges several topics, so
messages of different topics reach it in no fixed order (windows usually trail
anomalies here: the detector reads them too); expectations never depend on that order.

The scenario tests driven by the simulator and the detectors are in
test_mitigation_scenarios.py."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from agents.incidents import input_topic, read_records, read_snapshot
from agents.mitigation import LOCAL_KID, local_keys_dir
from app.broker import free_port
from app.control import publish_control
from app.incidents_cli import build_views, format_timeline, read_topic, show_incident
from app.settings import Settings
from schemas.records import Command, IncidentEvent
from schemas.signing import KeyRing
from tests.processes import ProcessRunner, start_worker

pytestmark = pytest.mark.integration

SERVICES = ["gateway", "checkout", "payments", "inventory", "search", "users"]
T0 = 1_700_000_000.0
ONSET = T0 + 60
#: The decider's input kind of each source topic (agents.incidents.FORWARDED + control).
KINDS = {"anomalies": "anomaly", "changes": "change", "windows": "window", "acks": "ack",
         "control": "control"}
#: Once a test's feed stops, the decider's idle clock rightly reports every service as
#: silent after IDLE_AFTER_S + telemetry_gap_s (~20 s of wall time), which escalates as
#: a storm. Tests about other things use this policy, so that a slow machine does not
#: turn "the test is still asserting" into "the fleet went silent".
NO_IDLE_GAPS = "[incidents]\ntelemetry_gap_s = 3600\n"


# ---------------------------------------------------------------- synthetic telemetry
def window(svc: str, t: float, count: int = 100, errors: int = 0, version: str = "v41",
           p99: float = 80.0, route: str = "/") -> dict[str, Any]:
    return {"service": svc, "route": route, "window_start": float(t), "window_s": 1.0,
            "count": count, "errors": errors,
            "sketch": {"relative_accuracy": 0.01, "bins": {"220": count}, "zero_count": 0},
            "p50": p99 / 3, "p90": p99 / 1.5, "p99": p99,
            "version_counts": {version: count}, "version_errors": {version: errors}}


def anomaly(svc: str, t: float, signal: str = "errors", route: str = "/", dep: str = "",
            observed: float = 30.0, expected: float = 1.0,
            direction: str | None = None) -> dict[str, Any]:
    series = f"{svc}|{route}|{dep}"
    a: dict[str, Any] = {"id": f"{series}|{signal}|{t:.3f}", "service": svc,
                         "series": series, "signal": signal, "window_start": float(t),
                         "observed": observed, "expected": expected, "score": 9.0,
                         "severity": "major",
                         "evidence": {"direction": direction} if direction else {},
                         "route": route, "window_s": 1.0}
    if dep:
        a["dependency"] = dep
    return a


Step = Callable[[float], tuple[list[dict], list[dict], list[dict]]]


def bad_deploy(t: float) -> tuple[list[dict], list[dict], list[dict]]:
    bad = t > ONSET
    ws = [window(s, t) for s in SERVICES if s != "payments"]
    ws.append(window("payments", t, errors=25 if bad else 0, version="v42" if bad else "v41",
                     p99=240.0 if bad else 80.0))
    an = [anomaly("payments", t, observed=0.25, expected=0.003),
          anomaly("checkout", t, route="/pay", dep="payments")] if bad else []
    changes = [{"ts": ONSET + 0.5, "service": "payments", "change_id": "chg-42",
                "kind": "deploy", "from_version": "v41", "to_version": "v42"}] \
        if t == ONSET else []
    return ws, an, changes


def surge_until(end: float) -> Step:
    def step(t: float) -> tuple[list[dict], list[dict], list[dict]]:
        an = [anomaly("search", t, "traffic", route="/q", observed=500.0, expected=100.0,
                      direction="surge")] if ONSET <= t < end else []
        return [window(s, t) for s in SERVICES], an, []
    return step


class Feed:
    """Publishes synthetic telemetry second by second of event time."""

    def __init__(self, settings: Settings, sent: Counter[str] | None = None) -> None:
        self.settings = settings
        self.producer: AIOKafkaProducer | None = None
        self.sent: Counter[str] = sent if sent is not None else Counter()

    async def __aenter__(self) -> Feed:
        self.producer = AIOKafkaProducer(**self.settings.aiokafka_kwargs(), linger_ms=5)
        await self.producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.producer is not None
        await self.producer.stop()

    async def send(self, name: str, value: Any, key: str) -> None:
        await self.send_raw(name, orjson.dumps(value), key)

    async def send_raw(self, name: str, value: bytes, key: str) -> None:
        assert self.producer is not None
        await self.producer.send(self.settings.topic(name), value, key=key.encode())
        self.sent[name] += 1

    async def run(self, step: Step, t0: float, t1: float, pace_s: float = 0.005) -> None:
        t = t0
        while t < t1:
            ws, an, ch = step(t)
            for c in ch:
                await self.send("changes", c, c["service"])
            for w in ws:
                await self.send("windows", w, w["service"])
            for a in an:
                await self.send("anomalies", a, a["service"])
            if pace_s:
                await asyncio.sleep(pace_s)  # keep windows before the next second's data
            t += 1.0
        assert self.producer is not None
        await self.producer.flush()


def feed(settings: Settings, step: Step, t0: float, t1: float,
         sent: Counter[str] | None = None) -> Counter[str]:
    """Publish ``step`` for every second in [t0, t1); returns (adds to) the counts sent."""
    sent = sent if sent is not None else Counter()

    async def go() -> None:
        async with Feed(settings, sent) as f:
            await f.run(step, t0, t1)

    asyncio.run(go())
    return sent


def control(settings: Settings, action: str, sent: Counter[str], **kw: str) -> None:
    asyncio.run(publish_control(settings, action, operator="test", **kw))
    sent["control"] += 1


def wait_processed(settings: Settings, sent: Counter[str], timeout: float = 60.0) -> None:
    """Return once the decider has consumed every message counted in ``sent`` (topic
    name -> messages published): all of them are on its input topic, and it wrote a
    snapshot at or past the input offset they end at (snapshots follow the outputs
    they cover, so its timeline entries and commands are on their topics by then)."""
    want = {KINDS[name]: n for name, n in sent.items()}
    deadline = time.monotonic() + timeout
    target: int | None = None
    offset = -1
    while time.monotonic() < deadline:
        if target is None:
            records = asyncio.run(read_records(settings, input_topic(settings)))
            got = Counter((r.key or b"").decode() for r in records)
            if all(got[k] >= n for k, n in want.items()):
                target = records[-1].offset + 1 if records else 0
        if target is not None:
            snap = asyncio.run(read_snapshot(settings))
            offset = int(snap["input_offset"]) if snap else -1
            if offset >= target:
                return
        time.sleep(0.2)
    raise AssertionError(f"decider did not consume {dict(want)} within {timeout} s "
                         f"(forwarded: {target is not None}, snapshot offset {offset}, "
                         f"target {target})")


def topic(settings: Settings, name: str) -> list[dict[str, Any]]:
    return asyncio.run(read_topic(settings, name))


def wait_for(settings: Settings, name: str, pred: Callable[[list[dict]], bool],
             timeout: float = 30.0) -> list[dict[str, Any]]:
    """Poll a topic until ``pred(all messages)`` holds; returns the messages."""
    deadline = time.monotonic() + timeout
    while True:
        items = topic(settings, name)
        if pred(items):
            return items
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}: condition not met within {timeout} s; "
                                 f"last {len(items)} items: {items[-5:]}")
        time.sleep(0.5)


def start_decider(settings: Settings, log: Path, **env: str) -> ProcessRunner:
    worker = start_worker(settings, log, **env)
    worker.wait_for("incident decider: assigned", timeout=60)
    return worker


@pytest.fixture
def quiet(topics: Settings, tmp_path: Path) -> Settings:
    """``topics`` with the NO_IDLE_GAPS policy."""
    return policy_settings(topics, tmp_path, NO_IDLE_GAPS)


@pytest.fixture
def worker(quiet: Settings, tmp_path: Path) -> Iterator[ProcessRunner]:
    """A worker with the NO_IDLE_GAPS policy; ``runner.web_port`` serves /stanch/status."""
    port = free_port()
    runner = start_decider(quiet, tmp_path / "worker.log", STANCH_WEB_PORT=str(port))
    runner.web_port = port  # type: ignore[attr-defined]
    try:
        yield runner
    finally:
        runner.stop()


def policy_settings(settings: Settings, tmp_path: Path, toml: str) -> Settings:
    path = tmp_path / "policy.toml"
    path.write_text(toml)
    return settings.model_copy(update={"policy_file": path})


def commands_by_id(commands: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for c in commands:
        out.setdefault(c["id"], []).append(c)
    return out


# ---------------------------------------------------------------------------- tests
def test_bad_deploy_gives_one_signed_rollback_and_a_timeline(
        quiet: Settings, worker: ProcessRunner, tmp_path: Path) -> None:
    sent = feed(quiet, bad_deploy, T0, T0 + 90)
    wait_processed(quiet, sent)
    commands = topic(quiet, "commands")
    assert [(c["kind"], c["service"], c["target"]) for c in commands] == \
        [("rollback", "payments", "v41")]
    (cmd,) = commands
    Command.from_dict(cmd)
    ring = KeyRing.from_dir(local_keys_dir(quiet))
    assert ring.kids == [LOCAL_KID]
    ring.verify(cmd)  # signed with the worker's key, verifiable with its public key
    assert cmd["id"] == f"{cmd['incident_id']}:rollback:1"
    assert cmd["params"]["change_id"] == "chg-42"
    # decided on event time (not the wall clock), once the new version's windows
    # confirmed the suspect; how far the clock is past the onset then depends on how far
    # the anomalies ran ahead of the windows in the decider's input (not fixed here)
    assert ONSET < cmd["issued_at"] < T0 + 90
    assert cmd["expires_at"] - cmd["issued_at"] == 60.0

    entries = topic(quiet, "incidents")
    for e in entries:
        IncidentEvent.from_dict(e)
    assert {e["incident_id"] for e in entries} == {cmd["incident_id"]}
    kinds = [e["entry"] for e in entries]
    assert kinds[0] == "opened" and "suspect" in kinds and "command" in kinds
    confirmed = [e for e in entries if e["entry"] == "suspect" and "(confirmed)" in e["reason"]]
    (command_entry,) = [e for e in entries if e["entry"] == "command"]
    assert confirmed and confirmed[0]["at"] <= cmd["issued_at"] == command_entry["at"]
    assert kinds.index("suspect") < kinds.index("command")
    view, png = asyncio.run(show_incident(quiet, cmd["incident_id"], tmp_path / "inc.png"))
    assert view is not None and view.state == "mitigating" and view.root_service == "payments"
    text = format_timeline(view)
    assert "rollback payments -> v41" in text and "suspect" in text
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000


def test_approval_mode_issues_only_after_approve(
        topics: Settings, tmp_path: Path) -> None:
    settings = policy_settings(topics, tmp_path,
                               NO_IDLE_GAPS + "[safeguards]\napproval = true\n")
    runner = start_decider(settings, tmp_path / "worker.log")
    try:
        sent = feed(settings, surge_until(ONSET + 300), T0, ONSET + 10)
        wait_processed(settings, sent)
        # the decider has seen every input: it proposed, and issued nothing on its own
        assert topic(settings, "commands") == []
        entries = topic(settings, "incidents")
        waiting = [e for e in entries if "awaiting approval" in e["reason"]]
        assert len(waiting) == 1, [e["reason"] for e in entries]
        (waiting_entry,) = waiting
        reserved = waiting_entry["command_id"]
        control(settings, "approve", sent, target=reserved)
        wait_processed(settings, sent)
        commands = topic(settings, "commands")
        assert [(c["id"], c["kind"], c["service"], c["target"]) for c in commands] == \
            [(reserved, "throttle", "search", "/q")]
        assert commands[0]["params"]["rate_per_s"] == pytest.approx(120.0)
        issued = [e for e in topic(settings, "incidents")
                  if e["entry"] == "command" and e.get("command_id") == reserved]
        assert len(issued) == 1 and "(approved)" in issued[0]["reason"], issued
        log = "".join(runner.lines)
        assert log.index(f"test approved {reserved}") < log.index(f"command {reserved}")
    finally:
        runner.stop()


def test_pause_issues_nothing_until_resume(quiet: Settings, worker: ProcessRunner) -> None:
    sent: Counter[str] = Counter()
    control(quiet, "pause", sent)
    feed(quiet, surge_until(ONSET + 300), T0, ONSET + 10, sent)
    wait_processed(quiet, sent)
    assert any(e["reason"].startswith("paused") for e in topic(quiet, "incidents"))
    assert topic(quiet, "commands") == [], "nothing is issued while paused"
    control(quiet, "resume", sent)
    feed(quiet, surge_until(ONSET + 300), ONSET + 10, ONSET + 12, sent)
    wait_processed(quiet, sent)
    commands = topic(quiet, "commands")
    assert [(c["kind"], c["service"], c["target"]) for c in commands] == \
        [("throttle", "search", "/q")]
    log = "".join(worker.lines)
    assert log.index("test resumed mitigation") < log.index(f"command {commands[0]['id']}")


def test_dry_run_records_the_decision_and_issues_nothing(
        topics: Settings, tmp_path: Path) -> None:
    settings = policy_settings(topics, tmp_path,
                               NO_IDLE_GAPS + "[safeguards]\ndry_run = true\n")
    runner = start_decider(settings, tmp_path / "worker.log")
    try:
        sent = feed(settings, bad_deploy, T0, T0 + 90)
        wait_processed(settings, sent)
        assert any(e["reason"].startswith("dry-run: would rollback payments -> v41")
                   for e in topic(settings, "incidents"))
        assert topic(settings, "commands") == []
    finally:
        runner.stop()


def test_storm_escalates_every_incident_and_issues_nothing(
        quiet: Settings, worker: ProcessRunner) -> None:
    """Most of the fleet anomalous at once, each service on its own (no shared
    dependency), with signals that alone would be throttled: that is what a broken
    telemetry pipeline or a detector gone wrong looks like, so the storm guard escalates
    every incident to humans and nothing is issued."""
    fleet = [*SERVICES, "ledger", "catalog", "reviews", "shipping"]
    stormy = fleet[:7]  # 7 of 10 >= storm_share 0.5, >= storm_min_services 3

    def storm(t: float) -> tuple[list[dict], list[dict], list[dict]]:
        an = [anomaly(s, t, "traffic", route="/q", observed=500.0, expected=100.0,
                      direction="surge") for s in stormy] if t >= ONSET else []
        return [window(s, t) for s in fleet], an, []

    sent = feed(quiet, storm, T0, ONSET + 10)
    wait_processed(quiet, sent)
    assert topic(quiet, "commands") == []
    views = build_views(topic(quiet, "incidents"))
    assert sorted(v.root_service for v in views.values()) == sorted(stormy)
    for view in views.values():
        assert view.state == "escalated", view.entries
        (escalated,) = [e for e in view.entries if e["entry"] == "escalated"]
        assert escalated["reason"].startswith("storm: suspect telemetry pipeline"), escalated
        assert not [e for e in view.entries if e["entry"] == "command"]


def test_killed_worker_keeps_the_incident_and_never_reissues(
        topics: Settings, tmp_path: Path) -> None:
    """A killed and restarted worker neither forgets an open incident nor issues its
    commands twice. The kill comes while the worker is busy (right after its first
    command, with data still arriving), and data keeps flowing while it is down."""
    log = tmp_path / "worker.log"
    runner = start_decider(topics, log)
    try:
        surge = surge_until(ONSET + 50)
        sent = feed(topics, surge, T0, ONSET + 20)
        first = wait_for(topics, "commands", lambda c: len(c) >= 1)
        incident_id = first[0]["incident_id"]
        runner.kill()
        feed(topics, surge, ONSET + 20, ONSET + 25, sent)  # while the worker is down
        runner = start_decider(topics, log)
        feed(topics, surge, ONSET + 25, ONSET + 220, sent)
        wait_processed(topics, sent, timeout=80)
        wait_for(topics, "incidents", lambda es: any(
            e["entry"] == "resolved" and e["incident_id"] == incident_id for e in es),
            timeout=60)
    finally:
        runner.stop()
    assert "restored snapshot" in log.read_text(), "the restart went through the snapshot"
    commands = topic(topics, "commands")
    by_id = commands_by_id(commands)
    for cid, copies in by_id.items():
        assert all(c == copies[0] for c in copies), f"{cid} re-issued with other content"
    assert len(commands) == len(by_id), "a command was published twice"
    throttles = sorted((c for c in commands if c["kind"] == "throttle"),
                       key=lambda c: int(c["id"].rsplit(":", 1)[1]))
    assert len(throttles) >= 2, "renewals after the restart"
    assert [int(c["id"].rsplit(":", 1)[1]) for c in throttles] == \
        list(range(1, len(throttles) + 1)), "seq continued after the restart"
    assert {c["incident_id"] for c in commands} == {incident_id}
    assert [c["kind"] for c in commands][-1] == "restore"
    entries = topic(topics, "incidents")
    ids = [e["id"] for e in entries]
    assert len(ids) == len(set(ids)), "a timeline entry was published twice"
    views = build_views(entries)
    assert incident_id in views, "the open incident was not forgotten"
    for other in set(views) - {incident_id}:
        # once the feed stops, the idle clock rightly reports every service as silent
        assert "telemetry" in views[other].entries[0]["reason"], views[other].entries
        assert views[other].opened_at >= ONSET + 219
    seqs = [int(e["id"].rsplit(":", 1)[1]) for e in views[incident_id].entries]
    assert seqs == list(range(1, len(seqs) + 1)), "timeline continued without gaps"
    assert views[incident_id].state == "resolved"


def test_reading_a_topic_sees_every_record_of_a_producer_batch(topics: Settings) -> None:
    """The embedded broker lists a partition's end as the last batch's base offset + 1:
    a reader trusting it missed all but the first record of the last batch (the
    'escalated' entry produced together with 'opened', the second dead letter)."""
    async def go() -> None:
        producer = AIOKafkaProducer(**topics.aiokafka_kwargs(), linger_ms=200)
        await producer.start()
        try:
            futures = [await producer.send(topics.topic("incidents"), orjson.dumps({"n": i}),
                                           partition=0) for i in range(5)]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    asyncio.run(go())
    assert [x["n"] for x in topic(topics, "incidents")] == [0, 1, 2, 3, 4]


def test_bad_input_is_dead_lettered_and_processing_goes_on(
        quiet: Settings, worker: ProcessRunner) -> None:
    """Every bad record on every forwarded topic is dead-lettered with its reason and
    counted; none is dropped silently and none stops the decider."""
    bad: list[tuple[str, bytes, str]] = [
        ("anomalies", b"{not json", "not JSON"),
        ("anomalies", orjson.dumps({"id": "x", "service": "a"}), "anomaly: "),
        ("anomalies", b"42", "anomaly: "),
        ("windows", orjson.dumps({"service": "a", "window_start": "soon"}), "window: "),
        ("changes", orjson.dumps({"ts": T0, "service": "a", "kind": "deploy"}), "change: "),
        ("acks", orjson.dumps({"command_id": 7}), "ack: "),
        ("control", orjson.dumps({"action": "self-destruct"}), "control: "),
    ]
    # one JSON array (a batch) holding a good anomaly and a bad one: only the bad one goes
    batch = orjson.dumps([anomaly("search", T0 + 1), {"id": "y"}])
    sent: Counter[str] = Counter()

    async def send_bad() -> None:
        async with Feed(quiet, sent) as f:
            for name, raw, _ in bad:
                await f.send_raw(name, raw, "x")
            await f.send_raw("anomalies", batch, "x")
            assert f.producer is not None
            await f.producer.flush()

    asyncio.run(send_bad())
    feed(quiet, bad_deploy, T0, T0 + 70, sent)
    wait_processed(quiet, sent)
    mine = [x for x in topic(quiet, "deadletter") if x.get("agent") == "incidents"]
    assert len(mine) == len(bad) + 1, [x["reason"] for x in mine]
    raws = {x["raw"]: x for x in mine}
    for name, raw, reason in bad:
        letter = raws[raw.decode()]
        assert letter["reason"].startswith(reason), (name, letter)
        assert letter["key"] == KINDS[name]
    (from_batch,) = [x for x in mine if x["raw"] == batch.decode()]
    assert "anomaly" in from_batch["reason"]
    status = json.loads(urllib.request.urlopen(
        f"http://127.0.0.1:{worker.web_port}/stanch/status", timeout=10).read())  # type: ignore[attr-defined]
    assert status["agents"]["decider"]["rejected"] == len(bad) + 1
    counts = status["deadletters"]
    assert counts.get("not json") == 1 and counts.get("schema", 0) >= 4, counts
    entries = topic(quiet, "incidents")
    assert any(e["entry"] == "anomaly" and "search|/|" in e["reason"] for e in entries), \
        "the good anomaly of the batch was used"
    assert [x["kind"] for x in topic(quiet, "commands")] == ["rollback"]
