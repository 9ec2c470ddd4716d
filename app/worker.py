"""``stanch worker``: the Faust worker process that runs every agent."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import socket
import sys
from typing import IO

import faust

from app.faust_app import create_app
from app.settings import Settings
from app.topics import ensure_topics

log = logging.getLogger(__name__)

#: Held open (and locked) for the life of the worker process; the OS drops the lock
#: when the process ends, however it ends (a SIGKILLed worker does not block a restart).
_data_dir_lock: IO[str] | None = None


class HostConflict(RuntimeError):
    """Another worker on this host holds the web port or the data directory."""


def claim_host_resources(settings: Settings) -> None:
    """Fail fast, with the setting to change, when another worker on this host already
    uses this worker's web port or data directory (each worker needs its own of both:
    Faust binds the port, and the data directory holds the generated signing key)."""
    global _data_dir_lock
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Faust's server does
        try:
            sock.bind(("0.0.0.0", settings.web_port))  # Faust's web_bind
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise HostConflict(
                f"web port {settings.web_port} is already in use (another worker on this "
                "host?): give each worker its own STANCH_WEB_PORT and STANCH_DATA_DIR"
            ) from None
    data_dir = settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = open(data_dir / "worker.lock", "a+")  # noqa: SIM115 - held for the process
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise HostConflict(
            f"data directory {str(data_dir)!r} is in use by worker {holder}: give each worker "
            "on a host its own STANCH_DATA_DIR (and STANCH_WEB_PORT)"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    with contextlib.suppress(Exception):
        if _data_dir_lock is not None:
            _data_dir_lock.close()
    _data_dir_lock = handle


def check_policy(settings: Settings) -> None:
    """Validate the mitigation policy before anything connects: a bad policy stops start-up."""
    from models.policy import PolicyError, load_policy

    try:
        load_policy(settings.policy_file)
    except PolicyError as exc:
        print(f"stanch worker: bad policy (STANCH_POLICY_FILE): {exc}", file=sys.stderr)
        sys.exit(2)


def run_worker(settings: Settings, *, loglevel: str = "info") -> None:
    """Check the policy, create the topics, then run until SIGINT/SIGTERM (does not return)."""
    check_policy(settings)
    try:
        claim_host_resources(settings)
    except HostConflict as exc:
        print(f"stanch worker: {exc}", file=sys.stderr)
        sys.exit(1)
    try:
        asyncio.run(ensure_topics(settings))
    except RuntimeError as exc:
        hint = (
            " Start the embedded broker with `stanch broker`, or set STANCH_KAFKA_BOOTSTRAP."
            if settings.embedded
            else ""
        )
        print(f"stanch worker: {exc}.{hint}", file=sys.stderr)
        sys.exit(1)
    app = create_app(settings)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()
