"""Batched, bounded, never-blocking publisher of request events to stanch.requests.

Why this shape: the proxy must never wait for Kafka. ``record()`` is a synchronous
append to a bounded deque (O(1), no await); a background task drains it every
``flush_interval_s`` into JSON arrays of at most ``batch_size`` events, one Kafka
message per array (DESIGN.md allows a batch per message; per-message cost downstream is
tens of microseconds, per-event cost inside a batch about one). When Kafka is slow or
down the buffer fills and further events are dropped and counted — the request itself
is never delayed or failed by telemetry.
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
        self.dropped = 0
        self.published = 0
        self.batches = 0
        self.connected = False
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # ------------------------------------------------------------------ hot path
    def record(self, event: dict[str, Any]) -> None:
        """Queue one event; drop (and count) it if the buffer is full. Never blocks."""
        if len(self._buffer) >= self.max_buffer:
            self.dropped += 1
            return
        self.recorded += 1
        self._append(event)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="telemetry")

    async def stop(self, drain_timeout_s: float = 2.0) -> None:
        """Flush what can be flushed within ``drain_timeout_s``, then stop."""
        self._stopping = True
        if self._task is not None:
            if self.connected:
                with contextlib.suppress(asyncio.TimeoutError, Exception):
                    await asyncio.wait_for(self._flush_all(), drain_timeout_s)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._producer.stop(), drain_timeout_s)
            self._producer = None

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
        while not self._stopping:
            await asyncio.sleep(self.flush_interval_s)
            await self._flush_all()

    async def _flush_all(self) -> None:
        while self._buffer and self._producer is not None:
            batch = self._take_batch()
            try:
                delivery = await asyncio.wait_for(
                    self._producer.send(self._topic, orjson.dumps(batch), key=self._key),
                    self.send_timeout_s,
                )
            except Exception as exc:  # a lost batch is counted, never raised
                self._lost(len(batch), exc)
                return
            size = len(batch)
            delivery.add_done_callback(lambda fut, size=size: self._delivered(fut, size))

    def _delivered(self, fut: asyncio.Future[Any], size: int) -> None:
        exc = None if fut.cancelled() else fut.exception()
        if fut.cancelled() or exc is not None:
            self._lost(size, exc)
            return
        self.published += size
        self.batches += 1

    def _lost(self, size: int, exc: BaseException | None) -> None:
        self.dropped += size
        log.warning("telemetry: dropped a batch of %d events (%s)", size, exc)

    def _take_batch(self) -> list[dict[str, Any]]:
        buf = self._buffer
        n = min(self.batch_size, len(buf))
        popleft = buf.popleft
        return [popleft() for _ in range(n)]
