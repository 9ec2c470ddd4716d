"""Shared fixtures: one real broker per session, a unique topic prefix per test."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.settings import Settings
from tests.kafka import kafka_broker

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    with kafka_broker() as (bootstrap, _kind):
        yield bootstrap


@pytest.fixture
def topic_prefix() -> str:
    """A prefix no other test uses, so tests never share topics (or consumer groups)."""
    return f"t{uuid.uuid4().hex[:10]}."


@pytest.fixture
def settings(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> Settings:
    return Settings(
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        app_id=f"stanch-{topic_prefix.rstrip('.')}",
        data_dir=tmp_path / "data",
        partitions=2,
    )


@pytest.fixture
def topics(settings: Settings) -> Settings:
    """``settings`` with every Stanch topic created on the broker."""
    from app.topics import ensure_topics

    asyncio.run(ensure_topics(settings))
    return settings
