"""The Faust application: one object that owns the Kafka wiring of every agent.

``create_app(settings)`` builds a fresh app (tests build one per topic prefix) and
registers all agents on it. ``StanchApp`` differs from ``faust.App`` in its consumer,
always by subclassing the driver's classes rather than patching Faust at import time:

* the fetch wait: Faust's aiokafka driver hard-codes ``fetch_max_wait_ms=1500``, and the
  embedded broker answers a waiting fetch only when that wait ends, so each hop of the
  pipeline would cost 1.5 s. It comes from ``STANCH_FETCH_MAX_WAIT_MS`` instead;
* the hand-over of each message to the streams, which costs Faust four tasks per message
  (``_Consumer._drain_messages``; one event per message: ~8.5k -> ~16k events/s);
* a seek back that really re-reads (``_Consumer.rewind``, used by the aggregation agent);
* the seek to the committed offsets that ends a rebalance (``_Consumer.perform_seek``):
  Faust's can lose the records fetched while it runs (see there).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Generator
from typing import Any, ClassVar, cast

import faust
from faust.transport import consumer as faust_consumer
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


class _Resumed:
    """The rest of a coroutine that was started by hand (``coro.send(None)``) and
    suspended on ``first``: awaiting this delegates to it exactly like ``yield from``
    (PEP 380), so it can finish inside a task."""

    __slots__ = ("coro", "first")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self.coro = coro
        self.first = first

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, yielded = self.coro, self.first
        while True:
            try:
                sent = yield yielded
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # a cancel (or throw) goes on into the coroutine
                try:
                    yielded = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
                continue
            try:
                yielded = coro.send(sent)
            except StopIteration as stop:
                return stop.value


async def _finish(coro: Coroutine[Any, Any, Any], first: Any) -> Any:
    return await _Resumed(coro, first)


class _Consumer(faust_aiokafka.Consumer):
    """Faust's consumer with a per-message fast path and a seek back that really
    re-reads (``rewind``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: tp -> [offset to re-read from, highest offset dropped meanwhile]
        self._rewinds: dict[Any, list[int]] = {}
        #: tp -> the committed offset the last ``perform_seek`` put it at, until its first
        #: record after that seek has been checked
        self._sought: dict[Any, int] = {}

    async def perform_seek(self) -> None:
        """Seek every partition to its committed offset, with the flow stopped, and
        check afterwards that each partition really resumes there.

        Why: when a worker with tables starts (or is rebalanced), Faust's recovery resumes
        the flow to read the changelogs, then resumes the stream partitions and only then
        seeks them to their committed offsets, and finally clears the streams' queues
        (``flow_control.resume``) on the promise that the seek makes everything in them
        come again. But the flow is running while the seek is under way (in the consumer
        thread): records fetched meanwhile are handed to the streams, the fetch position
        moves past them, and the queue clearing then drops them for good. A killed and
        restarted worker lost ~20 window messages this way in about one start of three
        (the crash-safety test of the incident agents). So the flow stays stopped from
        here until the caller's ``resume_flow`` (both of Faust's callers resume it right
        after clearing the queues), and the first record of each partition after the
        seek must be the committed one: one that lies past it means records were skipped,
        and the partition is rewound to the committed offset (once; a real gap, such as
        a record removed by retention, re-reads to the same place and is accepted).
        """
        self.stop_flow()
        await super().perform_seek()
        self._sought = {tp: offset for tp, offset in self._read_offset.items()
                        if offset is not None}

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

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - copied
        """Faust's fetch loop (``faust.transport.consumer.Consumer._drain_messages``,
        0.15.x) with one change: how each message is handed to the streams.

        Faust awaits ``wait_first(callback(message), suspend_flow.wait())`` for every
        message, i.e. four tasks, an ``asyncio.wait`` and three loop turns per message:
        about 75 % of the worker's time when every message carries one event. Here the
        callback is first run by hand up to its first suspension; almost always it
        finishes there (the stream's queue has room and the lock is free), at the cost
        of a function call. Only when it really has to wait, or while the flow is
        suspended (a rebalance), does it go through ``wait_first`` as in Faust, so a
        rebalance still interrupts a put into a full stream queue.
        """
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        suspended = self.suspend_flow.is_set
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        flag_consumer_fetching = faust_consumer.CONSUMER_FETCHING
        set_flag = self.diag.set_flag
        unset_flag = self.diag.unset_flag
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for
        yield_every = 100
        num_since_yield = 0
        sleep = asyncio.sleep
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(flag_consumer_fetching)
                ait = getmany(timeout=1.0)
                await self.sleep(0)
                if not self.should_stop:
                    async for tp, message in ait:
                        num_since_yield += 1
                        if num_since_yield > yield_every:
                            await sleep(0)
                            num_since_yield = 0
                        offset = message.offset
                        r_offset = get_read_offset(tp)
                        if r_offset is None or offset >= r_offset:
                            gap = offset - (r_offset or 0)
                            if gap > 1 and r_offset and acks_enabled_for(message.topic):
                                await self._add_gap(tp, r_offset + 1, offset)
                            if commit_every is not None and self._n_acked >= commit_every:
                                self._n_acked = 0
                                await self.commit()
                            coro = cast(Coroutine[Any, Any, Any], callback(message))
                            if suspended():
                                await self.wait_first(coro, self.suspend_flow.wait())
                            else:
                                try:
                                    first = coro.send(None)
                                except StopIteration:
                                    pass  # delivered without waiting: the common case
                                else:
                                    await self.wait_first(_finish(coro, first),
                                                          self.suspend_flow.wait())
                            set_read_offset(tp, offset)
                        else:
                            self.log.dev("DROPPED MESSAGE ROFF %r: k=%r v=%r", offset,
                                         message.key, message.value)
                    unset_flag(flag_consumer_fetching)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            unset_flag(flag_consumer_fetching)

    async def getmany(self, timeout: float) -> Any:
        rewinds = self._rewinds
        sought = self._sought
        async for tp, message in super().getmany(timeout):
            if sought:
                committed = sought.pop(tp, None)
                if committed is not None and message.offset > committed:
                    self.log.warning("%s resumed at offset %d, past its committed offset "
                                     "%d: re-reading from there", tp, message.offset,
                                     committed)
                    await self.rewind(tp, committed)  # drops this record (below)
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
