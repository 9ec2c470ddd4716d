"""Process level of `stanch sidecar`: options, wiring, admin endpoints, lifecycle.

``Sidecar`` is an object with ``start()``/``stop()`` so tests and the benchmark can run
several in one event loop on ephemeral ports; ``run_sidecar`` is the blocking entry point
the CLI calls. Admin listener (local by default): ``/_stanch/health``, ``/_stanch/metrics``
(Prometheus text), ``/_stanch/status`` (JSON, active enforcements with leases) and the
egress proxy under ``/_egress/NAME/...``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import signal
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from app.settings import Settings
from app.sidecar.commands import CommandConsumer
from app.sidecar.fleet import FleetMembership
from app.sidecar.proxy import EGRESS_PREFIX, Proxy
from app.sidecar.rollback import RollbackHook
from app.sidecar.telemetry import TelemetryPublisher
from models.enforcement import EnforcementTable
from schemas.signing import KeyRing

log = logging.getLogger(__name__)


class OptionError(ValueError):
    """A sidecar option is wrong; the message names the option."""


def parse_hostport(value: str, option: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise OptionError(f"{option}: {value!r} must be host:port")
    return host or "0.0.0.0", int(port)


def parse_clock_origin(value: str) -> tuple[float, float]:
    """``SIM_TS@WALL_TS`` -> (sim_ts, wall_ts), as given to ``--clock-origin``."""
    sim, sep, wall = value.partition("@")
    try:
        origin = (float(sim), float(wall))
    except ValueError:
        origin = (math.nan, math.nan)
    if not sep or not all(math.isfinite(v) for v in origin):
        raise OptionError(f"--clock-origin: {value!r} must be SIM_TS@WALL_TS (epoch seconds)")
    return origin


class SimulatedClock:
    """Epoch seconds of a simulated fleet: ``sim_ts`` at wall time ``wall_ts``, then
    ``speed`` simulated seconds per wall second.

    Why a sidecar needs it: leases (``issued_at``/``expires_at``) are in the event time
    of the data the decisions were made on (agents.mitigation). In front of real services
    that is the wall clock; in front of a simulated fleet running ``speed`` times faster
    (``stanch demo``) it is the fleet's clock, and a wall-clock sidecar would find every
    command expired before arrival. Never set in production.
    """

    __slots__ = ("sim_ts", "speed", "wall_ts")

    def __init__(self, sim_ts: float, wall_ts: float, speed: float) -> None:
        self.sim_ts = sim_ts
        self.wall_ts = wall_ts
        self.speed = speed

    def __call__(self) -> float:
        return self.sim_ts + (time.time() - self.wall_ts) * self.speed

    def describe(self) -> dict[str, float]:
        return {"sim_ts": self.sim_ts, "wall_ts": self.wall_ts, "speed": self.speed}


def parse_dependency(value: str) -> tuple[str, str]:
    """``NAME=URL`` -> (name, url), as given to ``--dependency``."""
    name, sep, url = value.partition("=")
    if not sep or not name or not url.startswith(("http://", "https://")):
        raise OptionError(f"--dependency: {value!r} must be NAME=http://host:port")
    if "/" in name:
        raise OptionError(f"--dependency: name {name!r} must not contain '/'")
    return name, url


@dataclass
class SidecarOptions:
    """Everything `stanch sidecar` takes on its command line."""

    service: str
    upstream: str
    listen: str = "0.0.0.0:8000"
    dependencies: dict[str, str] = field(default_factory=dict)
    instance: str | None = None  # default: "<hostname>:<listen port>", stable across restarts
    version: str = ""
    region: str = ""
    admin_host: str = "127.0.0.1"
    admin_port: int = 9901
    route_templates: list[str] = field(default_factory=list)
    rollback_command: str | None = None
    rollback_webhook: str | None = None
    rollback_timeout_s: float = 30.0
    upstream_timeout_s: float = 30.0
    telemetry_buffer: int = 50_000
    telemetry_batch: int = 300
    telemetry_flush_s: float = 0.15
    trusted_keys_dir: Path | None = None  # default: settings.trusted_keys_dir
    clock_origin: tuple[float, float] | None = None  # (sim_ts, wall_ts): a simulated clock
    clock_speed: float = 1.0  # simulated seconds per wall second (with clock_origin)

    def validate(self) -> None:
        if not self.service:
            raise OptionError("--service is required")
        if not self.upstream.startswith(("http://", "https://")):
            raise OptionError(f"--upstream: {self.upstream!r} must be an http(s) URL")
        parse_hostport(self.listen, "--listen")
        if not 0 <= self.admin_port <= 65535:
            raise OptionError(f"--admin-port: {self.admin_port} is out of range")
        for name, url in self.dependencies.items():
            parse_dependency(f"{name}={url}")
        for template in self.route_templates:
            if not template.startswith("/"):
                raise OptionError(f"--route-template: {template!r} must start with '/'")
        if self.rollback_timeout_s <= 0:
            raise OptionError("--rollback-timeout must be > 0")
        if self.telemetry_buffer < 1:
            raise OptionError("telemetry buffer must hold at least one event")
        if not (math.isfinite(self.clock_speed) and self.clock_speed > 0):
            raise OptionError(f"--clock-speed: {self.clock_speed} must be a number > 0")
        if self.clock_speed != 1.0 and self.clock_origin is None:
            raise OptionError("--clock-speed needs --clock-origin (where the clock starts)")

    def clock(self) -> Callable[[], float]:
        """The clock leases and request times are judged by: the wall clock, or the
        simulated one given by ``clock_origin``/``clock_speed``."""
        if self.clock_origin is None:
            return time.time
        return SimulatedClock(*self.clock_origin, self.clock_speed)

    def instance_name(self, bound_port: int | None = None) -> str:
        if self.instance:
            return self.instance
        port = bound_port if bound_port is not None else parse_hostport(self.listen, "")[1]
        return f"{socket.gethostname()}:{port}"


def load_keyring(settings: Settings, options: SidecarOptions) -> KeyRing:
    """Trusted public keys: the options' directory, else STANCH_TRUSTED_KEYS_DIR."""
    directory = options.trusted_keys_dir or settings.trusted_keys_dir
    if directory is None:
        log.warning("no trusted keys directory: every command will be rejected (unknown kid)")
        return KeyRing()
    return KeyRing.from_dir(directory)


class _SidecarCollector(Collector):
    """Reads the sidecar's plain counters at scrape time (nothing on the hot path)."""

    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar

    def collect(self) -> Iterable[Any]:
        sc = self.sidecar
        c = sc.proxy.counters
        labels = ["service", "instance"]
        base = [sc.options.service, sc.instance]
        proxied = CounterMetricFamily(
            "stanch_sidecar_requests", "Requests handled by the sidecar",
            labels=[*labels, "direction", "outcome"],
        )
        for direction, outcome, value in (
            ("ingress", "passed", c.ingress_passed),
            ("ingress", "throttled", c.ingress_throttled),
            ("ingress", "shed", c.ingress_shed),
            ("egress", "passed", c.egress_passed),
            ("egress", "isolated", c.egress_isolated),
        ):
            proxied.add_metric([*base, direction, outcome], value)
        yield proxied
        upstream = CounterMetricFamily(
            "stanch_sidecar_upstream_errors", "Forwards that failed (502/504)", labels=labels
        )
        upstream.add_metric(base, c.upstream_errors)
        yield upstream
        t = sc.telemetry
        for name, doc, value in (
            ("stanch_sidecar_telemetry_recorded", "Request events buffered", t.recorded),
            ("stanch_sidecar_telemetry_published", "Request events delivered", t.published),
            ("stanch_sidecar_telemetry_dropped", "Request events dropped (buffer full)",
             t.dropped),
            ("stanch_sidecar_telemetry_retried", "Request events Kafka did not take, kept "
             "and sent again", t.retried),
        ):
            fam = CounterMetricFamily(name, doc, labels=labels)
            fam.add_metric(base, value)
            yield fam
        buffered = GaugeMetricFamily(
            "stanch_sidecar_telemetry_buffered", "Events waiting to be published", labels=labels
        )
        buffered.add_metric(base, t.buffered)
        yield buffered
        commands = CounterMetricFamily(
            "stanch_sidecar_commands", "Commands by outcome", labels=[*labels, "status"]
        )
        for status, value in sc.commands.counts.items():
            commands.add_metric([*base, status], value)
        yield commands
        active = GaugeMetricFamily(
            "stanch_sidecar_active_enforcements", "Active enforcements", labels=[*labels, "kind"]
        )
        for kind, table in (
            ("throttle", sc.table.throttles),
            ("shed", sc.table.sheds),
            ("isolate", sc.table.isolates),
        ):
            active.add_metric([*base, kind], len(table))
        yield active
        live = GaugeMetricFamily(
            "stanch_sidecar_live_instances",
            "Live sidecar instances of this service (heartbeats); each admits 1/N of a throttle",
            labels=labels,
        )
        live.add_metric(base, sc.table.instances)
        yield live


class Sidecar:
    """One sidecar: ingress proxy, egress proxy, telemetry, command enforcement, admin."""

    def __init__(
        self, settings: Settings, options: SidecarOptions, keyring: KeyRing | None = None
    ) -> None:
        options.validate()
        self.settings = settings
        self.options = options
        self.keyring = keyring if keyring is not None else load_keyring(settings, options)
        self.table = EnforcementTable()
        self.clock = options.clock()
        self.telemetry = TelemetryPublisher(
            settings,
            options.service,
            max_buffer=options.telemetry_buffer,
            batch_size=options.telemetry_batch,
            flush_interval_s=options.telemetry_flush_s,
        )
        self.instance = options.instance_name()
        self.proxy = self._make_proxy()
        self.commands = self._make_commands()
        self.fleet = FleetMembership(
            settings, options.service, self.instance, self.table, clock=self.clock
        )
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_SidecarCollector(self))
        self.ingress_port = 0
        self.admin_port = 0
        self.started_at = 0.0
        self._runners: list[web.BaseRunner] = []

    def _make_proxy(self) -> Proxy:
        o = self.options
        return Proxy(
            service=o.service,
            upstream=o.upstream,
            dependencies=o.dependencies,
            table=self.table,
            telemetry=self.telemetry,
            route_templates=o.route_templates,
            instance=self.instance,
            version=o.version,
            region=o.region,
            upstream_timeout_s=o.upstream_timeout_s,
            clock=self.clock,
        )

    def _make_commands(self) -> CommandConsumer:
        o = self.options
        hook = RollbackHook(o.rollback_command, o.rollback_webhook, o.rollback_timeout_s)
        return CommandConsumer(
            self.settings, o.service, self.instance, self.keyring, self.table, hook,
            clock=self.clock,
        )

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        o = self.options
        host, port = parse_hostport(o.listen, "--listen")
        ingress_runner = web.ServerRunner(web.Server(self.proxy.ingress, access_log=None))
        await ingress_runner.setup()
        await web.TCPSite(ingress_runner, host, port, backlog=1024).start()
        self._runners.append(ingress_runner)
        self.ingress_port = _bound_port(ingress_runner)
        if not o.instance and port == 0:
            self._rename_instance(self.options.instance_name(self.ingress_port))
        admin_runner = web.AppRunner(self._admin_app(), access_log=None)
        await admin_runner.setup()
        await web.TCPSite(admin_runner, o.admin_host, o.admin_port).start()
        self._runners.append(admin_runner)
        self.admin_port = _bound_port(admin_runner)
        await self.proxy.start()
        self.telemetry.start()
        self.commands.start()
        self.fleet.start()
        self.started_at = time.time()
        log.info(
            "sidecar %s (%s): ingress :%d -> %s, admin :%d",
            o.service, self.instance, self.ingress_port, o.upstream, self.admin_port,
        )

    def _rename_instance(self, instance: str) -> None:
        # Port 0 (tests): the instance name depends on the bound port, known only now.
        self.instance = instance
        self.proxy._base_event["instance"] = instance
        self.commands.instance = instance
        self.fleet.instance = instance

    async def stop(self) -> None:
        await self.fleet.stop()
        await self.commands.stop()
        for runner in reversed(self._runners):
            with contextlib.suppress(Exception):
                await runner.cleanup()
        self._runners.clear()
        await self.proxy.close()
        await self.telemetry.stop()

    @property
    def ingress_url(self) -> str:
        return f"http://127.0.0.1:{self.ingress_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def egress_url(self, dependency: str) -> str:
        return f"{self.admin_url}{EGRESS_PREFIX}{dependency}"

    # ------------------------------------------------------------------ admin
    def _admin_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/_stanch/health", self._health)
        app.router.add_get("/_stanch/metrics", self._metrics)
        app.router.add_get("/_stanch/status", self._status)
        app.router.add_route("*", EGRESS_PREFIX + "{tail:.*}", self.proxy.egress)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "status": "ok",
                "service": self.options.service,
                "instance": self.instance,
                "kafka_connected": self.commands.connected,
                "commands_ready": self.commands.ready.is_set(),
            }
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), content_type="text/plain", charset="utf-8"
        )

    def status(self) -> dict[str, Any]:
        """Everything an operator (or the demo's simulated fleet) needs to see what this
        sidecar enforces right now: ``active`` (kind, key, target, params, current
        rate/share, lease), rollbacks run, request counters, command counts, and the
        clock leases are judged by (``now``; ``clock`` is ``"wall"`` or the simulated
        clock's origin and speed)."""
        now = self.clock()
        t = self.telemetry
        c = self.proxy.counters
        clock = self.clock
        return {
            "service": self.options.service,
            "instance": self.instance,
            "version": self.options.version,
            "upstream": self.options.upstream,
            "dependencies": self.options.dependencies,
            "kafka_connected": self.commands.connected,
            "commands_ready": self.commands.ready.is_set(),
            "commands": dict(self.commands.counts),
            "active": self.table.status(now),
            "live_instances": self.table.instances,
            "rollbacks_done": sorted(self.table.rollbacks_done),
            "requests": {
                "ingress_passed": c.ingress_passed, "ingress_throttled": c.ingress_throttled,
                "ingress_shed": c.ingress_shed, "egress_passed": c.egress_passed,
                "egress_isolated": c.egress_isolated, "upstream_errors": c.upstream_errors,
            },
            "telemetry": {
                "recorded": t.recorded, "published": t.published,
                "dropped": t.dropped, "buffered": t.buffered, "connected": t.connected,
                "retried": t.retried,
            },
            "trusted_kids": self.keyring.kids,
            "now": now,
            "clock": clock.describe() if isinstance(clock, SimulatedClock) else "wall",
        }

    async def _status(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.status()), content_type="application/json")


def _bound_port(runner: web.BaseRunner) -> int:
    address = runner.addresses[0]
    return int(address[1])


def _install_uvloop() -> bool:
    """Use uvloop when it is installed (measurably faster proxying); optional."""
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


#: Generation thresholds for the proxy process (CPython's default is 700, 10, 10).
GC_THRESHOLDS = (20_000, 20, 20)


async def serve(settings: Settings, options: SidecarOptions) -> None:
    """Run a sidecar until SIGINT/SIGTERM."""
    sidecar = Sidecar(settings, options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await sidecar.start()
    # Everything allocated so far (modules, sessions, tables) lives as long as the process:
    # move it out of the collector's sight and collect young objects less often, so that
    # full collections do not land in the middle of proxied requests (tail latency).
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        await stop.wait()
    finally:
        await sidecar.stop()


def run_sidecar(settings: Settings, options: SidecarOptions, *, use_uvloop: bool = True) -> None:
    """Blocking entry point for `stanch sidecar` (the CLI wraps it in click)."""
    options.validate()
    if use_uvloop:
        _install_uvloop()
    asyncio.run(serve(settings, options))
