"""The sidecar end to end: real HTTP servers behind it, the real broker, signed commands.

Each test publishes signed commands on the commands topic, observes what requests get
through the sidecar, and reads the acks the sidecar published.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from app.broker import free_port
from app.keys import generate_keypair
from app.settings import Settings
from app.sidecar import Sidecar, SidecarOptions
from schemas.records import RequestEvent
from schemas.signing import load_private_key, sign_command

pytestmark = pytest.mark.integration

SERVICE = "checkout"


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 120))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- helpers


class Signer:
    """The mitigation agent's side: a private key that signs commands."""

    def __init__(self, key: Ed25519PrivateKey, kid: str) -> None:
        self.key, self.kid = key, kid
        self.seq = 0

    def command(self, kind: str, target: str = SERVICE, params: dict[str, Any] | None = None,
                *, service: str = SERVICE, lease_s: float = 60.0, issued_at: float | None = None,
                cid: str | None = None) -> dict[str, Any]:
        self.seq += 1
        now = time.time() if issued_at is None else issued_at
        fields = {
            "id": cid or f"inc-{kind}:{kind}:{self.seq}:{time.time_ns()}",
            "kind": kind,
            "service": service,
            "target": target,
            "params": params or {},
            "incident_id": "inc-test",
            "issued_at": now,
            "expires_at": now + lease_s,
            "reason": f"test {kind}",
        }
        return sign_command(fields, self.key, self.kid)


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    generate_keypair(directory, "k1")
    return directory


@pytest.fixture
def signer(keys_dir: Path) -> Signer:
    return Signer(load_private_key(keys_dir / "k1.key.pem"), "k1")


async def start_app(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


def upstream_app(name: str) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {"server": name, "path": request.path, "method": request.method,
             "body": body.decode(), "query": request.query_string}
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def publish(settings: Settings, *commands: dict[str, Any], key: str = SERVICE) -> None:
    producer = AIOKafkaProducer(**settings.aiokafka_kwargs())
    await producer.start()
    try:
        for command in commands:
            await producer.send_and_wait(
                settings.topic("commands"), orjson.dumps(command), key=key.encode()
            )
    finally:
        await producer.stop()


class Acks:
    """Reads stanch.acks from the beginning; waits for the ack of a command id."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.seen: list[dict[str, Any]] = []
        self.consumer = AIOKafkaConsumer(
            **settings.aiokafka_kwargs(), group_id=None, auto_offset_reset="earliest",
            fetch_max_wait_ms=100,
        )

    async def __aenter__(self) -> Acks:
        await self.consumer.start()
        topic = self.settings.topic("acks")
        await self.consumer.topics()
        parts = self.consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in parts]
        self.consumer.assign(tps)
        await self.consumer.seek_to_beginning(*tps)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()

    async def wait(self, command_id: str, status: str | None = None,
                   timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for ack in self.seen:
                if ack["command_id"] == command_id and status in (None, ack["status"]):
                    return ack
            if time.monotonic() > deadline:
                raise AssertionError(f"no ack {status} for {command_id}; seen {self.seen}")
            await self.poll(0.2)

    async def poll(self, seconds: float) -> None:
        batches = await self.consumer.getmany(timeout_ms=int(seconds * 1000))
        for records in batches.values():
            self.seen.extend(orjson.loads(r.value) for r in records)

    def for_id(self, command_id: str) -> list[dict[str, Any]]:
        return [a for a in self.seen if a["command_id"] == command_id]


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.1)


async def start_sidecar(settings: Settings, keys_dir: Path, upstream: str,
                        **extra: Any) -> Sidecar:
    options = SidecarOptions(
        service=SERVICE, upstream=upstream, listen="127.0.0.1:0", admin_port=0,
        route_templates=["/orders/{id}", "/search"], version="v42",
        trusted_keys_dir=keys_dir, telemetry_flush_s=0.05, **extra,
    )
    sidecar = Sidecar(settings, options)
    await sidecar.start()
    await asyncio.wait_for(sidecar.commands.ready.wait(), 30)
    return sidecar


async def status_of(session: aiohttp.ClientSession, url: str, method: str = "GET") -> int:
    async with session.request(method, url) as resp:
        await resp.read()
        return resp.status


# --------------------------------------------------------------------------- tests


def test_throttle_end_to_end_with_telemetry(topics: Settings, keys_dir: Path,
                                            signer: Signer) -> None:
    async def scenario() -> None:
        up, up_url = await start_app(upstream_app("checkout"))
        sidecar = await start_sidecar(topics, keys_dir, up_url)
        try:
            async with aiohttp.ClientSession() as http, Acks(topics) as acks:
                async with http.post(f"{sidecar.ingress_url}/orders/7?x=1", data=b"hi") as r:
                    echoed = await r.json()
                assert r.status == 200
                assert echoed == {"server": "checkout", "path": "/orders/7", "method": "POST",
                                  "body": "hi", "query": "x=1"}
                throttle = signer.command(
                    "throttle", params={"rate_per_s": 0.5, "burst": 2, "route": "/orders/{id}"}
                )
                await publish(topics, throttle)
                ack = await acks.wait(throttle["id"], "applied")
                assert ack["service"] == SERVICE and ack["instance"] == sidecar.instance
                codes = [await status_of(http, f"{sidecar.ingress_url}/orders/{i}")
                         for i in range(4)]
                assert codes == [200, 200, 429, 429]
                async with http.get(f"{sidecar.ingress_url}/orders/9") as r:
                    assert r.status == 429
                    assert int(r.headers["Retry-After"]) >= 1
                assert await status_of(http, f"{sidecar.ingress_url}/search") == 200
                async with http.get(f"{sidecar.admin_url}/_stanch/status") as r:
                    status = await r.json()
                [active] = status["active"]
                assert active["kind"] == "throttle" and active["key"] == "/orders/{id}"
                assert 0 < active["lease_remaining_s"] <= 60
                async with http.get(f"{sidecar.admin_url}/_stanch/metrics") as r:
                    metrics = await r.text()
                assert 'outcome="throttled"' in metrics
                assert "stanch_sidecar_telemetry_dropped_total" in metrics
            events = await read_request_events(topics, want=7)
            assert len(events) == 7
            throttled = [e for e in events if e["status"] == 429]
            assert len(throttled) == 3
            # refused by Stanch: counted, but not a failure of the service
            assert all(e["route"] == "/orders/{id}" and e["error"] is False
                       for e in throttled)
            assert all("error" not in e for e in events if e["status"] != 429)
            assert {e["route"] for e in events} == {"/orders/{id}", "/search"}
            assert all(e["service"] == SERVICE and e["version"] == "v42" for e in events)
            assert all(e["latency_ms"] >= 0 and e["ts"] > 0 for e in events)
        finally:
            await sidecar.stop()
            await up.cleanup()

    run(scenario())


async def read_request_events(settings: Settings, want: int,
                              timeout: float = 15.0) -> list[dict[str, Any]]:
    consumer = AIOKafkaConsumer(
        **settings.aiokafka_kwargs(), group_id=None, auto_offset_reset="earliest",
        fetch_max_wait_ms=100,
    )
    await consumer.start()
    try:
        topic = settings.topic("requests")
        await consumer.topics()
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        events: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while len(events) < want and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    assert record.key == SERVICE.encode()
                    batch = orjson.loads(record.value)
                    assert isinstance(batch, list)  # sidecars publish batches
                    for event in batch:  # what the pipeline accepts, not dead letters
                        RequestEvent.from_dict(event)
                    events.extend(batch)
        return events
    finally:
        await consumer.stop()


def test_shed_then_restore(topics: Settings, keys_dir: Path, signer: Signer) -> None:
    async def scenario() -> None:
        up, up_url = await start_app(upstream_app("checkout"))
        sidecar = await start_sidecar(topics, keys_dir, up_url)
        try:
            async with aiohttp.ClientSession() as http, Acks(topics) as acks:
                shed = signer.command("shed", params={"share": 0.5, "routes": ["/search"]})
                await publish(topics, shed)
                await acks.wait(shed["id"], "applied")
                codes = [await status_of(http, f"{sidecar.ingress_url}/search?q={i}")
                         for i in range(10)]
                assert codes.count(503) == 5 and codes.count(200) == 5
                assert await status_of(http, f"{sidecar.ingress_url}/orders/1") == 200
                restore = signer.command("restore", params={"kind": "shed"})
                await publish(topics, restore)
                ack = await acks.wait(restore["id"], "applied")
                assert "lifted" in ack["reason"]
                codes = [await status_of(http, f"{sidecar.ingress_url}/search") for _ in range(6)]
                assert codes == [200] * 6
        finally:
            await sidecar.stop()
            await up.cleanup()

    run(scenario())


def test_isolate_egress_fails_fast_then_restore(topics: Settings, keys_dir: Path,
                                                signer: Signer) -> None:
    async def scenario() -> None:
        up, up_url = await start_app(upstream_app("checkout"))
        pay, pay_url = await start_app(upstream_app("payments"))
        inv, inv_url = await start_app(upstream_app("inventory"))
        down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        sidecar = await start_sidecar(
            topics, keys_dir, up_url,
            dependencies={"payments": pay_url, "inventory": inv_url, "ledger": down},
        )
        try:
            async with aiohttp.ClientSession() as http, Acks(topics) as acks:
                async with http.post(f"{sidecar.egress_url('payments')}/charge/5?a=b",
                                     data=b"x") as r:
                    assert r.status == 200
                    assert (await r.json())["path"] == "/charge/5"
                isolate = signer.command("isolate", target="payments")
                await publish(topics, isolate)
                await acks.wait(isolate["id"], "applied")
                started = time.perf_counter()
                async with http.post(f"{sidecar.egress_url('payments')}/charge/5") as r:
                    assert r.status == 503
                    assert r.headers["X-Stanch-Isolated"] == "payments"
                assert time.perf_counter() - started < 0.5  # fails fast
                assert await status_of(http, f"{sidecar.egress_url('inventory')}/stock") == 200
                assert await status_of(http, f"{sidecar.egress_url('nope')}/x") == 404
                assert await status_of(http, f"{sidecar.egress_url('ledger')}/post") == 502
                restore = signer.command("restore", params={"kind": "isolate",
                                                            "target": "payments"})
                await publish(topics, restore)
                await acks.wait(restore["id"], "applied")
                assert await status_of(http, f"{sidecar.egress_url('payments')}/charge/6") == 200
            events = await read_request_events(topics, want=5)  # the 404 is not proxied
            egress = [e for e in events if e.get("dependency") == "payments"]
            assert [e["status"] for e in egress] == [200, 503, 200]
            # the isolation's own fail-fast answer is not the dependency failing ...
            assert egress[1]["error"] is False and "error" not in egress[0]
            # ... a dependency that cannot be reached is
            ledger = [e for e in events if e.get("dependency") == "ledger"]
            assert [(e["status"], e["error"]) for e in ledger] == [(502, True)]
        finally:
            await sidecar.stop()
            for runner in (up, pay, inv):
                await runner.cleanup()

    run(scenario())


def test_rollback_hooks_command_webhook_and_failure(topics: Settings, keys_dir: Path,
                                                    signer: Signer, tmp_path: Path) -> None:
    out = tmp_path / "rollbacks.txt"
    script = (
        f"{sys.executable} -c \"import os; open({str(out)!r}, 'a').write("
        "os.environ['STANCH_TARGET_VERSION'] + ' ' + os.environ['STANCH_COMMAND_ID'] + ' ' + "
        "os.environ['STANCH_SERVICE'] + chr(10))\""
    )

    async def scenario() -> None:
        up, up_url = await start_app(upstream_app("checkout"))
        received: list[dict[str, Any]] = []

        async def hook(request: web.Request) -> web.Response:
            received.append(await request.json())
            return web.Response(status=204)

        hook_app = web.Application()
        hook_app.router.add_post("/rollback", hook)
        hooks, hook_url = await start_app(hook_app)
        ok = await start_sidecar(topics, keys_dir, up_url, rollback_command=script,
                                 instance="cmd")
        web_sidecar = await start_sidecar(topics, keys_dir, up_url, instance="webhook",
                                          rollback_webhook=f"{hook_url}/rollback")
        failing = await start_sidecar(topics, keys_dir, up_url, instance="failing",
                                      rollback_command="echo boom >&2; exit 3")
        try:
            async with Acks(topics) as acks:
                rollback = signer.command("rollback", target="v41")
                await publish(topics, rollback)
                acked = {a["instance"]: a for a in [
                    await acks.wait_instance(rollback["id"], name)
                    for name in ("cmd", "webhook", "failing")
                ]}
            assert acked["cmd"]["status"] == "applied"
            assert out.read_text() == f"v41 {rollback['id']} {SERVICE}\n"
            assert acked["webhook"]["status"] == "applied"
            assert received == [rollback]  # the signed command, verbatim
            assert acked["failing"]["status"] == "failed"
            assert "exited 3" in acked["failing"]["reason"] and "boom" in acked["failing"]["reason"]
        finally:
            for sc in (ok, web_sidecar, failing):
                await sc.stop()
            await up.cleanup()
            await hooks.cleanup()

    run(scenario())


async def _wait_instance(self: Acks, command_id: str, instance: str,
                         timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        for ack in self.seen:
            if ack["command_id"] == command_id and ack["instance"] == instance:
                return ack
        if time.monotonic() > deadline:
            raise AssertionError(f"no ack from {instance} for {command_id}; seen {self.seen}")
        await self.poll(0.2)


Acks.wait_instance = _wait_instance  # type: ignore[attr-defined]


def test_forged_tampered_expired_replayed_and_other_service(
    topics: Settings, keys_dir: Path, signer: Signer
) -> None:
    async def scenario() -> None:
        up, up_url = await start_app(upstream_app("checkout"))
        sidecar = await start_sidecar(topics, keys_dir, up_url)
        stop_all = {"rate_per_s": 0.0, "burst": 0}
        try:
            async with aiohttp.ClientSession() as http, Acks(topics) as acks:
                forged = Signer(Ed25519PrivateKey.generate(), "k1").command(
                    "throttle", params=stop_all)
                unknown = Signer(Ed25519PrivateKey.generate(), "rogue").command(
                    "throttle", params=stop_all)
                tampered = signer.command("throttle", params={"rate_per_s": 100.0})
                tampered["params"] = stop_all
                expired = signer.command("throttle", params=stop_all,
                                         issued_at=time.time() - 120, lease_s=60)
                other = signer.command("throttle", params=stop_all, service="payments")
                mismatched = signer.command("throttle", params=stop_all)
                await publish(topics, forged, unknown, tampered, expired)
                await publish(topics, other, key="payments")
                await publish(topics, mismatched, key="payments")
                producer = AIOKafkaProducer(**topics.aiokafka_kwargs())
                await producer.start()
                await producer.send_and_wait(topics.topic("commands"), b"{not json",
                                             key=SERVICE.encode())
                await producer.stop()
                assert (await acks.wait(forged["id"]))["reason"] == "bad signature"
                assert (await acks.wait(forged["id"]))["status"] == "rejected"
                assert "unknown kid" in (await acks.wait(unknown["id"], "rejected"))["reason"]
                assert (await acks.wait(tampered["id"], "rejected"))["reason"] == "bad signature"
                await acks.wait(expired["id"], "expired")
                mism = await acks.wait(mismatched["id"], "rejected")
                assert "message key" in mism["reason"]
                await acks.wait("", "rejected")  # the non-JSON message
                # a genuine, harmless command, then its replay
                genuine = signer.command("throttle", params={"rate_per_s": 1000.0})
                await publish(topics, genuine)
                await acks.wait(genuine["id"], "applied")
                await publish(topics, genuine)
                await eventually(lambda: _has(acks, genuine["id"], "rejected"))
                assert acks.for_id(genuine["id"])[-1]["reason"] == "replayed"
                # nothing of the above stopped traffic
                assert [await status_of(http, f"{sidecar.ingress_url}/orders/1")
                        for _ in range(5)] == [200] * 5
                await acks.poll(0.5)
                assert acks.for_id(other["id"]) == []  # not ours: no ack at all
                assert sidecar.commands.counts["ignored"] == 1
        finally:
            await sidecar.stop()
            await up.cleanup()

    run(scenario())


async def _has(acks: Acks, command_id: str, status: str) -> bool:
    await acks.poll(0.1)
    return any(a["status"] == status for a in acks.for_id(command_id))


def test_lease_expiry_lifts_throttle(topics: Settings, keys_dir: Path, signer: Signer) -> None:
    async def scenario() -> None:
        up, up_url = await start_app(upstream_app("checkout"))
        sidecar = await start_sidecar(topics, keys_dir, up_url)
        try:
            async with aiohttp.ClientSession() as http, Acks(topics) as acks:
                throttle = signer.command("throttle", params={"rate_per_s": 0.0, "burst": 1},
                                          lease_s=3.0)
                await publish(topics, throttle)
                await acks.wait(throttle["id"], "applied")
                codes = [await status_of(http, f"{sidecar.ingress_url}/x") for _ in range(3)]
                assert codes == [200, 429, 429]
                ack = await acks.wait(throttle["id"], "expired", timeout=10)
                assert ack["at"] >= throttle["expires_at"]
                assert [await status_of(http, f"{sidecar.ingress_url}/x")
                        for _ in range(3)] == [200] * 3
                assert sidecar.status()["active"] == []
        finally:
            await sidecar.stop()
            await up.cleanup()

    run(scenario())


def test_restart_resumes_live_throttle_and_does_not_rerun_rollback(
    topics: Settings, keys_dir: Path, signer: Signer, tmp_path: Path
) -> None:
    out = tmp_path / "rollbacks.txt"
    hook = f"echo \"$STANCH_COMMAND_ID\" >> {out}"

    async def scenario() -> None:
        up, up_url = await start_app(upstream_app("checkout"))
        first = await start_sidecar(topics, keys_dir, up_url, instance="pod-1",
                                    rollback_command=hook)
        throttle = signer.command("throttle", params={"rate_per_s": 0.0, "burst": 1})
        old = signer.command("throttle", params={"rate_per_s": 0.0, "burst": 1,
                                                 "route": "/search"}, lease_s=2)
        rollback = signer.command("rollback", target="v41")
        async with Acks(topics) as acks:
            await publish(topics, throttle, old, rollback)
            await acks.wait(throttle["id"], "applied")
            await acks.wait(rollback["id"], "applied")
            await acks.wait(old["id"], "expired", timeout=10)
        await first.stop()
        assert out.read_text().split() == [rollback["id"]]
        n_acks = len(acks.seen)

        second = await start_sidecar(topics, keys_dir, up_url, instance="pod-1",
                                     rollback_command=hook)
        try:
            async with aiohttp.ClientSession() as http, Acks(topics) as acks2:
                codes = [await status_of(http, f"{second.ingress_url}/orders/1")
                         for _ in range(3)]
                assert codes == [200, 429, 429]  # the live throttle is back
                assert await status_of(http, f"{second.ingress_url}/search") == 429
                assert [e.command_id for e in second.table.active()] == [throttle["id"]]
                assert rollback["id"] in second.table.rollbacks_done
                # a replay published after the restart is still refused
                await publish(topics, rollback)
                await eventually(lambda: _count(acks2, rollback["id"], n=2))
                assert acks2.for_id(rollback["id"])[-1]["reason"] == "replayed"
                await acks2.poll(0.5)
                # no duplicate acks from the recovery itself
                assert len(acks2.seen) == n_acks + 1
            assert out.read_text().split() == [rollback["id"]]  # never ran twice
        finally:
            await second.stop()
            await up.cleanup()

    run(scenario())


async def _count(acks: Acks, command_id: str, n: int) -> bool:
    await acks.poll(0.1)
    return len(acks.for_id(command_id)) >= n


def test_traffic_flows_with_the_broker_down(tmp_path: Path, keys_dir: Path) -> None:
    settings = Settings(kafka_bootstrap=f"127.0.0.1:{free_port()}", topic_prefix="down.")

    async def scenario() -> None:
        up, up_url = await start_app(upstream_app("checkout"))
        options = SidecarOptions(
            service=SERVICE, upstream=up_url, listen="127.0.0.1:0", admin_port=0,
            trusted_keys_dir=keys_dir, telemetry_buffer=20,
        )
        sidecar = Sidecar(settings, options)
        await sidecar.start()
        try:
            async with aiohttp.ClientSession() as http:
                started = time.perf_counter()
                codes = [await status_of(http, f"{sidecar.ingress_url}/orders/{i}")
                         for i in range(50)]
                elapsed = time.perf_counter() - started
                assert codes == [200] * 50
                assert elapsed < 5  # never waits for Kafka
                async with http.get(f"{sidecar.admin_url}/_stanch/status") as r:
                    status = await r.json()
                assert status["kafka_connected"] is False
                assert status["telemetry"]["dropped"] == 30
                assert status["telemetry"]["buffered"] == 20
                async with http.get(f"{sidecar.admin_url}/_stanch/metrics") as r:
                    metrics = await r.text()
                assert "stanch_sidecar_telemetry_dropped_total" in metrics
                line = next(x for x in metrics.splitlines()
                            if x.startswith("stanch_sidecar_telemetry_dropped_total"))
                assert line.endswith(" 30.0")
                async with http.get(f"{sidecar.admin_url}/_stanch/health") as r:
                    assert (await r.json())["status"] == "ok"
        finally:
            await sidecar.stop()
            await up.cleanup()

    run(scenario())



def bulk_app() -> web.Application:
    """An upstream that echoes any body back (as one buffer) and serves a large download
    streamed in pieces with no Content-Length (chunked)."""
    payload = bytes(range(256)) * (5 * 1024 * 1024 // 256 + 1)

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(body=body, headers={"X-Received": str(len(body))})

    async def download(request: web.Request) -> web.StreamResponse:
        size = int(request.query["size"])
        response = web.StreamResponse()
        await response.prepare(request)
        for offset in range(0, size, 100_000):
            await response.write(payload[offset:min(size, offset + 100_000)])
        await response.write_eof()
        return response

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/echo", echo)
    app.router.add_get("/download", download)
    return app


def test_large_bodies_pass_both_ways_ingress_and_egress(topics: Settings,
                                                        keys_dir: Path) -> None:
    five_mb = 5 * 1024 * 1024
    upload = bytes((i * 7 + 3) % 251 for i in range(five_mb))
    expected_download = (bytes(range(256)) * (five_mb // 256 + 1))[:five_mb]

    async def chunks(data: bytes) -> Any:  # no Content-Length: a chunked upload
        for offset in range(0, len(data), 300_000):
            yield data[offset:offset + 300_000]

    async def scenario() -> None:
        up, up_url = await start_app(bulk_app())
        dep, dep_url = await start_app(bulk_app())
        sidecar = await start_sidecar(topics, keys_dir, up_url, dependencies={"store": dep_url})
        try:
            async with aiohttp.ClientSession() as http:
                for base in (sidecar.ingress_url, sidecar.egress_url("store")):
                    async with http.post(f"{base}/echo", data=upload) as r:
                        assert r.status == 200, await r.text()
                        assert r.headers["X-Received"] == str(five_mb)
                        assert await r.read() == upload
                    async with http.post(f"{base}/echo", data=chunks(upload)) as r:
                        assert r.status == 200
                        assert await r.read() == upload
                    async with http.get(f"{base}/download?size={five_mb}") as r:
                        assert r.status == 200
                        assert await r.read() == expected_download
                    async with http.post(f"{base}/echo", data=b"small") as r:
                        assert await r.read() == b"small"  # the whole-buffer path still works
            events = await read_request_events(topics, want=8)
            assert sorted(e["status"] for e in events) == [200] * 8
            assert sum(1 for e in events if e.get("dependency") == "store") == 4
        finally:
            await sidecar.stop()
            await up.cleanup()
            await dep.cleanup()

    run(scenario())
