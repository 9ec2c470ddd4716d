"""Runs the configured rollback hook for a rollback command, with a timeout.

Why a hook: the sidecar cannot know how a service is deployed. The operator gives
either a shell command (run with STANCH_TARGET_VERSION, STANCH_COMMAND_ID and
STANCH_SERVICE in its environment) or an HTTP webhook (POSTed the command JSON). The
result becomes the ack: applied, or failed with the error (exit code and stderr tail,
HTTP status, or timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson


@dataclass(frozen=True, slots=True)
class HookResult:
    ok: bool
    detail: str = ""


class RollbackHook:
    """A shell command and/or a webhook; the command runs first when both are given."""

    def __init__(
        self,
        command: str | None = None,
        webhook: str | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self.command = command
        self.webhook = webhook
        self.timeout_s = timeout_s

    @property
    def configured(self) -> bool:
        return bool(self.command or self.webhook)

    async def run(self, command: Mapping[str, Any], service: str) -> HookResult:
        if not self.configured:
            return HookResult(False, "no rollback hook configured")
        if self.command:
            result = await self._run_command(command, service)
            if not result.ok:
                return result
        if self.webhook:
            return await self._post_webhook(command)
        return HookResult(True, "rollback command succeeded")

    async def _run_command(self, command: Mapping[str, Any], service: str) -> HookResult:
        assert self.command is not None
        env = dict(os.environ)
        env.update(
            STANCH_TARGET_VERSION=str(command.get("target", "")),
            STANCH_COMMAND_ID=str(command.get("id", "")),
            STANCH_SERVICE=service,
        )
        try:
            proc = await asyncio.create_subprocess_shell(
                self.command,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # so a timeout can kill the whole process group
            )
        except OSError as exc:
            return HookResult(False, f"rollback command could not start: {exc}")
        try:
            _, stderr = await asyncio.wait_for(proc.communicate(), self.timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            with contextlib.suppress(Exception):
                await proc.wait()
            return HookResult(False, f"rollback command timed out after {self.timeout_s:g}s")
        if proc.returncode != 0:
            tail = (stderr or b"").decode(errors="replace").strip()[-300:]
            return HookResult(
                False, f"rollback command exited {proc.returncode}" + (f": {tail}" if tail else "")
            )
        return HookResult(True, "rollback command succeeded")

    async def _post_webhook(self, command: Mapping[str, Any]) -> HookResult:
        assert self.webhook is not None
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.post(
                    self.webhook,
                    data=orjson.dumps(dict(command)),
                    headers={"Content-Type": "application/json"},
                ) as resp,
            ):
                body = (await resp.text())[:300]
                if resp.status >= 400:
                    return HookResult(False, f"rollback webhook answered {resp.status}: {body}")
                return HookResult(True, f"rollback webhook answered {resp.status}")
        except TimeoutError:
            return HookResult(False, f"rollback webhook timed out after {self.timeout_s:g}s")
        except aiohttp.ClientError as exc:
            return HookResult(False, f"rollback webhook failed: {exc}")
