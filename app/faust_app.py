"""The Faust application: one object that owns the Kafka wiring of every agent.

``create_app(settings)`` builds a fresh app (tests build one per topic prefix) and
registers all agents on it. ``StanchApp`` differs from ``faust.App`` in one place: the
consumer's fetch wait. Faust's aiokafka driver hard-codes ``fetch_max_wait_ms=1500``, and
the embedded broker answers a waiting fetch only when that wait ends, so each hop of the
pipeline would cost 1.5 s. We set it from ``STANCH_FETCH_MAX_WAIT_MS`` instead, by
subclassing the driver's consumer thread rather than patching Faust at import time.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TransportT

from app.settings import Settings

log = logging.getLogger(__name__)


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's consumer thread with a configurable fetch wait."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        wait_ms = getattr(self.app.conf, "stanch_fetch_max_wait_ms", None)
        if wait_ms is not None:
            # aiokafka reads this attribute when it builds its Fetcher in start().
            consumer._fetch_max_wait_ms = int(wait_ms)
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    """Faust's consumer with a seek back that really re-reads (``rewind``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: tp -> [offset to re-read from, highest offset dropped meanwhile]
        self._rewinds: dict[Any, list[int]] = {}

    def _new_consumer_thread(self) -> _ConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def rewind(self, tp: Any, offset: int) -> None:
        """Seek ``tp`` back to ``offset`` and drop what was fetched before the seek.

        A plain ``seek`` is not enough: Faust's fetch loop goes on delivering the records
        it had already fetched and sets its read offset to theirs, and then drops the
        re-read records as "already read". So records of ``tp`` are held back here (before
        that loop sees them) until the re-read starts, and the read offset is put back.
        """
        self._rewinds[tp] = [offset, -1]
        await self.seek(tp, offset)

    async def getmany(self, timeout: float) -> Any:
        rewinds = self._rewinds
        async for tp, message in super().getmany(timeout):
            if rewinds:
                r = rewinds.get(tp)
                if r is not None:
                    offset = message.offset
                    if offset != r[0] and offset > r[1]:
                        r[1] = offset  # fetched before the seek
                        continue
                    # the re-read (or, when r[0] is not there, the next record after it)
                    del rewinds[tp]
                    self._read_offset[tp] = offset
            yield tp, message


class _Transport(faust_aiokafka.Transport):
    Consumer: ClassVar[type] = _Consumer


class StanchApp(faust.App):
    """faust.App with Stanch's settings attached and the fetch wait made configurable."""

    settings: Settings

    def _new_transport(self) -> TransportT:
        return _Transport(self.conf.broker_consumer, self)


def faust_config(settings: Settings) -> dict[str, Any]:
    """Faust settings derived from Stanch settings (one place, so tests see the same)."""
    credentials: faust.SASLCredentials | faust.SSLCredentials | None = None
    if settings.sasl_mechanism:
        credentials = faust.SASLCredentials(
            username=settings.sasl_username,
            password=settings.sasl_password,
            mechanism=settings.sasl_mechanism,
            ssl_context=settings.aiokafka_kwargs().get("ssl_context"),
        )
    elif settings.security_protocol == "SSL":
        credentials = faust.SSLCredentials(settings.aiokafka_kwargs()["ssl_context"])
    return {
        "broker": [f"kafka://{hp}" for hp in settings.bootstrap.split(",")],
        "broker_credentials": credentials,
        "store": "memory://",
        "topic_partitions": settings.partitions,
        "topic_replication_factor": settings.replication_factor,
        "datadir": str(settings.data_dir / settings.app_id),
        "web_port": settings.web_port,
        "web_host": "127.0.0.1",
        "broker_session_timeout": settings.session_timeout_s,
        "broker_heartbeat_interval": settings.heartbeat_interval_s,
        "broker_request_timeout": max(40.0, settings.session_timeout_s * 2),
        "broker_commit_interval": settings.commit_interval_s,
        "consumer_auto_offset_reset": "earliest",
        "processing_guarantee": "at_least_once",
        "table_cleanup_interval": 30.0,
        "producer_linger_ms": 5,
        "producer_max_batch_size": 1_048_576,
        "producer_max_request_size": 4_194_304,
        "stream_buffer_maxsize": 16_384,
        # Aggregation holds messages unacked until their window is emitted; a rebalance
        # must not wait for them to drain.
        "stream_wait_empty": False,
        "broker_max_poll_records": 2_000,
        "consumer_max_fetch_size": 4_194_304,
    }


def create_app(settings: Settings, *, register_agents: bool = True) -> StanchApp:
    """A configured app with every agent registered (``register_agents=False`` for tools)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = StanchApp(settings.app_id, **faust_config(settings))
    app.settings = settings
    app.conf.stanch_fetch_max_wait_ms = settings.fetch_max_wait_ms  # type: ignore[attr-defined]
    if register_agents:
        from agents import register_all
        from app import web

        register_all(app)
        web.register(app)
    return app
