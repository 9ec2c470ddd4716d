"""``stanch demo``: the whole closed loop on one machine, one scenario end to end.

What runs: the embedded broker on a free port (or STANCH_KAFKA_BOOTSTRAP when set), a
``stanch worker`` subprocess (aggregation, detection, incidents, mitigation), one real
``stanch sidecar`` subprocess per service of the simulated fleet, and the simulated
fleet (models.fleet) publishing its telemetry. The demo generates the run's signing key
pair first: the worker gets the private key (STANCH_SIGNING_KEY_FILE), the sidecars a
directory holding only the public key (STANCH_TRUSTED_KEYS_DIR), so the sidecars start
in parallel with the worker.

Enforcement: each sidecar consumes stanch.commands, verifies, applies and acks like in
production. The fleet's traffic is simulated and cannot pass through their proxies, so
the fleet enforces the same commands with the sidecar's own code
(``models.fleet.FleetSidecars``: ``CommandGate`` + ``EnforcementTable``, one engine),
and every tick the demo checks that it holds exactly what each sidecar's
``/_stanch/status`` lists (``sidecars.enforcement_agreement``). A rollback runs the
sidecar's rollback hook, a webhook served by the demo that rolls the fleet model back;
the hook's answer becomes the sidecar's ack. The demo's web host is also the sidecars'
upstream.

Clocks: the fleet runs in simulated time, ``speed`` times faster than the wall clock.
Commands carry leases in the event time of the data (agents.mitigation), so the
sidecars run the same simulated clock (``--clock-origin``/``--clock-speed``), fixed when
they are launched and set back far enough that it stays behind the wall clock (the
aggregator rejects events from the future); the fleet is paced by that clock. Every
figure in the summary is in SIMULATED seconds from the labelled onset of the injected
incident: the moment Stanch acted is the wall time its record reached the broker,
mapped to the simulated clock the fleet was at then.

errors_avoided: the same fleet (same seed, same scenario, same start) is replayed
offline with no command applied (pure models.fleet, no Kafka), and the error
responses (status >= 500) served by any service are compared over the same simulated
span. Requests refused by a throttle (429) are not counted as errors either way. Slow
responses and actions still in force at the end are counted as ``stanch bench
scenarios`` counts them (``app.closed_loop``).

``run_closed_loop`` without sidecars plays them in-process (``_Enforcer``): the scenario
tests and ``stanch bench mitigate`` use that to keep their run time down.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from bisect import bisect_left
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from app.processes import ProcessRunner, settings_env
from app.settings import Settings, load_settings
from app.sidecar.main import SimulatedClock
from app.simulate import CommandFeed

if TYPE_CHECKING:
    from app.closed_loop import IngressLog
    from models.fleet import Fleet, FleetSidecars, ServiceSpec

SCENARIOS = ("bad-deploy", "traffic-surge", "dependency-failure", "latency-spike",
             "error-burst", "slow-degradation", "telemetry-gap", "clean")
DEFAULT_SPEED = 8.0
DEFAULT_ONSET_S = 150.0  # after the detectors' 120-window warm-up
#: Simulated seconds to run after the onset, per scenario (long enough to see restore).
AFTER_ONSET_S = {"bad-deploy": 120.0, "traffic-surge": 250.0, "dependency-failure": 220.0}
DEFAULT_AFTER_ONSET_S = 150.0
TICK_S = 0.5
DEMO_KID = "stanch-demo"
#: Longest start-up the sidecars' simulated clock allows for: start_worker waits up to
#: 120 s, the sidecars' readiness up to SIDECAR_READY_S more.
STARTUP_BUDGET_S = 180.0
SIDECAR_READY_S = 60.0
STATUS_TIMEOUT_S = 1.0


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


# --------------------------------------------------------------------------- sidecars
def demo_keys(work: Path) -> tuple[Path, Path]:
    """This run's signing key pair: (private key file, for the worker only; a directory
    holding only the public key, for the sidecars). Made before anything starts so the
    sidecars can start in parallel with the worker and already trust its key."""
    from app.keys import generate_keypair

    private, public = generate_keypair(work / "signing", DEMO_KID)
    trusted = work / "trusted"
    trusted.mkdir(parents=True, exist_ok=True)
    public.replace(trusted / public.name)
    return private, trusted


def demo_clock(speed: float, duration_s: float, wall: float | None = None) -> SimulatedClock:
    """The simulated clock of the sidecars and the fleet, fixed when the sidecars are
    launched. It runs ``speed`` times faster than the wall clock while the worker starts,
    so it starts far enough back to stay behind the wall clock until the end of the run
    even if start-up takes the whole budget (the aggregator rejects future events)."""
    if not (math.isfinite(speed) and speed > 0):
        raise DemoError(f"speed={speed!r}: must be a number > 0")
    wall = time.time() if wall is None else wall
    lead = max(0.0, speed - 1.0) * STARTUP_BUDGET_S + duration_s + 10.0
    return SimulatedClock(round(wall - lead, 3), wall, speed)


@dataclass
class SidecarProc:
    """One running ``stanch sidecar`` and where to reach it."""

    service: str
    instance: str
    ingress_port: int
    admin_port: int
    runner: ProcessRunner

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def ingress_url(self) -> str:
        return f"http://127.0.0.1:{self.ingress_port}"


class SidecarFleet:
    """One real ``stanch sidecar`` process per service of the simulated fleet.

    Each trusts only the worker's public key (STANCH_TRUSTED_KEYS_DIR), obeys the
    commands of its service, runs rollbacks through its webhook hook (the demo's
    ``/rollback/SERVICE``) and judges leases by the fleet's simulated clock. Its
    upstream is the demo's web host (``/upstream/SERVICE``).
    """

    def __init__(self, settings: Settings, services: Sequence[ServiceSpec],
                 clock: SimulatedClock, work: Path) -> None:
        from app.broker import free_port

        self.settings = settings
        self.services = list(services)
        self.clock = clock
        self.work = work
        self.procs: list[SidecarProc] = []
        taken: set[int] = set()

        def port() -> int:
            while (p := free_port()) in taken:
                pass
            taken.add(p)
            return p

        self._port = port
        self.host_port = port()  # the demo's web host: upstream + rollback webhook

    @property
    def host_url(self) -> str:
        return f"http://127.0.0.1:{self.host_port}"

    def launch(self) -> None:
        """Start every sidecar without waiting (they come up while the worker starts)."""
        env = settings_env(self.settings)
        origin = f"{self.clock.sim_ts!r}@{self.clock.wall_ts!r}"
        for spec in self.services:
            ingress, admin = self._port(), self._port()
            instance = f"{spec.name}-sidecar"
            args = [sys.executable, "-m", "app.cli", "sidecar", "--service", spec.name,
                    "--instance", instance, "--listen", f"127.0.0.1:{ingress}",
                    "--admin-port", str(admin),
                    "--upstream", f"{self.host_url}/upstream/{spec.name}",
                    "--rollback-webhook", f"{self.host_url}/rollback/{spec.name}",
                    "--rollback-timeout", "10",
                    "--clock-origin", origin, "--clock-speed", repr(self.clock.speed)]
            for route in spec.routes:
                if "{" in route.path:
                    args += ["--route-template", route.path]
            runner = ProcessRunner(args, env, self.work / f"sidecar-{spec.name}.log")
            self.procs.append(SidecarProc(spec.name, instance, ingress, admin, runner))

    def wait_ready(self, timeout: float = SIDECAR_READY_S) -> float:
        """Wait until every sidecar reads its commands; returns the seconds waited."""
        start = time.monotonic()
        waiting = list(self.procs)
        while waiting:
            for proc in list(waiting):
                if proc.runner.proc.poll() is not None:
                    raise DemoError(f"sidecar {proc.service} exited; see {proc.runner.log_path}")
                if _health(proc.admin_url).get("commands_ready"):
                    waiting.remove(proc)
            if waiting and time.monotonic() - start > timeout:
                names = ", ".join(p.service for p in waiting)
                raise DemoError(f"sidecars not ready after {timeout:.0f} s: {names}; see "
                                f"{self.work}/sidecar-*.log")
            if waiting:
                time.sleep(0.1)
        return time.monotonic() - start

    def stop(self) -> None:
        """SIGTERM every sidecar at once (each drains its telemetry and closes Kafka)."""
        if not self.procs:
            return
        with ThreadPoolExecutor(len(self.procs)) as pool:
            list(pool.map(lambda p: p.runner.stop(), self.procs))


def _health(admin_url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(admin_url + "/_stanch/health", timeout=1.0) as resp:
            value = orjson.loads(resp.read())
    except (OSError, urllib.error.URLError, orjson.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


class _SidecarBridge:
    """The demo's side of the sidecars: their upstream, their rollback webhook, and the
    fleet's own copy of their enforcement.

    The fleet's traffic is simulated, so it cannot pass through the sidecars' proxies;
    instead the fleet reads the same commands topic and applies every command through
    the sidecar's own code (``models.fleet.FleetSidecars``: ``CommandGate`` and
    ``EnforcementTable``), leaving rollbacks to the real sidecars' webhook. Every tick
    the demo also reads each sidecar's ``/_stanch/status`` and checks that the fleet
    enforces the same commands (``enforcement_agreement`` in the summary).

    The fleet is only touched from the simulation's event loop (ticks and the webhook
    handler run on it), so no lock is needed.
    """

    def __init__(self, sidecars: SidecarFleet, trusted_dir: Path, onset: float,
                 say: Callable[[str], None]) -> None:
        from schemas.signing import KeyRing

        self.sidecars = sidecars
        self.ring = KeyRing.from_dir(trusted_dir)
        self.onset = onset
        self.say = say
        self.fleet: Fleet | None = None
        self.enforcer: FleetSidecars | None = None
        self.feed = CommandFeed(sidecars.settings)
        self.agreement = {"checks": 0, "same": 0}
        self.differences: list[str] = []
        self.status: dict[str, dict[str, Any]] = {}
        self.polls = 0
        self.poll_failures = 0
        self.rollbacks: list[dict[str, Any]] = []
        self.max_clock_lag_s = 0.0
        self._http: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self.feed.start()
        app = web.Application()
        app.router.add_post("/rollback/{service}", self._rollback)
        app.router.add_route("*", "/upstream/{service}/{tail:.*}", self._upstream)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.sidecars.host_port).start()
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=STATUS_TIMEOUT_S))

    async def stop(self) -> None:
        await self.feed.stop()
        if self._http is not None:
            await self._http.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # ------------------------------------------------------------------ per tick
    async def follow(self, fleet: Fleet, now: float) -> None:
        """Apply the commands that arrived to the fleet through the sidecar's code, then
        compare what it enforces with what every sidecar reports."""
        from models.fleet import FleetSidecars

        self.fleet = fleet
        if self.enforcer is None:
            self.enforcer = FleetSidecars(fleet, self.ring.verify, run_rollbacks=False)
        for command in self.feed.take():
            for ack in self.enforcer.deliver(command, None, now):
                if ack["status"] != "applied" or command.get("kind") != "rollback":
                    self.say(f"[{self._rel(now)}] fleet: {ack['service']} "
                             f"{ack['status']} {ack['command_id']} ({ack['reason'][:80]})")
        fleet.take_lifted()  # the real sidecars send the expiry acks
        await self.poll()
        for proc in self.sidecars.procs:
            status = self.status.get(proc.service)
            if status is None:
                continue
            theirs = {(str(e.get("kind")), str(e.get("key")), str(e.get("command_id")))
                      for e in status.get("active") or []
                      if isinstance(e, dict) and isinstance(e.get("expires_at"), int | float)
                      and e["expires_at"] > now}
            ours = {(e.kind, e.key, e.command_id) for e in fleet.tables[proc.service].active()
                    if e.expires_at > now}
            self.agreement["checks"] += 1
            if theirs == ours:
                self.agreement["same"] += 1
            elif len(self.differences) < 20:
                self.differences.append(f"{self._rel(now)} {proc.service}: sidecar "
                                        f"{sorted(theirs)} fleet {sorted(ours)}")

    async def pace(self, next_end: float) -> None:
        """Sleep until the sidecars' clock reaches ``next_end`` (the end of the next
        tick), so no event is published before its time on that clock."""
        clock = self.sidecars.clock
        ahead = next_end - clock()
        if ahead > 0:
            await asyncio.sleep(ahead / clock.speed)
        else:
            self.max_clock_lag_s = max(self.max_clock_lag_s, -ahead)

    async def poll(self) -> None:
        results = await asyncio.gather(*(self._status(p) for p in self.sidecars.procs))
        self.polls += 1
        for proc, status in zip(self.sidecars.procs, results, strict=True):
            if status is None:
                self.poll_failures += 1  # keep the last known state; the fleet's own
                continue                 # lease check still ends what lapses
            self.status[proc.service] = status

    async def _status(self, proc: SidecarProc) -> dict[str, Any] | None:
        assert self._http is not None
        try:
            async with self._http.get(proc.admin_url + "/_stanch/status") as resp:
                value = orjson.loads(await resp.read())
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError):
            return None
        return value if isinstance(value, dict) else None

    def _rel(self, sim: float) -> str:
        return f"onset{(sim - self.onset):+6.1f}s"

    # ------------------------------------------------------------------ web host
    async def _rollback(self, request: web.Request) -> web.Response:
        """The sidecars' rollback hook: roll the fleet model back. Answers 2xx only
        when the fleet did it (the sidecar acks ``applied``), else an error status
        with the reason (the sidecar acks ``failed``)."""
        from schemas.signing import SigningError

        service = request.match_info["service"]
        try:
            command = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            return web.Response(status=400, text=f"not JSON: {exc}")
        if not isinstance(command, dict) or command.get("kind") != "rollback" \
                or command.get("service") != service:
            return web.Response(status=400, text=f"not a rollback of {service}")
        try:
            self.ring.verify(command)  # defence in depth: a deploy tool checks too
        except SigningError as exc:
            return web.Response(status=403, text=str(exc))
        if self.fleet is None:
            return web.Response(status=503, text="the fleet is not running yet")
        now = self.fleet.now
        result = self.fleet.apply_command(command, now=now)
        self.rollbacks.append({"command_id": command.get("id"), "service": service,
                               "target": command.get("target"), "status": result.status,
                               "reason": result.reason})
        self.say(f"[{self._rel(now)}] fleet: rollback webhook from {service}-sidecar: "
                 f"{result.status} ({result.reason})")
        if result.status != "applied":
            return web.Response(status=409, text=result.reason)
        return web.Response(text=result.reason)

    async def _upstream(self, request: web.Request) -> web.Response:
        """The service behind every sidecar (the fleet's traffic itself is simulated)."""
        await request.read()
        return web.json_response({"service": request.match_info["service"],
                                  "path": "/" + request.match_info["tail"]})

    # ------------------------------------------------------------------ summary
    def report(self, acks: list[dict[str, Any]]) -> dict[str, Any]:
        instances = {p.instance for p in self.sidecars.procs}
        by_instance: dict[str, int] = {}
        for a in acks:
            if a.get("instance") in instances:
                by_instance[a["instance"]] = by_instance.get(a["instance"], 0) + 1
        counted = {p.instance: dict(self.status.get(p.service, {}).get("commands") or {})
                   for p in self.sidecars.procs}
        return {
            "ran": len(self.sidecars.procs),
            "instances": sorted(instances),
            "acks_sent": sum(by_instance.values()),
            "acks_by_instance": by_instance,
            "commands_by_instance": {k: {s: n for s, n in v.items() if n and s != "ignored"}
                                     for k, v in counted.items()
                                     if any(n for s, n in v.items() if s != "ignored")},
            "rollbacks": self.rollbacks,
            # polls where the fleet's table held exactly the sidecar's commands (a
            # command reaches them a poll apart now and then: the two read the topic
            # independently)
            "enforcement_agreement": dict(self.agreement),
            "enforcement_differences": self.differences,
            "status_polls": self.polls,
            "status_poll_failures": self.poll_failures,
            "max_clock_lag_s": round(self.max_clock_lag_s, 2),
        }


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
                            f"by {value.get('instance')} ({value.get('reason', '')[:80]})")
    finally:
        await consumer.stop()


class _Enforcer:
    """Plays the sidecars in-process for the simulated fleet with the sidecar's own code
    (``models.fleet.FleetSidecars``: gate, enforcement table, acks), reading the
    commands topic; only the transport differs. The demo uses real sidecars; the
    scenario tests and ``stanch bench mitigate`` use this."""

    def __init__(self, settings: Settings, keys_dir: Path) -> None:
        from schemas.signing import KeyRing

        self.settings = settings
        self.ring = KeyRing.from_dir(keys_dir)
        self.feed = CommandFeed(settings)
        self.sidecars: FleetSidecars | None = None
        self.applied = 0
        self.rejected = 0

    async def start(self) -> None:
        await self.feed.start()

    async def apply(self, fleet: Fleet, now: float, producer: AIOKafkaProducer) -> None:
        from models.fleet import FleetSidecars

        if self.sidecars is None:
            self.sidecars = FleetSidecars(fleet, self.ring.verify)
        acks: list[dict[str, Any]] = []
        for command in self.feed.take():
            for ack in self.sidecars.deliver(command, None, now):
                self.applied += ack["status"] == "applied"
                self.rejected += ack["status"] != "applied"
                acks.append(ack)
        acks += self.sidecars.expiry_acks(now)
        for ack in acks:
            await producer.send(self.settings.topic("acks"), orjson.dumps(ack),
                                key=ack["service"].encode())

    async def stop(self) -> None:
        await self.feed.stop()


def offline_log(scenario: str, seed: int, start_ts: float, duration_s: float,
                onset_s: float) -> IngressLog:
    """The ingress responses of the same fleet with no mitigation (same seed, same start)."""
    from app.closed_loop import IngressLog
    from models.fleet import Fleet, default_fleet_config
    from models.scenarios import build_scenario

    config = default_fleet_config(None, start_ts=start_ts)
    fleet = Fleet(config, build_scenario(scenario, config, onset_s=onset_s), seed)
    log = IngressLog()
    t = start_ts
    while t < start_ts + duration_s - 1e-9:
        t1 = min(start_ts + duration_s, t + TICK_S)
        log.add(t, fleet.events_between(t, t1))
        t = t1
    return log


# --------------------------------------------------------------------------- the demo
async def run_closed_loop(settings: Settings, scenario: str, seed: int, speed: float,
                          onset_s: float, duration_s: float, keys_dir: Path,
                          say: Callable[[str], None], *,
                          sidecars: SidecarFleet | None = None) -> dict[str, Any]:
    """Run the fleet through one scenario against a running worker; return the summary.

    With ``sidecars`` (running, ready) enforcement goes through them and ``keys_dir`` is
    their trusted (public) keys directory; without, ``_Enforcer`` plays them in-process
    with the keys in ``keys_dir``.
    """
    from app.closed_loop import IngressLog, recovery_time, restore_time
    from app.simulate import Tick, run_simulation

    enforcer: _Enforcer | None = None
    bridge: _SidecarBridge | None = None
    if sidecars is None:
        start_ts = round(time.time() - duration_s - 5.0, 3)
        sim_speed = speed  # run_simulation paces itself
    else:
        # The first tick ends at the sidecars' "now"; the fleet is paced by their clock.
        start_ts = round(sidecars.clock() - TICK_S, 3)
        if start_ts + duration_s > time.time() + duration_s / sidecars.clock.speed:
            raise DemoError("start-up took longer than the sidecars' clock allows "
                            f"({STARTUP_BUDGET_S:.0f} s)")
        sim_speed = 0.0
    onset = start_ts + onset_s
    clock = _Clock()
    seen = _Seen()
    live = IngressLog()
    last_fleet: list[Fleet] = []
    leased_at: list[tuple[float, int]] = []  # (t, enforcements in force in the fleet)
    if sidecars is None:
        enforcer = _Enforcer(settings, keys_dir)
        await enforcer.start()
    else:
        bridge = _SidecarBridge(sidecars, keys_dir, onset, say)
        await bridge.start()
    producer = AIOKafkaProducer(**settings.aiokafka_kwargs(), linger_ms=2)
    await producer.start()
    watcher = asyncio.create_task(_watch(settings, seen, say, clock, onset))
    last_progress = [0.0, 0]

    async def on_tick(tick: Tick) -> None:
        clock.add(time.time(), tick.t1)
        live.add(tick.t0, tick.output)
        last_fleet[:] = [tick.fleet]
        if bridge is not None:
            await bridge.follow(tick.fleet, tick.t1)
        elif enforcer is not None:
            await enforcer.apply(tick.fleet, tick.t1, producer)
        leased_at.append((tick.t1, sum(len(t) for t in tick.fleet.tables.values())))
        wall = time.monotonic()
        if wall - last_progress[0] >= 3.0:
            rate = (seen.windows - last_progress[1]) / max(1e-9, wall - last_progress[0]) \
                if last_progress[0] else 0.0
            last_progress[:] = [wall, seen.windows]
            enforcing = "" if bridge is None else ", enforcing " + str(sum(
                len(s.get("active") or []) for s in bridge.status.values()))
            say(f"[onset{tick.t1 - onset:+6.1f}s] windows {seen.windows} ({rate:.0f}/s), "
                f"anomalies {seen.anomalies}, commands {len(seen.commands)}, acks "
                f"{len(seen.acks)}{enforcing}")
        if bridge is not None:
            await bridge.pace(tick.t1 + TICK_S)

    try:
        report = await run_simulation(settings, scenario, seed=seed, duration_s=duration_s,
                                      speed=sim_speed, on_tick=on_tick, start_ts=start_ts,
                                      onset_s=onset_s, create_topics=False)
        await asyncio.sleep(3.0)  # the last windows and decisions
        if bridge is not None:
            await bridge.poll()  # final counters
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        if enforcer is not None:
            await enforcer.stop()
        if bridge is not None:
            await bridge.stop()
        await producer.stop()

    def rel_sim(sim: float | None) -> float | None:
        return None if sim is None else round(sim - onset, 2)

    def rel(wall: float | None) -> float | None:
        sim = clock.sim_at(wall) if wall is not None else None
        return None if sim is None else round(sim - onset, 2)

    opened = [w for w, e in seen.entries if e.get("entry") == "opened"]
    opened_after = [w for w in opened if (clock.sim_at(w) or 0) >= onset - 5]
    first_cmd = seen.commands[0][0] if seen.commands else None
    cmd_sim = clock.sim_at(first_cmd) if first_cmd is not None else None
    recovered = recovery_time(live.series(), onset, cmd_sim)
    baseline = offline_log(scenario, seed, start_ts, report.simulated_s, onset_s)
    errors_live, errors_off = live.errors, baseline.errors
    slow_ms = baseline.slow_thresholds(onset)  # the healthy tails, without Stanch
    end = start_ts + report.simulated_s
    in_force = [{"service": name, "kind": e.kind, "key": e.key, "command_id": e.command_id}
                for fleet in last_fleet for name, table in fleet.tables.items()
                for e in table.active() if e.expires_at > end]
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
        "slow_with_stanch": live.slow(slow_ms), "slow_without_stanch": baseline.slow(slow_ms),
        "actions_issued": len(seen.commands),
        "time_to_restore_s": rel_sim(restore_time(leased_at)),
        "actions_in_force_at_end": len(in_force), "in_force_at_end": in_force,
        "commands": [{"id": c["id"], "kind": c["kind"], "service": c["service"],
                      "target": c["target"]} for _, c in seen.commands],
        "acks": {s: sum(a.get("status") == s for a in seen.acks)
                 for s in ("applied", "rejected", "failed", "expired")},
        "acks_from": [{"command_id": a.get("command_id"), "instance": a.get("instance"),
                       "status": a.get("status")} for a in seen.acks],
        "sidecars": bridge.report(seen.acks) if bridge is not None else {"ran": 0},
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
    from models.fleet import default_fleet_config

    if scenario not in SCENARIOS:
        raise DemoError(f"scenario={scenario!r}: must be one of {', '.join(SCENARIOS)}")
    printer = out or (lambda line: print(line, file=sys.stderr if as_json else sys.stdout,
                                         flush=True))
    base = load_settings()
    work = workdir or Path(tempfile.mkdtemp(prefix="stanch-demo-"))
    run_id = uuid.uuid4().hex[:8]
    broker = None
    worker = None
    sidecars: SidecarFleet | None = None
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
        private_key, trusted_dir = demo_keys(work)
        after = after_onset_s if after_onset_s is not None else \
            AFTER_ONSET_S.get(scenario, DEFAULT_AFTER_ONSET_S)
        duration = onset_s + after
        services = default_fleet_config(None, start_ts=0.0).services
        sidecars = SidecarFleet(settings.model_copy(update={"trusted_keys_dir": trusted_dir}),
                                services, demo_clock(speed, duration), work)
        sidecars.launch()
        printer(f"starting the worker (log {work / 'worker.log'}) and {len(services)} "
                f"sidecars ({', '.join(p.service for p in sidecars.procs)}; logs "
                f"{work}/sidecar-*.log) ...")
        worker = start_worker(settings.model_copy(update={"signing_key_file": private_key}),
                              work / "worker.log")
        sidecars.wait_ready()
        printer(f"worker and sidecars ready after {time.monotonic() - wall0:.1f} s")
        printer(f"scenario {scenario}, seed {seed}: {duration:.0f} simulated s at {speed:g}x; "
                f"incident at onset = {onset_s:.0f} s (times below: simulated, from onset)")
        summary = asyncio.run(run_closed_loop(settings, scenario, seed, speed, onset_s,
                                              duration, trusted_dir, printer,
                                              sidecars=sidecars))
        summary["wall_s"] = round(time.monotonic() - wall0, 1)
        return summary
    finally:
        if sidecars is not None:
            sidecars.stop()
        if worker is not None:
            worker.stop()
        if broker is not None:
            broker.stop()


def format_summary(s: dict[str, Any]) -> str:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f} s"

    cmds = ", ".join(f"{c['kind']} {c['service']} -> {c['target']}" for c in s["commands"])
    sc = s.get("sidecars") or {}
    acks = ", ".join(f"{k} {v}" for k, v in (s.get("acks") or {}).items() if v) or "none"
    sidecar_line = (f"{sc['ran']} ran (one per service), {sc.get('acks_sent', 0)} acks sent "
                    f"({acks})" if sc.get("ran") else "played in-process")
    return "\n".join([
        f"summary ({s['clock']}):",
        f"  time to detect    {f(s['time_to_detect_s'])}",
        f"  time to mitigate  {f(s['time_to_mitigate_s'])}",
        f"  time to recover   {f(s['time_to_recover_s'])}",
        f"  error responses   {s['errors_with_stanch']} with Stanch, "
        f"{s['errors_without_stanch']} without (same seed): {s['errors_avoided']} avoided",
        f"  slow responses    {s.get('slow_with_stanch', '-')} with Stanch, "
        f"{s.get('slow_without_stanch', '-')} without",
        f"  time to restore   {f(s.get('time_to_restore_s'))} (no leased action left)",
        f"  in force at end   {s.get('actions_in_force_at_end', '-')} action(s)",
        f"  commands          {cmds or 'none'}",
        f"  sidecars          {sidecar_line}",
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
