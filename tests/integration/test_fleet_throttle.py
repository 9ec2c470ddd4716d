"""Fleet-wide throttles: three real sidecars of one service share one cap.

Each sidecar learns the live instance count from the others' heartbeats on the real
broker and admits its share, so the service as a whole admits the command's rate.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from app.settings import Settings
from app.sidecar import Sidecar
from tests.integration.test_sidecar import (
    Acks,
    Signer,
    keys_dir,
    publish,
    run,
    signer,
    start_app,
    start_sidecar,
    upstream_app,
)

pytestmark = pytest.mark.integration

__all__ = ["keys_dir", "signer"]  # fixtures re-used from test_sidecar

CAP = 30.0  # req/s for the whole service
OFFERED = 40.0  # req/s per instance: 120 offered in total, four times the cap
MEASURE_S = 10.0


async def _until(check: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.2)


async def _offer(http: aiohttp.ClientSession, sidecar: Sidecar, start: float, end: float,
                 admitted: list[int]) -> None:
    """Offer OFFERED req/s on schedule until ``end``; count 200s started in [start, end)."""
    t0 = time.monotonic()
    i = 0
    while True:
        due = t0 + i / OFFERED
        i += 1
        now = time.monotonic()
        if due > now:
            await asyncio.sleep(due - now)
        began = time.monotonic()
        if began >= end:
            return
        async with http.get(f"{sidecar.ingress_url}/orders/1") as r:
            await r.read()
            assert r.status in (200, 429)
        if r.status == 200 and began >= start:
            admitted.append(1)


def test_three_instances_admit_the_cap_together(topics: Settings, keys_dir: Path,
                                                signer: Signer) -> None:
    async def scenario() -> None:
        up, up_url = await start_app(upstream_app("checkout"))
        sidecars = [await start_sidecar(topics, keys_dir, up_url, instance=f"pod-{i}")
                    for i in range(3)]
        try:
            # every instance learns of the two others from their heartbeats
            await _until(lambda: all(s.table.instances == 3 for s in sidecars), 20)
            throttle = signer.command("throttle", params={"rate_per_s": CAP})
            async with Acks(topics) as acks:
                await publish(topics, throttle)
                for s in sidecars:  # every instance applies the same command
                    ack = await acks.wait_instance(throttle["id"], s.instance)  # type: ignore[attr-defined]
                    assert ack["status"] == "applied"
            for s in sidecars:
                [status] = s.status()["active"]
                assert status["rate_per_s"] == pytest.approx(CAP / 3)
            admitted: list[int] = []
            now = time.monotonic()
            start, end = now + 2.0, now + 2.0 + MEASURE_S  # 2 s: the initial bursts pass
            async with aiohttp.ClientSession() as http:
                await asyncio.gather(*(_offer(http, s, start, end, admitted)
                                       for s in sidecars))
            total = len(admitted) / MEASURE_S
            assert abs(total - CAP) <= 0.10 * CAP, f"{total:.1f} req/s admitted, cap {CAP}"

            # one instance leaves: the two others take back its share within a few beats
            await sidecars[0].stop()
            left = sidecars.pop(0)
            await _until(lambda: all(s.table.instances == 2 for s in sidecars), 15)
            assert all(s.status()["active"][0]["rate_per_s"] == pytest.approx(CAP / 2)
                       for s in sidecars)
            assert left.table.instances == 3  # (stopped: no longer counts anything)
        finally:
            for s in sidecars:
                await s.stop()
            await up.cleanup()

    run(scenario())
