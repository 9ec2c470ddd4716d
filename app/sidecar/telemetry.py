"""Batched, bounded, never-blocking publisher of request events to stanch.requests.

Why this shape: the proxy must never wait for Kafka. ``record()`` is a synchronous
append to a bounded deque (O(1), no await); a background task drains it every
``flush_interval_s`` into JSON arrays of at most ``batch_size`` events, one Kafka
message per array (DESIGN.md allows a batch per message; per-message cost downstream is
tens of microseconds, per-event cost inside a batch about one). When Kafka is slow or
down the buffer fills and further events are dropped and counted — the request itself
is never delayed or failed by telemetry.

A batch Kafka did not take (broker down, restarted, topic missing for a while) goes back
to the front of the buffer and is sent again once the broker answers: an outage costs
events only beyond the bound. The bound counts the events in the buffer and those in
flight (at most ``MAX_IN_FLIGHT`` batches), so a returning batch always has its place.
Delivery is at least once: a batch whose acknowledgement was lost is sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from app.settings import Settings

log = logging.getLogger(__name__)

#: Batches handed to the Kafka client and not yet acknowledged. 8 x 300 events keeps a
#: healthy broker busy (a batch takes ~1 ms to publish), while during an outage at most
#: this much leaves the bounded buffer before the first failure brings it back.
MAX_IN_FLIGHT = 8
#: Pause after a batch failed before the next attempt: the broker is down or restarting,
#: and aiokafka already waited ``send_timeout_s`` for it; retrying sooner only logs more.
RETRY_PAUSE_S = 1.0


class TelemetryPublisher:
    """Bounded buffer + background batch publisher (one per sidecar process)."""

    def __init__(
        self,
        settings: Settings,
        service: str,
        *,
        max_buffer: int = 50_000,
        batch_size: int = 300,
        flush_interval_s: float = 0.15,
        send_timeout_s: float = 5.0,
    ) -> None:
        self._settings = settings
        self._topic = settings.topic("requests")
        self._key = service.encode()
        self._buffer: deque[dict[str, Any]] = deque()
        self._append = self._buffer.append
        self.max_buffer = max_buffer
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.send_timeout_s = send_timeout_s
        self.recorded = 0
        self.dropped = 0  # only beyond the bound: failed batches are kept and retried
        self.published = 0
        self.batches = 0
        self.retried = 0  # events of batches Kafka did not take, put back to send again
        self._in_flight = 0  # events handed to the Kafka client, not yet acknowledged
        self._in_flight_batches = 0
        self._retry_at = 0.0
        self._failing = False
        self.connected = False
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # ------------------------------------------------------------------ hot path
    def record(self, event: dict[str, Any]) -> None:
        """Queue one event; drop (and count) it if the buffer is full. Never blocks."""
        if len(self._buffer) + self._in_flight >= self.max_buffer:
            self.dropped += 1
            return
        self.recorded += 1
        self._append(event)

    @property
    def buffered(self) -> int:
        """Events recorded and not yet delivered (waiting, or in flight)."""
        return len(self._buffer) + self._in_flight

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="telemetry")

    async def stop(self, drain_timeout_s: float = 2.0) -> None:
        """Flush what can be flushed within ``drain_timeout_s``, then stop."""
        self._stopping = True
        if self._task is not None:
            if self.connected:
                with contextlib.suppress(asyncio.TimeoutError, Exception):
                    await asyncio.wait_for(self._drain(), drain_timeout_s)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._producer.stop(), drain_timeout_s)
            self._producer = None

    async def _drain(self) -> None:
        while self.buffered and self._producer is not None:
            await self._flush_all()
            await asyncio.sleep(0.01)

    async def _connect(self) -> None:
        backoff = 0.5
        while not self._stopping:
            producer = AIOKafkaProducer(
                **self._settings.aiokafka_kwargs(),
                linger_ms=5,
                acks=1,
                request_timeout_ms=int(self.send_timeout_s * 1000),
                max_batch_size=1 << 20,
            )
            try:
                await producer.start()
            except Exception as exc:  # broker down: keep serving, retry later
                log.warning("telemetry: Kafka unreachable (%s); retrying in %.1fs", exc, backoff)
                with contextlib.suppress(Exception):
                    await producer.stop()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            self._producer = producer
            self.connected = True
            return

    async def _run(self) -> None:
        await self._connect()
        loop = asyncio.get_running_loop()
        while not self._stopping:
            await asyncio.sleep(self.flush_interval_s)
            if loop.time() >= self._retry_at:
                await self._flush_all()

    async def _flush_all(self) -> None:
        while (
            self._buffer
            and self._producer is not None
            and self._in_flight_batches < MAX_IN_FLIGHT
            and asyncio.get_running_loop().time() >= self._retry_at
        ):
            batch = self._take_batch()
            self._in_flight += len(batch)
            self._in_flight_batches += 1
            try:
                delivery = await asyncio.wait_for(
                    self._producer.send(self._topic, orjson.dumps(batch), key=self._key),
                    self.send_timeout_s,
                )
            except Exception as exc:  # not taken: kept for the next attempt, never raised
                self._failed(batch, exc)
                return
            delivery.add_done_callback(lambda fut, batch=batch: self._delivered(fut, batch))

    def _delivered(self, fut: asyncio.Future[Any], batch: list[dict[str, Any]]) -> None:
        exc = None if fut.cancelled() else fut.exception()
        if fut.cancelled() or exc is not None:
            self._failed(batch, exc)
            return
        self._in_flight -= len(batch)
        self._in_flight_batches -= 1
        self.published += len(batch)
        self.batches += 1
        if self._failing:
            self._failing = False
            log.info("telemetry: Kafka takes batches again (%d events buffered)", self.buffered)

    def _failed(self, batch: list[dict[str, Any]], exc: BaseException | None) -> None:
        """Put a batch Kafka did not take back in front of the buffer (oldest first)."""
        self._in_flight -= len(batch)
        self._in_flight_batches -= 1
        self.retried += len(batch)
        self._buffer.extendleft(reversed(batch))
        self._retry_at = asyncio.get_running_loop().time() + RETRY_PAUSE_S
        if not self._failing:  # one line per outage, not one per batch
            self._failing = True
            log.warning(
                "telemetry: Kafka did not take a batch (%s); keeping up to %d events and "
                "retrying", exc or "cancelled", self.max_buffer,
            )

    def _take_batch(self) -> list[dict[str, Any]]:
        buf = self._buffer
        n = min(self.batch_size, len(buf))
        popleft = buf.popleft
        return [popleft() for _ in range(n)]
