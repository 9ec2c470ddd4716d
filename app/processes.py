"""Run Stanch processes (``stanch worker`` ...) as children with collected output.

Used by ``stanch demo`` and by the integration tests, so both start the worker the same way.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from app.settings import Settings


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment for a child process with the same settings as ``settings``."""
    env = dict(os.environ)
    for key in list(env):
        if key.startswith("STANCH_"):
            del env[key]
    values = settings.model_dump(exclude_none=True)
    for name, value in values.items():
        env[f"STANCH_{name.upper()}"] = str(value)
    env.update(extra)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ProcessRunner:
    """A child process whose output is collected line by line (and can be waited on)."""

    def __init__(self, args: list[str], env: Mapping[str, str], log_path: Path) -> None:
        self.args = args
        self.log_path = log_path
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        self._log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115
        self.proc = subprocess.Popen(
            args,
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            self._log.write(line)
            self._log.flush()
            self._queue.put(line)

    def wait_for(self, text: str, timeout: float = 60.0) -> float:
        """Wait until a line containing ``text`` appears; returns seconds waited."""
        start = time.monotonic()
        if any(text in line for line in self.lines):
            return 0.0
        while time.monotonic() - start < timeout:
            try:
                line = self._queue.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None and self._queue.empty():
                    break
                continue
            if text in line:
                return time.monotonic() - start
        tail = "".join(self.lines[-40:])
        raise TimeoutError(f"{text!r} not seen within {timeout} s from {self.args}:\n{tail}")

    def kill(self) -> None:
        """SIGKILL: the crash a test wants to survive."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reader.join(timeout=5)
        self._log.close()
        return self.proc.returncode
