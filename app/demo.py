"""``stanch demo``: the whole closed loop on one machine, one scenario end to end.

What runs: the embedded broker on a free port (or STANCH_KAFKA_BOOTSTRAP when set), a
``stanch worker`` subprocess (aggregation, detection, incidents, mitigation), and the
simulated fleet (models.fleet) publishing its telemetry. The fleet obeys the commands
it receives: the demo consumes stanch.commands, verifies each signature with the
worker's public key like a sidecar does, applies the command to the fleet and
publishes an ack on stanch.acks.

Clocks: the fleet runs in simulated time, ``speed`` times faster than the wall clock,
and starts far enough in the past that its clock never runs ahead of the wall clock
(the aggregator rejects events from the future). Every figure in the summary is in
SIMULATED seconds from the labelled onset of the injected incident: the moment
Stanch acted is the wall time its record reached the broker, mapped to the simulated
clock the fleet was at then.

errors_avoided: the same fleet (same seed, same scenario, same start) is replayed
offline with no command applied (pure models.fleet, no Kafka), and the error
responses (status >= 500 served by any service) are compared over the same simulated
span. Requests refused by a throttle (429) are not counted as errors either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import time
import uuid
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from app.processes import ProcessRunner, settings_env
from app.settings import Settings, load_settings

SCENARIOS = ("bad-deploy", "traffic-surge", "dependency-failure", "latency-spike",
             "error-burst", "slow-degradation", "telemetry-gap", "clean")
DEFAULT_SPEED = 8.0
DEFAULT_ONSET_S = 150.0  # after the detectors' 120-window warm-up
#: Simulated seconds to run after the onset, per scenario (long enough to see restore).
AFTER_ONSET_S = {"bad-deploy": 120.0, "traffic-surge": 250.0, "dependency-failure": 220.0}
DEFAULT_AFTER_ONSET_S = 150.0
TICK_S = 0.5


def start_worker(settings: Settings, log_path: Path) -> ProcessRunner:
    """``stanch worker`` as a child process, returned once its incident decider is ready."""
    worker = ProcessRunner([sys.executable, "-m", "app.cli", "worker"],
                           settings_env(settings), log_path)
    try:
        worker.wait_for("incident decider: assigned", timeout=120)
    except TimeoutError:
        worker.stop()
        raise DemoError(f"the worker did not start; see {log_path}") from None
    return worker


class DemoError(RuntimeError):
    """The demo could not run (broker, worker or simulator failed)."""


# --------------------------------------------------------------------------- processes
# --------------------------------------------------------------------------- the loop
@dataclass
class _Clock:
    """(wall, simulated) pairs recorded at each tick, to map wall times to sim time."""

    walls: list[float] = field(default_factory=list)
    sims: list[float] = field(default_factory=list)

    def add(self, wall: float, sim: float) -> None:
        self.walls.append(wall)
        self.sims.append(sim)

    def sim_at(self, wall: float) -> float | None:
        if not self.walls:
            return None
        i = bisect_left(self.walls, wall)
        if i <= 0:
            return self.sims[0]
        if i >= len(self.walls):
            return self.sims[-1]
        w0, w1, s0, s1 = self.walls[i - 1], self.walls[i], self.sims[i - 1], self.sims[i]
        return s0 + (s1 - s0) * ((wall - w0) / (w1 - w0) if w1 > w0 else 0.0)


@dataclass
class _Seen:
    """What the demo observed on the output topics (for progress and the summary)."""

    windows: int = 0
    anomalies: int = 0
    first_anomaly_wall: float | None = None
    entries: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    commands: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    acks: list[dict[str, Any]] = field(default_factory=list)


async def _watch(settings: Settings, seen: _Seen, say: Callable[[str], None],
                 clock: _Clock, onset: float) -> None:
    names = {settings.topic(n): n for n in ("windows", "anomalies", "incidents", "commands",
                                            "acks")}
    consumer = AIOKafkaConsumer(**settings.aiokafka_kwargs(), group_id=None,
                                auto_offset_reset="earliest",
                                fetch_max_wait_ms=settings.fetch_max_wait_ms)
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in names
               for p in sorted(consumer.partitions_for_topic(t) or [])]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while True:
            batches = await consumer.getmany(timeout_ms=200)
            for tp, records in batches.items():
                kind = names[tp.topic]
                for r in records:
                    wall = r.timestamp / 1000.0
                    if kind == "windows":
                        seen.windows += 1
                        continue
                    try:
                        value = orjson.loads(r.value or b"")
                    except orjson.JSONDecodeError:
                        continue
                    if not isinstance(value, dict):
                        continue
                    sim = clock.sim_at(wall)
                    rel = f"onset{(sim - onset):+6.1f}s" if sim is not None else "?"
                    if kind == "anomalies":
                        seen.anomalies += 1
                        seen.first_anomaly_wall = seen.first_anomaly_wall or wall
                    elif kind == "incidents":
                        seen.entries.append((wall, value))
                        if value.get("entry") not in ("anomaly", "ack"):
                            say(f"[{rel}] incident {value.get('incident_id')} "
                                f"{value.get('state')}: {value.get('reason', '')[:110]}")
                    elif kind == "commands":
                        seen.commands.append((wall, value))
                        say(f"[{rel}] command {value.get('id')}: {value.get('kind')} "
                            f"{value.get('service')} -> {value.get('target')} "
                            f"{orjson.dumps(value.get('params')).decode()}")
                    elif kind == "acks":
                        seen.acks.append(value)
                        say(f"[{rel}] ack {value.get('command_id')}: {value.get('status')} "
                            f"({value.get('reason', '')[:80]})")
    finally:
        await consumer.stop()


class _Enforcer:
    """Plays the sidecars for the simulated fleet: verify, apply, ack (the simulator's
    command feed reads the topic; this adds what a sidecar adds)."""

    def __init__(self, settings: Settings, keys_dir: Path) -> None:
        from app.simulate import CommandFeed
        from schemas.signing import KeyRing

        self.settings = settings
        self.ring = KeyRing.from_dir(keys_dir)
        self.feed = CommandFeed(settings)
        self.applied = 0
        self.rejected = 0

    async def start(self) -> None:
        await self.feed.start()

    async def apply(self, fleet: Any, now: float, producer: AIOKafkaProducer) -> None:
        from schemas.signing import SigningError

        for command in self.feed.take():
            try:
                self.ring.verify(command)
                result = fleet.apply_command(command, now=now)
                status, reason = result.status, result.reason
            except SigningError as exc:
                status, reason = "rejected", str(exc)
            self.applied += status == "applied"
            self.rejected += status != "applied"
            ack = {"command_id": str(command.get("id", "?"))[:1024],
                   "service": str(command.get("service", "?")), "instance": "simulated-fleet",
                   "status": status, "reason": reason[:4096], "at": now}
            await producer.send(self.settings.topic("acks"), orjson.dumps(ack),
                                key=ack["service"].encode())

    async def stop(self) -> None:
        await self.feed.stop()


def _ingress_errors(output: Any) -> tuple[int, int]:
    """(error responses, requests) served in one interval, ingress only."""
    errors = total = 0
    for events in output.requests.values():
        for e in events:
            if e.get("dependency"):
                continue
            total += 1
            errors += e["status"] >= 500
    return errors, total


def offline_errors(scenario: str, seed: int, start_ts: float, duration_s: float,
                   onset_s: float) -> list[tuple[float, int, int]]:
    """Per-tick (t0, errors, requests) of the same fleet with no mitigation."""
    from models.fleet import Fleet, default_fleet_config
    from models.scenarios import build_scenario

    config = default_fleet_config(None, start_ts=start_ts)
    fleet = Fleet(config, build_scenario(scenario, config, onset_s=onset_s), seed)
    out: list[tuple[float, int, int]] = []
    t = start_ts
    while t < start_ts + duration_s - 1e-9:
        t1 = min(start_ts + duration_s, t + TICK_S)
        errors, total = _ingress_errors(fleet.events_between(t, t1))
        out.append((t, errors, total))
        t = t1
    return out


def recovery_time(series: list[tuple[float, int, int]], onset: float,
                  after: float | None) -> float | None:
    """First time >= ``after`` from which the 10 s error rate stays within the pre-onset
    baseline (max(2 x baseline, baseline + 1 %)) until the end of the run."""
    if after is None:
        return None
    before = [(e, n) for t, e, n in series if t < onset]
    base = sum(e for e, _ in before) / max(1, sum(n for _, n in before))
    limit = max(2 * base, base + 0.01)
    span = int(round(10.0 / TICK_S))
    ok_from: float | None = None
    for i, (t, _, _) in enumerate(series):
        if t < after:
            continue
        chunk = series[i:i + span]
        errs, reqs = sum(c[1] for c in chunk), sum(c[2] for c in chunk)
        good = reqs == 0 or errs / reqs <= limit
        if good and ok_from is None:
            ok_from = t
        elif not good:
            ok_from = None
    return ok_from


# --------------------------------------------------------------------------- the demo
async def run_closed_loop(settings: Settings, scenario: str, seed: int, speed: float,
                    onset_s: float, duration_s: float, keys_dir: Path,
                    say: Callable[[str], None]) -> dict[str, Any]:
    from app.simulate import Tick, run_simulation

    start_ts = round(time.time() - duration_s - 5.0, 3)
    onset = start_ts + onset_s
    clock = _Clock()
    seen = _Seen()
    live: list[tuple[float, int, int]] = []
    enforcer = _Enforcer(settings, keys_dir)
    await enforcer.start()
    producer = AIOKafkaProducer(**settings.aiokafka_kwargs(), linger_ms=2)
    await producer.start()
    watcher = asyncio.create_task(_watch(settings, seen, say, clock, onset))
    last_progress = [0.0, 0]

    async def on_tick(tick: Tick) -> None:
        clock.add(time.time(), tick.t1)
        errors, total = _ingress_errors(tick.output)
        live.append((tick.t0, errors, total))
        await enforcer.apply(tick.fleet, tick.t1, producer)
        wall = time.monotonic()
        if wall - last_progress[0] >= 3.0:
            rate = (seen.windows - last_progress[1]) / max(1e-9, wall - last_progress[0]) \
                if last_progress[0] else 0.0
            last_progress[:] = [wall, seen.windows]
            say(f"[onset{tick.t1 - onset:+6.1f}s] windows {seen.windows} ({rate:.0f}/s), "
                f"anomalies {seen.anomalies}, commands {len(seen.commands)}, acks "
                f"{len(seen.acks)}")

    try:
        report = await run_simulation(settings, scenario, seed=seed, duration_s=duration_s,
                                      speed=speed, on_tick=on_tick, start_ts=start_ts,
                                      onset_s=onset_s, create_topics=False)
        await asyncio.sleep(3.0)  # the last windows and decisions
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await enforcer.stop()
        await producer.stop()

    def rel(wall: float | None) -> float | None:
        sim = clock.sim_at(wall) if wall is not None else None
        return None if sim is None else round(sim - onset, 2)

    opened = [w for w, e in seen.entries if e.get("entry") == "opened"]
    opened_after = [w for w in opened if (clock.sim_at(w) or 0) >= onset - 5]
    first_cmd = seen.commands[0][0] if seen.commands else None
    cmd_sim = clock.sim_at(first_cmd) if first_cmd is not None else None
    recovered = recovery_time(live, onset, cmd_sim)
    baseline = offline_errors(scenario, seed, start_ts, report.simulated_s, onset_s)
    errors_live = sum(e for _, e, _ in live)
    errors_off = sum(e for _, e, _ in baseline)
    states = {}
    for _, e in seen.entries:
        states[e["incident_id"]] = e["state"]
    return {
        "scenario": scenario, "seed": seed, "speed": speed, "clock": "simulated seconds "
        "from the labelled onset", "onset_ts": onset,
        "time_to_detect_s": rel(min(opened_after)) if opened_after else None,
        "time_to_mitigate_s": rel(first_cmd),
        "time_to_recover_s": None if recovered is None else round(recovered - onset, 2),
        "errors_with_stanch": errors_live, "errors_without_stanch": errors_off,
        "errors_avoided": errors_off - errors_live,
        "commands": [{"id": c["id"], "kind": c["kind"], "service": c["service"],
                      "target": c["target"]} for _, c in seen.commands],
        "acks": {s: sum(a.get("status") == s for a in seen.acks)
                 for s in ("applied", "rejected", "failed", "expired")},
        "incidents": states, "windows": seen.windows, "anomalies": seen.anomalies,
        "simulated_s": report.simulated_s, "requests": report.requests,
    }


def run_demo(scenario: str = "bad-deploy", *, seed: int = 1, speed: float = DEFAULT_SPEED,
             as_json: bool = False, onset_s: float = DEFAULT_ONSET_S,
             after_onset_s: float | None = None, out: Callable[[str], None] | None = None,
             workdir: Path | None = None) -> dict[str, Any]:
    """Run the closed loop once and return the summary (printing progress to ``out``)."""
    from app.broker import EmbeddedBroker, free_port
    from app.topics import ensure_topics

    if scenario not in SCENARIOS:
        raise DemoError(f"scenario={scenario!r}: must be one of {', '.join(SCENARIOS)}")
    printer = out or (lambda line: print(line, file=sys.stderr if as_json else sys.stdout,
                                         flush=True))
    base = load_settings()
    work = workdir or Path(tempfile.mkdtemp(prefix="stanch-demo-"))
    run_id = uuid.uuid4().hex[:8]
    broker = None
    worker = None
    wall0 = time.monotonic()
    try:
        if base.kafka_bootstrap is None:
            broker = EmbeddedBroker(port=free_port(), log_path=work / "broker.log").start()
            bootstrap = broker.bootstrap
            printer(f"embedded broker on {bootstrap}")
        else:
            bootstrap = base.kafka_bootstrap
            printer(f"using Kafka at {bootstrap}")
        settings = base.model_copy(update={
            "kafka_bootstrap": bootstrap, "topic_prefix": f"demo{run_id}.",
            "app_id": f"stanch-demo-{run_id}", "data_dir": work / "data",
            "web_port": free_port(), "signing_key_file": None, "trusted_keys_dir": None})
        asyncio.run(ensure_topics(settings))
        printer(f"starting the worker (log {work / 'worker.log'}) ...")
        worker = start_worker(settings, work / "worker.log")
        from agents.mitigation import local_keys_dir

        after = after_onset_s if after_onset_s is not None else \
            AFTER_ONSET_S.get(scenario, DEFAULT_AFTER_ONSET_S)
        duration = onset_s + after
        printer(f"scenario {scenario}, seed {seed}: {duration:.0f} simulated s at {speed:g}x; "
                f"incident at onset = {onset_s:.0f} s (times below: simulated, from onset)")
        summary = asyncio.run(run_closed_loop(settings, scenario, seed, speed, onset_s, duration,
                                        local_keys_dir(settings), printer))
        summary["wall_s"] = round(time.monotonic() - wall0, 1)
        return summary
    finally:
        if worker is not None:
            worker.stop()
        if broker is not None:
            broker.stop()


def format_summary(s: dict[str, Any]) -> str:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f} s"

    cmds = ", ".join(f"{c['kind']} {c['service']} -> {c['target']}" for c in s["commands"])
    return "\n".join([
        f"summary ({s['clock']}):",
        f"  time to detect    {f(s['time_to_detect_s'])}",
        f"  time to mitigate  {f(s['time_to_mitigate_s'])}",
        f"  time to recover   {f(s['time_to_recover_s'])}",
        f"  error responses   {s['errors_with_stanch']} with Stanch, "
        f"{s['errors_without_stanch']} without (same seed): {s['errors_avoided']} avoided",
        f"  commands          {cmds or 'none'}",
        "  incidents         " + (", ".join(f"{k} ({v})" for k, v in s["incidents"].items())
                                   or "none"),
        f"  wall time         {s.get('wall_s', '-')} s",
    ])


def demo_main(scenario: str, as_json: bool, seed: int = 1, speed: float = DEFAULT_SPEED) -> int:
    """The body of ``stanch demo``; returns the exit code."""
    try:
        summary = run_demo(scenario, seed=seed, speed=speed, as_json=as_json)
    except (DemoError, ValueError) as exc:
        print(f"stanch demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if as_json:
        print(orjson.dumps(summary).decode())
    else:
        print(format_summary(summary))
    return 0
