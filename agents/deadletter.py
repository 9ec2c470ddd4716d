"""Publishing rejected input to the dead-letter topic, with a per-reason counter.

Every agent that refuses input sends it here instead of dropping it: the record keeps the
source topic, partition, offset and key, the reason in words and the raw input (cut to
8 KiB), so an operator can see exactly what was wrong. ``counts`` groups rejections by a
short category (``late``, ``clock skew``, ``schema``, ``not json`` ...) for metrics and
tests; the full reason goes into the record. A null-valued (tombstone) message is refused
with category ``tombstone``: our input topics are not compacted, so a tombstone carries
nothing, but it is still accounted for.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import orjson

from schemas.records import DeadLetter

if TYPE_CHECKING:
    from app.faust_app import StanchApp

log = logging.getLogger(__name__)


def deadletter_counts(app: StanchApp) -> Counter[str]:
    """The process-wide counter of dead letters by category (created on first use)."""
    counts: Counter[str] | None = getattr(app, "stanch_deadletter_counts", None)
    if counts is None:
        counts = Counter()
        app.stanch_deadletter_counts = counts  # type: ignore[attr-defined]
    return counts


class DeadLetters:
    """Dead-letter publisher for one agent."""

    def __init__(self, app: StanchApp, agent: str) -> None:
        self.agent = agent
        self.topic = app.topic(
            app.settings.topic("deadletter"), key_serializer="raw", value_serializer="raw"
        )
        self.counts = deadletter_counts(app)

    async def send(
        self,
        category: str,
        reason: str | BaseException,
        raw: Any,
        *,
        source_topic: str,
        partition: int | None = None,
        offset: int | None = None,
        key: Any = None,
    ) -> Any:
        """Publish one dead letter; never raises for a bad ``raw`` (it is clipped/encoded).

        Returns the send's delivery future (None when nothing was sent): an agent that
        must know the dead letter is on the broker before it records progress (the
        aggregation agent, so that a replay need not write it again) awaits it."""
        self.counts[category] += 1
        try:
            record = DeadLetter.make(
                source_topic=source_topic,
                agent=self.agent,
                reason=reason,
                raw=raw,
                at=time.time(),
                partition=partition,
                offset=offset,
                key=key,
            )
            value = orjson.dumps(record.to_dict())
        except Exception as exc:  # the dead letter itself must never take the agent down
            log.error("cannot build a dead letter for %s (%s): %s", source_topic, reason, exc)
            self.counts["deadletter failed"] += 1
            return None
        return await self.topic.send(key=None, value=value, force=True)
