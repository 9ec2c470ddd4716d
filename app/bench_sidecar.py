"""`stanch bench sidecar --json`: latency the sidecar adds, and requests/s it passes.

Method (why this shape): an aiohttp upstream and the sidecar each run in their own
process, as in production; the load generator runs in this process. Added latency is
measured with the same aiohttp client at a fixed open-loop rate (default 1,000 req/s),
first straight to the upstream, then through the sidecar: added = difference of the p50
and p99. max_rps is a closed-loop run through the sidecar with a lean keep-alive HTTP/1.1
client (raw asyncio streams) so the generator is not the bottleneck; the same client
against the upstream directly is reported as ``direct_max_rps`` for scale. Every process
shares the machine's cores, so figures on a small shared machine are noisy and
pessimistic.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import statistics
import sys
import time
from typing import Any

import aiohttp
import orjson

from app.broker import free_port, port_open
from app.settings import Settings, load_settings

BODY = b'{"ok":true,"items":[1,2,3]}'


# --------------------------------------------------------------------------- processes


def _upstream_main(port: int) -> None:
    from aiohttp import web

    async def handle(request: web.BaseRequest) -> web.Response:
        if request.body_exists:
            await request.read()
        return web.Response(body=BODY, content_type="application/json")

    async def serve() -> None:
        runner = web.ServerRunner(web.Server(handle, access_log=None))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
        await asyncio.Event().wait()

    _maybe_uvloop()
    asyncio.run(serve())


def _sidecar_main(settings: Settings, upstream_port: int, port: int, admin_port: int) -> None:
    import logging

    from app.sidecar.main import SidecarOptions, run_sidecar

    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # broker-down noise
    options = SidecarOptions(
        service="bench",
        upstream=f"http://127.0.0.1:{upstream_port}",
        listen=f"127.0.0.1:{port}",
        admin_port=admin_port,
        instance="bench",
        route_templates=["/orders/{id}"],
    )
    run_sidecar(settings, options)


def _maybe_uvloop() -> str:
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def _wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not port_open("127.0.0.1", port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")
        time.sleep(0.05)


# --------------------------------------------------------------------------- load


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def fixed_rate(url: str, rate: float, duration_s: float) -> dict[str, Any]:
    """Open-loop load: one request every 1/rate s, latency of each (ms)."""
    connector = aiohttp.TCPConnector(limit=256, keepalive_timeout=30)
    latencies: list[float] = []
    errors = 0
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(path: str) -> None:
            nonlocal errors
            started = time.perf_counter()
            try:
                async with session.get(url + path) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
                        return
            except aiohttp.ClientError:
                errors += 1
                return
            latencies.append((time.perf_counter() - started) * 1000.0)

        # warm the pool so connection set-up is not measured
        await asyncio.gather(*(one("/warm") for _ in range(32)))
        latencies.clear()
        total = int(rate * duration_s)
        start = time.perf_counter()
        tasks = []
        for i in range(total):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(f"/orders/{i % 1000}")))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return {
        "requests": total,
        "errors": errors,
        "achieved_rps": round(total / elapsed, 1),
        "p50_ms": _percentile(latencies, 0.50),
        "p99_ms": _percentile(latencies, 0.99),
        "mean_ms": statistics.fmean(latencies) if latencies else float("nan"),
    }


async def closed_loop(port: int, concurrency: int, duration_s: float) -> dict[str, Any]:
    """Closed-loop load with raw keep-alive connections; returns completed requests/s."""
    done = 0
    errors = 0
    stop_at = time.perf_counter() + duration_s

    async def worker(n: int) -> None:
        nonlocal done, errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        request = (
            f"GET /orders/{n} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n"
        ).encode()
        try:
            while time.perf_counter() < stop_at:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                if length:
                    await reader.readexactly(length)
                if head.startswith(b"HTTP/1.1 200"):
                    done += 1
                else:
                    errors += 1
        except (OSError, asyncio.IncompleteReadError):
            errors += 1
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {"rps": round(done / elapsed, 1), "completed": done, "errors": errors}


async def _status(admin_port: int) -> dict[str, Any]:
    url = f"http://127.0.0.1:{admin_port}/_stanch/status"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return dict(await resp.json())


# --------------------------------------------------------------------------- driver


def _broker_reachable(settings: Settings) -> bool:
    first = settings.bootstrap.split(",")[0]
    host, _, port = first.rpartition(":")
    return port_open(host.strip("[]"), int(port), timeout=1.0)


def run_bench(
    settings: Settings,
    *,
    rate: float = 1000.0,
    duration_s: float = 5.0,
    concurrency: int = 64,
    max_duration_s: float = 5.0,
    start_broker: bool = True,
) -> dict[str, Any]:
    """Measure with telemetry really published to Kafka.

    When the configured broker is unreachable and ``start_broker`` is set, an embedded
    broker is started for the run (on this machine, competing for the same cores), so
    the publishing cost is part of the figures; otherwise the sidecar runs with Kafka
    down (events buffered then dropped) and ``telemetry_kafka`` says so.
    """
    from app.broker import EmbeddedBroker

    broker: EmbeddedBroker | None = None
    kafka = "configured"
    if not _broker_reachable(settings):
        if start_broker:
            broker = EmbeddedBroker(port=free_port()).start()
            settings = settings.model_copy(
                update={"kafka_bootstrap": broker.bootstrap, "topic_prefix": "bench."}
            )
            kafka = "embedded (started for the benchmark)"
        else:
            kafka = "unreachable (events buffered/dropped, not published)"
    try:
        if kafka != "unreachable (events buffered/dropped, not published)":
            from app.topics import ensure_topics

            asyncio.run(ensure_topics(settings, timeout_s=20))
        result = _run_processes(
            settings, rate, duration_s, concurrency, max_duration_s
        )
    finally:
        if broker is not None:
            broker.stop()
    result["telemetry_kafka"] = kafka
    return result


def _run_processes(
    settings: Settings, rate: float, duration_s: float, concurrency: int, max_duration_s: float
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    up_port, sc_port, admin_port = free_port(), free_port(), free_port()
    upstream = ctx.Process(target=_upstream_main, args=(up_port,), daemon=True)
    sidecar = ctx.Process(
        target=_sidecar_main, args=(settings, up_port, sc_port, admin_port), daemon=True
    )
    upstream.start()
    sidecar.start()
    try:
        _wait_port(up_port)
        _wait_port(sc_port)
        _wait_port(admin_port)
        loop_kind = _maybe_uvloop()
        result = asyncio.run(
            _measure(up_port, sc_port, admin_port, rate, duration_s, concurrency, max_duration_s)
        )
    finally:
        for proc in (sidecar, upstream):
            proc.terminate()
        for proc in (sidecar, upstream):
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    result["event_loop"] = loop_kind
    result["cpus"] = os.cpu_count()
    result["python"] = sys.version.split()[0]
    return result


async def _measure(
    up_port: int,
    sc_port: int,
    admin_port: int,
    rate: float,
    duration_s: float,
    concurrency: int,
    max_duration_s: float,
) -> dict[str, Any]:
    direct_url, sidecar_url = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{sc_port}"
    await fixed_rate(sidecar_url, rate, 1.0)  # warm-up: JIT-free, but caches and pools
    direct = await fixed_rate(direct_url, rate, duration_s)
    through = await fixed_rate(sidecar_url, rate, duration_s)
    direct_max = await closed_loop(up_port, concurrency, max_duration_s)
    sidecar_max = await closed_loop(sc_port, concurrency, max_duration_s)
    status = await _status(admin_port)
    return {
        "added_p50_ms": round(through["p50_ms"] - direct["p50_ms"], 3),
        "added_p99_ms": round(through["p99_ms"] - direct["p99_ms"], 3),
        "max_rps": sidecar_max["rps"],
        "rate_rps": rate,
        "direct": _rounded(direct),
        "sidecar": _rounded(through),
        "direct_max_rps": direct_max["rps"],
        "max_rps_errors": sidecar_max["errors"],
        "concurrency": concurrency,
        "telemetry": status.get("telemetry", {}),
        "targets": {"added_p99_ms": 2.0, "max_rps": 5000.0},
    }


def _rounded(d: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()}


def main(argv: list[str] | None = None) -> None:
    """`python -m app.bench_sidecar [--quick]` prints the JSON figures."""
    args = sys.argv[1:] if argv is None else argv
    quick = "--quick" in args
    result = run_bench(
        load_settings(),
        duration_s=2.0 if quick else 5.0,
        max_duration_s=2.0 if quick else 5.0,
        start_broker="--no-broker" not in args,
    )
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")


if __name__ == "__main__":
    main()
