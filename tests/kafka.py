"""How the test suite finds a real Kafka broker (never a mock).

Order of choice: ``STANCH_KAFKA_BOOTSTRAP`` if set; else a Kafka container through
testcontainers when a Docker engine answers; else the embedded Tansu broker as a
subprocess on a free port.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from app.broker import EmbeddedBroker, free_port


def docker_available() -> bool:
    """True when a Docker engine answers (not just the client binary being installed)."""
    try:
        import docker  # testcontainers depends on it
    except ImportError:
        return False
    try:
        client = docker.from_env(timeout=3)
        client.ping()
        return True
    except Exception:
        return False


@contextlib.contextmanager
def kafka_broker() -> Iterator[tuple[str, str]]:
    """Yields ``(bootstrap, kind)`` for the session; kind is env, container or embedded."""
    configured = os.environ.get("STANCH_KAFKA_BOOTSTRAP", "").strip()
    if configured:
        yield configured, "env"
        return
    if os.environ.get("STANCH_TEST_NO_DOCKER") != "1" and docker_available():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as container:
            yield container.get_bootstrap_server(), "container"
        return
    with EmbeddedBroker(port=free_port()) as broker:
        yield broker.bootstrap, "embedded"


def start_embedded_broker(port: int | None = None) -> EmbeddedBroker:
    """A dedicated embedded broker a test may stop and restart (broker-outage tests)."""
    return EmbeddedBroker(port=port or free_port()).start()
