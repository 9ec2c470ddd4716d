"""Event time that loses nothing valid, on the real broker with a real worker (issue 11):
a producer ahead of the clock costs nobody else an event, slow requests through a real
sidecar are all counted, the simulator's error events are all counted, events are
aggregated on their series' partition whatever their key, tombstones and far-future
windows are dead-lettered, a future window expires no baseline, and a 1 req/s route
failing entirely is found."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiokafka import AIOKafkaProducer

from agents.aggregation import windows_partition
from app.broker import free_port
from app.settings import Settings
from models.aggregation import ERROR_ROUTE, window_id_of
from tests.integration.test_detection_pipeline import consume_until, produce, request
from tests.processes import start_worker

pytestmark = pytest.mark.integration


def same_partition(settings: Settings, n: int, prefix: str) -> list[str]:
    """``n`` service names that Kafka's default partitioner puts on one partition."""
    names = [f"{prefix}{i}" for i in range(200)]
    home = windows_partition(names[0], settings.partitions)
    return [s for s in names if windows_partition(s, settings.partitions) == home][:n]


def counted(windows: list[dict[str, Any]], service: str, route: str | None = None) -> int:
    """Events of ``service`` (``route``) in the windows, each window id once."""
    unique = {window_id_of(w): w for w in windows}
    return sum(w["count"] for w in unique.values()
               if w["service"] == service and (route is None or w["route"] == route))


def dead_letters(settings: Settings, quiet_s: float = 2.0) -> list[dict[str, Any]]:
    return asyncio.run(consume_until(settings, "deadletter", lambda vs: True, timeout=20,
                                     quiet_s=quiet_s))


def category(d: dict[str, Any]) -> str:
    return str(d.get("reason", "")).split(":", 1)[0]


def test_a_producer_ahead_of_the_clock_costs_other_services_nothing(
        topics: Settings, tmp_path: Path) -> None:
    settings = topics
    honest, *ahead = same_partition(settings, 5, "svc")
    leads = (1.0, 60.0, 240.0, 299.0)
    sent = 0
    worker = start_worker(settings, tmp_path / "worker.log")
    try:
        async def stream() -> int:
            producer = AIOKafkaProducer(**settings.aiokafka_kwargs())
            await producer.start()
            n, i = 0, 0
            try:
                end = time.time() + 8.0
                while time.time() < end or i <= 3:
                    now = time.time()
                    await producer.send(settings.topic("requests"), orjson.dumps(
                        [request(now - 0.01 * j, honest, "/h", 5.0) for j in range(10)]),
                        key=honest.encode())
                    n += 10
                    if i == 3:  # one message per lead, once the honest stream runs
                        for svc, lead in zip(ahead, leads, strict=True):
                            await producer.send(settings.topic("requests"), orjson.dumps(
                                [request(now + lead, svc, "/a", 5.0)]), key=svc.encode())
                    i += 1
                    await asyncio.sleep(0.05)
                await producer.flush()
            finally:
                await producer.stop()
            return n

        sent = asyncio.run(stream())
        windows = asyncio.run(consume_until(
            settings, "windows", lambda vs: counted(vs, honest) >= sent, timeout=30,
            quiet_s=1.0))
        assert worker.proc.poll() is None
    finally:
        worker.stop()
    assert counted(windows, honest) == sent
    late = [d for d in dead_letters(settings) if category(d) == "late"]
    assert late == []


async def _slow_upstream() -> tuple[web.AppRunner, str]:
    async def handle(request: web.Request) -> web.Response:
        delay = {"/slow2": 2.0, "/slow10": 10.0}.get(request.path, 0.0)
        await asyncio.sleep(delay)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def test_slow_requests_through_a_real_sidecar_are_all_counted(
        topics: Settings, tmp_path: Path) -> None:
    from app.keys import generate_keypair
    from app.sidecar import Sidecar, SidecarOptions

    settings = topics
    generate_keypair(tmp_path / "keys", "k1")
    worker = start_worker(settings, tmp_path / "worker.log")
    counts = {"/fast": 0, "/slow2": 0, "/slow10": 0}

    async def drive() -> None:
        runner, upstream = await _slow_upstream()
        sidecar = Sidecar(settings, SidecarOptions(
            service="shop", upstream=upstream, listen="127.0.0.1:0", admin_port=0,
            route_templates=["/fast", "/slow2", "/slow10"], telemetry_flush_s=0.05,
            upstream_timeout_s=30.0, trusted_keys_dir=tmp_path / "keys"))
        await sidecar.start()
        try:
            async with aiohttp.ClientSession() as http:
                async def call(path: str) -> None:
                    async with http.get(f"{sidecar.ingress_url}{path}") as resp:
                        await resp.read()
                        assert resp.status == 200
                    counts[path] += 1

                async def fast() -> None:
                    end = time.monotonic() + 14.0
                    while time.monotonic() < end:
                        await asyncio.gather(*(call("/fast") for _ in range(5)))
                        await asyncio.sleep(0.02)

                async def slow(path: str, n: int, every: float) -> None:
                    tasks = []
                    for _ in range(n):
                        tasks.append(asyncio.ensure_future(call(path)))
                        await asyncio.sleep(every)
                    await asyncio.gather(*tasks)

                await asyncio.gather(fast(), slow("/slow2", 20, 0.2), slow("/slow10", 5, 0.5))
            await asyncio.sleep(1.0)  # the telemetry flush
        finally:
            await sidecar.stop()
            await runner.cleanup()

    try:
        asyncio.run(drive())
        total = sum(counts.values())
        windows = asyncio.run(consume_until(
            settings, "windows", lambda vs: counted(vs, "shop") >= total, timeout=40,
            quiet_s=1.0))
        assert worker.proc.poll() is None
    finally:
        worker.stop()
    assert counts["/slow10"] == 5 and counts["/slow2"] == 20
    for route, n in counts.items():
        assert counted(windows, "shop", route) == n, route
    assert [d for d in dead_letters(settings) if category(d) == "late"] == []


def test_every_simulator_error_event_is_counted(topics: Settings, tmp_path: Path) -> None:
    """The fleet's clock behind the wall clock (as in the demo): an idle error partition
    used to close its windows by the wall clock and dead-letter every error event."""
    from app.simulate import run_simulation

    settings = topics
    worker = start_worker(settings, tmp_path / "worker.log")
    try:
        report = asyncio.run(run_simulation(
            settings, "bad-deploy", seed=1, duration_s=60.0, speed=4.0, onset_s=10.0,
            start_ts=round(time.time() - 150.0, 3), create_topics=False))
        assert report.errors > 100
        windows = asyncio.run(consume_until(
            settings, "windows",
            lambda vs: sum(w["count"] for w in {window_id_of(x): x for x in vs}.values()
                           if w["route"] == ERROR_ROUTE) >= report.errors,
            timeout=60, quiet_s=2.0))
        assert worker.proc.poll() is None
    finally:
        worker.stop()
    unique = {window_id_of(w): w for w in windows}.values()
    assert sum(w["count"] for w in unique if w["route"] == ERROR_ROUTE) == report.errors
    assert sum(w["count"] for w in unique if w["route"] != ERROR_ROUTE) == report.requests
    assert [d for d in dead_letters(settings) if category(d) == "late"] == []


def test_events_are_aggregated_on_their_series_partition_whatever_their_key(
        topics: Settings, tmp_path: Path) -> None:
    """Live-like: every 50 ms a message of one series, keyed by nothing (the producer
    spreads those over the partitions), by another service, or by its own service."""
    settings = topics
    other = [s for s in ("a", "b", "c", "d", "e", "f")
             if windows_partition(s, settings.partitions)
             != windows_partition("svc", settings.partitions)][0]
    worker = start_worker(settings, tmp_path / "worker.log")
    try:
        async def stream() -> int:
            producer = AIOKafkaProducer(**settings.aiokafka_kwargs())
            await producer.start()
            n, j = 0, 0
            try:
                end = time.time() + 6.0
                while time.time() < end:
                    now = time.time()
                    events = [request(now - 0.001 * i, "svc", "/r", 3.0 + i) for i in range(5)]
                    key = (None, other.encode(), b"svc")[j % 3]
                    await producer.send(settings.topic("requests"), orjson.dumps(events),
                                        key=key)
                    n, j = n + 5, j + 1
                    await asyncio.sleep(0.05)
                await producer.flush()
            finally:
                await producer.stop()
            return n

        sent = asyncio.run(stream())
        windows = asyncio.run(consume_until(
            settings, "windows", lambda vs: counted(vs, "svc") >= sent, timeout=40,
            quiet_s=3.0))
        assert worker.proc.poll() is None
    finally:
        worker.stop()
    ids = [window_id_of(w) for w in windows if w["service"] == "svc"]
    assert len(ids) == len(set(ids)) >= 6  # each window once, with all of its events
    assert counted(windows, "svc") == sent
    assert [d for d in dead_letters(settings) if category(d) == "late"] == []


def test_tombstones_are_dead_lettered(topics: Settings, tmp_path: Path) -> None:
    settings = topics
    worker = start_worker(settings, tmp_path / "worker.log")
    try:
        for topic in ("requests", "errors", "windows"):
            asyncio.run(produce(settings, topic, [(b"svc", None)]))  # type: ignore[list-item]
        letters = asyncio.run(consume_until(
            settings, "deadletter",
            lambda vs: sum(category(d) == "null value (tombstone)" for d in vs) >= 3,
            timeout=30, quiet_s=1.0))
    finally:
        worker.stop()
    tombstones = [d for d in letters if category(d) == "null value (tombstone)"]
    assert sorted(d["source_topic"] for d in tombstones) == sorted(
        settings.topic(t) for t in ("requests", "errors", "windows"))


def _status(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stanch/status", timeout=5) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def test_future_windows_expire_no_baseline(topics: Settings, tmp_path: Path) -> None:
    """A window 200 s ahead (inside the skew) no longer drags the TTL clock; one 30 days
    ahead is dead-lettered. TTL 40 s: the expiry timer runs every 10 s."""
    from models import sketch as sk

    settings = topics
    port = free_port()
    now = float(int(time.time()))

    def summary(service: str, start: float) -> dict[str, Any]:
        return {"service": service, "route": "/r", "window_start": start, "window_s": 1.0,
                "count": 3, "errors": 0, "sketch": sk.build([5.0, 6.0, 7.0]), "p50": 6.0,
                "p90": 7.0, "p99": 7.0}

    live = [summary("live", now - 30 + i) for i in range(25)]
    worker = start_worker(settings, tmp_path / "worker.log", STANCH_SERIES_TTL_S="40",
                          STANCH_WEB_PORT=str(port))
    try:
        asyncio.run(produce(settings, "windows", [
            (b"live|/r|", orjson.dumps(live)),
            (b"ahead|/r|", orjson.dumps([summary("ahead", now + 200.0)])),
            (b"month|/r|", orjson.dumps([summary("month", now + 30 * 86_400.0)])),
        ]))
        deadline = time.monotonic() + 30
        while _status(port)["agents"]["detection"].get("windows", 0) < 26:
            assert time.monotonic() < deadline, "windows not processed"
            time.sleep(0.5)
        time.sleep(12.0)  # at least one expiry tick
        stats = _status(port)["agents"]["detection"]
    finally:
        worker.stop()
    assert stats.get("expired series", 0) == 0
    letters = dead_letters(settings)
    skew = [d for d in letters if category(d) == "clock skew"]
    assert len(skew) == 1 and "month" in json.dumps(skew[0])


def test_a_route_at_one_request_per_second_failing_entirely_is_found(
        topics: Settings, tmp_path: Path) -> None:
    settings = topics
    start = float(int(time.time())) - 400.0
    events = [request(start + i + 0.5, "tiny", "/r", 8.0, 500 if i >= 300 else 200)
              for i in range(330)]  # 300 s healthy at 1 req/s, then 30 s all failing
    messages: list[tuple[bytes | None, bytes]] = [
        (b"tiny", orjson.dumps(events[i:i + 10])) for i in range(0, len(events), 10)]
    worker = start_worker(settings, tmp_path / "worker.log")
    try:
        asyncio.run(produce(settings, "requests", messages))
        anomalies = asyncio.run(consume_until(
            settings, "anomalies",
            lambda vs: any(a["series"] == "tiny|/r|" and a["signal"] == "errors" for a in vs),
            timeout=40))
    finally:
        worker.stop()
    found = [a for a in anomalies if a["series"] == "tiny|/r|" and a["signal"] == "errors"]
    assert found, "the low-volume outage was not found"
    assert found[0]["window_start"] < start + 330
