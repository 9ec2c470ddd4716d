"""The topic registry: every Stanch topic with its partitions and retention, created idempotently.

Topics that record history keep it for as long as people need it (incident timelines
for the post-mortem, changes to correlate with); topics whose key names a piece of
state (ground-truth labels by label id) are compacted. Faust creates and compacts the
changelog topics of its own tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from app.settings import TOPIC_NAMES, Settings

log = logging.getLogger(__name__)

_HOUR_MS = 3_600_000


@dataclass(frozen=True)
class TopicSpec:
    """How one logical topic is created."""

    name: str
    retention_hours: float | None = None  # None = the settings' default
    compacted: bool = False
    partitions: int | None = None  # None = settings.partitions; 1 = totally ordered


TOPIC_SPECS: dict[str, TopicSpec] = {
    "requests": TopicSpec("requests"),
    "errors": TopicSpec("errors"),
    "changes": TopicSpec("changes", retention_hours=24 * 30),
    "windows": TopicSpec("windows"),
    "anomalies": TopicSpec("anomalies", retention_hours=24 * 30),
    "incidents": TopicSpec("incidents", retention_hours=24 * 90),
    "commands": TopicSpec("commands", retention_hours=24 * 30),
    "acks": TopicSpec("acks", retention_hours=24 * 30),
    # Operator actions must be seen in order by the one mitigation decision-maker.
    "control": TopicSpec("control", retention_hours=24 * 90, partitions=1),
    "deadletter": TopicSpec("deadletter", retention_hours=24 * 7),
    "labels": TopicSpec("labels", compacted=True),
    # Sidecar liveness (key "service|instance"): each sidecar counts the live instances
    # of its service to take its share of a fleet-wide throttle (app/sidecar/fleet.py).
    # Only the last few seconds matter: compacted, one hour kept; one partition, since
    # every sidecar reads all of it anyway.
    "heartbeats": TopicSpec("heartbeats", retention_hours=1, compacted=True, partitions=1),
}
assert set(TOPIC_SPECS) == set(TOPIC_NAMES)


def new_topics(settings: Settings) -> list[NewTopic]:
    topics = []
    for spec in TOPIC_SPECS.values():
        hours = spec.retention_hours or settings.retention_hours
        config = {"retention.ms": str(int(hours * _HOUR_MS))}
        if spec.compacted:
            config["cleanup.policy"] = "compact"
        topics.append(
            NewTopic(
                name=settings.topic(spec.name),
                num_partitions=spec.partitions or settings.partitions,
                replication_factor=settings.replication_factor,
                topic_configs=config,
            )
        )
    return topics


async def ensure_topics(settings: Settings, timeout_s: float = 30.0) -> list[str]:
    """Create every missing Stanch topic; returns the names created. Safe to call again."""
    admin = AIOKafkaAdminClient(**settings.aiokafka_kwargs(), request_timeout_ms=10_000)
    deadline = asyncio.get_running_loop().time() + timeout_s
    client_log = logging.getLogger("aiokafka")
    level = client_log.level
    try:
        while True:
            try:
                await admin.start()
                break
            except KafkaError as exc:
                if asyncio.get_running_loop().time() > deadline:
                    raise RuntimeError(
                        f"cannot reach Kafka at {settings.bootstrap}: {exc}"
                    ) from exc
                if client_log.level != logging.CRITICAL:
                    log.warning("waiting for Kafka at %s ...", settings.bootstrap)
                    client_log.setLevel(logging.CRITICAL)  # one line, not one per retry
                await asyncio.sleep(0.5)
    finally:
        client_log.setLevel(level)
    try:
        existing = set(await admin.list_topics())
        wanted = [t for t in new_topics(settings) if t.name not in existing]
        created = []
        for topic in wanted:
            try:
                await admin.create_topics([topic])
                created.append(topic.name)
            except TopicAlreadyExistsError:
                pass
        if created:
            log.info("created topics: %s", ", ".join(created))
        return created
    finally:
        await admin.close()


async def missing_topics(settings: Settings, topics: list[str],
                         timeout_s: float = 10.0) -> list[str]:
    """Which of the (full) topic names do not exist; raises :class:`RuntimeError` with a
    one-line reason when Kafka cannot be reached. For commands that only read (replay,
    incidents): they say what is missing instead of failing inside a consumer."""
    client_log = logging.getLogger("aiokafka")
    level = client_log.level
    client_log.setLevel(logging.CRITICAL)  # the one-line reason below says it all
    admin = AIOKafkaAdminClient(**settings.aiokafka_kwargs(), request_timeout_ms=10_000)
    try:
        try:
            await asyncio.wait_for(admin.start(), timeout_s)
            existing = set(await asyncio.wait_for(admin.list_topics(), timeout_s))
        except (TimeoutError, KafkaError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
            raise RuntimeError(f"cannot reach Kafka at {settings.bootstrap}: {reason}") from None
        finally:
            with contextlib.suppress(Exception):
                await admin.close()
    finally:
        client_log.setLevel(level)
    return [t for t in topics if t not in existing]


async def describe_partitions(settings: Settings) -> dict[str, int]:
    """Partition count of each existing Stanch topic (for status pages and tests)."""
    admin = AIOKafkaAdminClient(**settings.aiokafka_kwargs())
    await admin.start()
    try:
        names = [settings.topic(n) for n in TOPIC_NAMES]
        result = {}
        for desc in await admin.describe_topics(names):
            if desc.get("error_code", 0) == 0 and desc.get("partitions"):
                result[desc["topic"]] = len(desc["partitions"])
        return result
    finally:
        await admin.close()
