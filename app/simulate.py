"""``stanch simulate``: publish the simulated fleet's telemetry to Kafka.

Why a separate runner: ``models.fleet`` decides what happens (pure, deterministic);
this module only paces simulated time against the wall clock, publishes what the fleet
produced, writes the ground-truth labels, and feeds enforcement commands back into
the fleet so that mitigations visibly change its behaviour.

Publishing is batched twice over: request events travel as JSON arrays of up to
``batch_size`` events per message (DESIGN.md allows it: a Faust agent pays per
message, not per event), and the producer lingers to pack many messages per request.
That is what lets one process publish well over 50,000 events per second.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from app.settings import Settings
from models.fleet import Fleet, FleetOutput, default_fleet_config
from models.scenarios import DEFAULT_ONSET_S, build_scenario, labels_for

log = logging.getLogger(__name__)

DEFAULT_TICK_S = 0.5  # simulated seconds per generation step (fixed: same seed, same events)
DEFAULT_BATCH_SIZE = 500  # request events per Kafka message
MAX_IN_FLIGHT = 256  # unacknowledged messages before the runner waits for the broker


@dataclass
class SimulationReport:
    """What a run did. ``events_per_s`` counts every published event (requests,
    errors, changes) over the wall time spent generating and publishing."""

    scenario: str
    seed: int
    start_ts: float
    simulated_s: float
    wall_s: float
    requests: int = 0
    errors: int = 0
    changes: int = 0
    labels: int = 0
    messages: int = 0
    commands_applied: int = 0
    commands_rejected: int = 0
    events_per_s: float = 0.0
    labels_path: str | None = None

    @property
    def events(self) -> int:
        return self.requests + self.errors + self.changes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "events": self.events}


@dataclass(frozen=True)
class Tick:
    """Handed to ``on_tick`` after each interval is published."""

    t0: float
    t1: float
    output: FleetOutput
    fleet: Fleet


class _Publisher:
    """Sends messages with a bounded number in flight and counts what the broker
    acknowledged, so the report states events *published*, not events attempted."""

    def __init__(self, producer: AIOKafkaProducer, report: SimulationReport) -> None:
        self._producer = producer
        self._report = report
        self._in_flight: list[tuple[asyncio.Future[Any], str, int]] = []

    async def send(self, topic: str, key: str, value: bytes, kind: str, count: int) -> None:
        future = await self._producer.send(topic, value=value, key=key.encode())
        self._in_flight.append((future, kind, count))
        if len(self._in_flight) >= MAX_IN_FLIGHT:
            await self.flush()

    async def flush(self) -> None:
        pending, self._in_flight = self._in_flight, []
        if not pending:
            return
        await asyncio.gather(*(future for future, _, _ in pending))
        for _, kind, count in pending:
            setattr(self._report, kind, getattr(self._report, kind) + count)
            self._report.messages += 1


def _chunks(items: Sequence[dict[str, Any]], size: int) -> list[Sequence[dict[str, Any]]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


async def _publish_output(publisher: _Publisher, settings: Settings, output: FleetOutput,
                          batch_size: int) -> None:
    requests_topic = settings.topic("requests")
    for service, events in output.requests.items():
        for chunk in _chunks(events, batch_size):
            await publisher.send(requests_topic, service, orjson.dumps(chunk), "requests",
                                 len(chunk))
    by_service: dict[str, list[dict[str, Any]]] = {}
    for error in output.errors:
        by_service.setdefault(error["service"], []).append(error)
    for service, errors in by_service.items():
        for chunk in _chunks(errors, batch_size):
            await publisher.send(settings.topic("errors"), service, orjson.dumps(chunk),
                                 "errors", len(chunk))
    for change in output.changes:  # one object per message: changes are rare and precious
        await publisher.send(settings.topic("changes"), change["service"],
                             orjson.dumps(change), "changes", 1)


class CommandFeed:
    """Background consumer of the commands topic. Commands are queued and applied by
    the run loop at tick boundaries, so the fleet is only ever touched by one task.
    Bad messages are logged and counted, never fatal (the sidecar verifies
    signatures; this feed only needs the command's fields)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self.queue: list[dict[str, Any]] = []
        self.malformed = 0

    async def start(self) -> None:
        topic = self._settings.topic("commands")
        consumer = AIOKafkaConsumer(
            **self._settings.aiokafka_kwargs(), group_id=None, enable_auto_commit=False,
            auto_offset_reset="latest", fetch_max_wait_ms=self._settings.fetch_max_wait_ms)
        await consumer.start()
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            await consumer.stop()
            raise RuntimeError(f"topic {topic!r} does not exist: run ensure_topics first")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:  # pin the positions now, so no command sent after start is missed
            await consumer.position(tp)
        self._consumer = consumer
        self._task = asyncio.create_task(self._run(consumer), name="stanch-simulate-commands")

    async def _run(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    try:
                        command = orjson.loads(record.value or b"")
                    except orjson.JSONDecodeError as exc:
                        self.malformed += 1
                        log.warning("commands offset %s: not JSON (%s)", record.offset, exc)
                        continue
                    if not isinstance(command, dict):
                        self.malformed += 1
                        log.warning("commands offset %s: not an object", record.offset)
                        continue
                    self.queue.append(command)

    def take(self) -> list[dict[str, Any]]:
        taken, self.queue = self.queue, []
        return taken

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()


def _validate_run(scenario: str, duration_s: float, speed: float, tick_s: float,
                  batch_size: int) -> None:
    if not duration_s > 0:
        raise ValueError(f"duration_s={duration_s!r}: must be > 0")
    if speed < 0:
        raise ValueError(f"speed={speed!r}: must be >= 0 (0 = as fast as possible)")
    if not 0 < tick_s <= 10:
        raise ValueError(f"tick_s={tick_s!r}: must be in (0, 10]")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be >= 1")
    if not scenario:
        raise ValueError("scenario: empty")


async def run_simulation(
    settings: Settings,
    scenario: str,
    *,
    seed: int = 1,
    duration_s: float = 300.0,
    speed: float = 1.0,
    labels_path: Path | None = None,
    services: int | None = None,
    on_tick: Callable[[Tick], Any] | None = None,
    command_source: bool = False,
    tick_s: float = DEFAULT_TICK_S,
    start_ts: float | None = None,
    onset_s: float = DEFAULT_ONSET_S,
    incident_duration_s: float | None = None,
    base_rate_per_s: float | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    create_topics: bool = True,
    compression: str | None = None,
) -> SimulationReport:
    """Run ``scenario`` for ``duration_s`` simulated seconds and publish everything.

    ``speed`` is simulated seconds per wall second (0 = as fast as possible).
    ``start_ts`` is the simulated epoch at offset 0 (default: now, so that at speed 1
    event times are wall-clock times). Labels go to ``labels_path`` (JSON lines) and to
    the labels topic when the simulated clock reaches their onset. With
    ``command_source`` the commands topic is consumed and each command applied to the
    fleet at the next tick, with expiry judged on the simulated clock."""
    _validate_run(scenario, duration_s, speed, tick_s, batch_size)
    overrides: dict[str, Any] = {"start_ts": float(start_ts if start_ts is not None
                                                    else round(time.time(), 3))}
    if base_rate_per_s is not None:
        overrides["base_rate_per_s"] = float(base_rate_per_s)
    config = default_fleet_config(services, **overrides)
    plan = build_scenario(scenario, config, onset_s=onset_s, duration_s=incident_duration_s)
    fleet = Fleet(config, plan, seed)
    pending_labels = sorted(labels_for(plan, config), key=lambda label: label["onset"])
    report = SimulationReport(plan.name, seed, config.start_ts, 0.0, 0.0,
                              labels_path=str(labels_path) if labels_path else None)

    if create_topics:
        from app.topics import ensure_topics

        await ensure_topics(settings)
    producer = AIOKafkaProducer(
        **settings.aiokafka_kwargs(), linger_ms=5, max_batch_size=1 << 20,
        max_request_size=8 << 20, acks=1, compression_type=compression)
    await producer.start()
    feed = CommandFeed(settings) if command_source else None
    labels_file = None
    try:
        if feed is not None:
            await feed.start()
        if labels_path is not None:
            labels_path.parent.mkdir(parents=True, exist_ok=True)
            labels_file = labels_path.open("w", encoding="utf-8")
        publisher = _Publisher(producer, report)
        wall_start = time.monotonic()
        t = config.start_ts
        end = config.start_ts + duration_s
        while t < end - 1e-9:
            t1 = min(end, t + tick_s)
            if speed > 0:
                lag = (t1 - config.start_ts) / speed - (time.monotonic() - wall_start)
                if lag > 0:
                    await publisher.flush()
                    await asyncio.sleep(lag)
            if feed is not None:
                for command in feed.take():
                    result = fleet.apply_command(command, now=t)
                    if result.status == "applied":
                        report.commands_applied += 1
                    else:
                        report.commands_rejected += 1
                    log.info("command %s: %s (%s)", command.get("id"), result.status,
                             result.reason)
            while pending_labels and pending_labels[0]["onset"] < t1:
                label = pending_labels.pop(0)
                await publisher.send(settings.topic("labels"), label["label_id"],
                                     orjson.dumps(label), "labels", 1)
                if labels_file is not None:
                    labels_file.write(orjson.dumps(label).decode() + "\n")
                    labels_file.flush()
            output = fleet.events_between(t, t1)
            await _publish_output(publisher, settings, output, batch_size)
            if on_tick is not None:
                result = on_tick(Tick(t, t1, output, fleet))
                if inspect.isawaitable(result):
                    await result
            t = t1
        await publisher.flush()
        await producer.flush()
        report.wall_s = time.monotonic() - wall_start
        report.simulated_s = t - config.start_ts
        report.events_per_s = report.events / report.wall_s if report.wall_s > 0 else 0.0
        if feed is not None:
            report.commands_rejected += feed.malformed
        return report
    finally:
        if labels_file is not None:
            labels_file.close()
        if feed is not None:
            await feed.stop()
        await producer.stop()


def simulate_main(settings: Settings, *, scenario: str, seed: int, duration: float,
                  speed: float, services: int | None, labels: Path | None,
                  react_to_commands: bool, onset: float = DEFAULT_ONSET_S,
                  incident_duration: float | None = None, rate: float | None = None,
                  start_ts: float | None = None, as_json: bool = False) -> int:
    """The body of ``stanch simulate`` for the CLI to wrap; returns the exit code."""
    try:
        report = asyncio.run(run_simulation(
            settings, scenario, seed=seed, duration_s=duration, speed=speed,
            labels_path=labels, services=services, command_source=react_to_commands,
            onset_s=onset, incident_duration_s=incident_duration, base_rate_per_s=rate,
            start_ts=start_ts))
    except ValueError as exc:
        print(f"stanch simulate: {exc}", file=sys.stderr)
        return 2
    except (KafkaError, RuntimeError, OSError) as exc:
        print(f"stanch simulate: cannot publish to Kafka at {settings.bootstrap}: {exc}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if as_json:
        print(orjson.dumps(report.to_dict()).decode())
    else:
        print(f"scenario {report.scenario} seed {report.seed}: {report.simulated_s:.0f} "
              f"simulated s in {report.wall_s:.1f} wall s; published {report.requests} "
              f"requests, {report.errors} errors, {report.changes} changes, "
              f"{report.labels} labels in {report.messages} messages "
              f"({report.events_per_s:,.0f} events/s); commands applied "
              f"{report.commands_applied}, rejected {report.commands_rejected}")
    return 0


def build_simulate_command() -> Any:
    """A click command for ``stanch simulate`` (the lead adds it to the CLI group)."""
    import click

    from app.settings import SettingsError, load_settings
    from models.scenarios import SCENARIO_NAMES

    @click.command("simulate")
    @click.option("--scenario", default="clean", show_default=True,
                  help=f"One of {', '.join(SCENARIO_NAMES)}; several joined by commas.")
    @click.option("--seed", type=int, default=1, show_default=True)
    @click.option("--duration", type=float, default=300.0, show_default=True,
                  help="Simulated seconds to run.")
    @click.option("--speed", type=float, default=1.0, show_default=True,
                  help="Simulated seconds per wall second (0 = as fast as possible).")
    @click.option("--as-fast-as-possible", "afap", is_flag=True, help="Same as --speed 0.")
    @click.option("--services", type=int, default=None, help="Fleet size (default 6).")
    @click.option("--labels", type=click.Path(dir_okay=False, path_type=Path), default=None,
                  help="Write ground-truth labels here (JSON lines).")
    @click.option("--react-to-commands", is_flag=True,
                  help="Consume the commands topic and apply commands to the fleet.")
    @click.option("--onset", type=float, default=DEFAULT_ONSET_S, show_default=True,
                  help="Simulated seconds before the first incident.")
    @click.option("--incident-duration", type=float, default=None,
                  help="Incident length in simulated seconds (default per scenario).")
    @click.option("--rate", type=float, default=None,
                  help="External requests/s at the diurnal peak for a share-1 service.")
    @click.option("--start-ts", type=float, default=None,
                  help="Simulated epoch seconds at the start (default: now). Fix it for "
                       "byte-identical reruns under --seed.")
    @click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
    def simulate(scenario: str, seed: int, duration: float, speed: float, afap: bool,
                 services: int | None, labels: Path | None, react_to_commands: bool,
                 onset: float, incident_duration: float | None, rate: float | None,
                 start_ts: float | None, as_json: bool) -> None:
        """A fleet of simulated services with labelled, injected incidents."""
        try:
            settings = load_settings()
        except SettingsError as exc:
            raise click.ClickException(str(exc)) from None
        code = simulate_main(settings, scenario=scenario, seed=seed, duration=duration,
                             speed=0.0 if afap else speed, services=services, labels=labels,
                             react_to_commands=react_to_commands, onset=onset,
                             incident_duration=incident_duration, rate=rate,
                             start_ts=start_ts, as_json=as_json)
        raise SystemExit(code)

    return simulate
