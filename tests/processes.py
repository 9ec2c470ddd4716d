"""Run real Stanch processes (``stanch worker`` ...) from integration tests."""

from __future__ import annotations

import sys
from pathlib import Path

from app.broker import free_port
from app.processes import ProcessRunner, settings_env
from app.settings import Settings

__all__ = ["ProcessRunner", "settings_env", "start_worker"]


def start_worker(settings: Settings, log_path: Path, **extra_env: str) -> ProcessRunner:
    """``stanch worker`` with the test's settings; returns once the worker says it is ready."""
    env = settings_env(settings, **{"STANCH_WEB_PORT": str(free_port()), **extra_env})
    runner = ProcessRunner([sys.executable, "-m", "app.cli", "worker"], env, log_path)
    runner.wait_for("Ready", timeout=90)
    return runner
