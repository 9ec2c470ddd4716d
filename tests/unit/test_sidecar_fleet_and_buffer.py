"""The sidecar's instance count (heartbeats) and its telemetry buffer, without Kafka."""

from __future__ import annotations

import asyncio
import time

import orjson

from app.settings import Settings
from app.sidecar.fleet import STALE_PERIODS, FleetMembership
from app.sidecar.telemetry import TelemetryPublisher
from models.enforcement import EnforcementTable


def _fleet() -> FleetMembership:
    return FleetMembership(Settings(), "checkout", "pod-1", EnforcementTable(), interval_s=2.0)


def _beat(service: str, instance: str, at: float | None = None) -> tuple[bytes, bytes]:
    value = {"service": service, "instance": instance, "at": time.time() if at is None else at}
    return f"{service}|{instance}".encode(), orjson.dumps(value)


def test_counts_itself_and_fresh_peers_of_its_own_service_only() -> None:
    fleet = _fleet()
    assert fleet.live_instances() == 1  # alone: the whole cap
    for key, value in (_beat("checkout", "pod-2"), _beat("checkout", "pod-3"),
                       _beat("payments", "pod-9"), _beat("checkout", "pod-1")):
        fleet._heard(key, value, backlog=False)
    assert fleet.live_instances() == 3  # pod-1 (itself), pod-2, pod-3
    fleet._recount()
    assert fleet.table.instances == 3
    fleet._heard(b"checkout|pod-2", None, backlog=False)  # tombstone: pod-2 left
    fleet._recount()
    assert fleet.table.instances == 2


def test_a_silent_peer_goes_stale_and_old_backlog_beats_are_ignored() -> None:
    fleet = _fleet()
    fleet._heard(*_beat("checkout", "pod-2"), backlog=False)
    now = time.monotonic()
    assert fleet.live_instances(now + 2.0 * STALE_PERIODS - 0.1) == 2
    assert fleet.live_instances(now + 2.0 * STALE_PERIODS + 0.1) == 1
    fleet._heard(*_beat("checkout", "pod-7", at=time.time() - 3600), backlog=True)
    fleet._heard(*_beat("checkout", "pod-8"), backlog=True)
    fleet._heard(*_beat("checkout", "pod-5", at=time.time() - 5.0), backlog=True)
    soon = time.monotonic() + 1.5  # a 5 s old beat read back has ~1 s of life left
    assert "pod-5" in fleet.peers
    assert fleet.live_instances(soon) == 3  # itself, pod-2 and pod-8; pod-5 is stale
    fleet._heard(b"checkout|pod-9", b"not json", backlog=False)
    fleet._heard(None, b"{}", backlog=False)
    assert set(fleet.peers) == {"pod-2", "pod-5", "pod-8"}


def test_a_failed_batch_returns_in_order_and_only_overflow_is_dropped() -> None:
    async def scenario() -> None:
        pub = TelemetryPublisher(Settings(), "checkout", max_buffer=10, batch_size=4)
        for i in range(8):
            pub.record({"i": i})
        batch = pub._take_batch()  # what _flush_all hands to Kafka
        pub._in_flight += len(batch)
        pub._in_flight_batches += 1
        for i in range(8, 12):  # in flight still counts against the bound
            pub.record({"i": i})
        assert (pub.buffered, pub.dropped) == (10, 2)
        pub._failed(batch, RuntimeError("broker down"))
        assert [e["i"] for e in pub._buffer] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
        assert (pub.buffered, pub.dropped, pub.retried) == (10, 2, 4)

    asyncio.run(scenario())
