"""The consumer's per-message fast path: a coroutine started by hand and finished in a task.

``app.faust_app._Consumer._drain_messages`` runs Faust's delivery callback up to its first
suspension itself and, only when it suspends, hands the rest to ``_finish`` in a task.
That hand-over must behave exactly like awaiting the coroutine: same result, same
exception, and a cancel reaches the coroutine (a rebalance interrupts a blocked put).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.faust_app import _finish


def _start(coro: Any) -> tuple[bool, Any]:
    """(finished, value or first yielded future): what the drain loop does."""
    try:
        return False, coro.send(None)
    except StopIteration as stop:
        return True, stop.value


def test_a_coroutine_that_never_waits_finishes_without_a_task() -> None:
    async def put_nowait(q: asyncio.Queue[int]) -> str:
        q.put_nowait(1)
        return "delivered"

    async def main() -> None:
        q: asyncio.Queue[int] = asyncio.Queue()
        done, value = _start(put_nowait(q))
        assert (done, value, q.qsize()) == (True, "delivered", 1)

    asyncio.run(main())


def test_a_coroutine_that_waits_is_finished_in_a_task_with_its_result() -> None:
    async def put(q: asyncio.Queue[int], item: int) -> int:
        await q.put(item)  # blocks: the queue is full
        await asyncio.sleep(0)  # a bare yield on the way
        return item * 10

    async def main() -> None:
        q: asyncio.Queue[int] = asyncio.Queue(maxsize=1)
        q.put_nowait(0)
        coro = put(q, 7)
        done, first = _start(coro)
        assert not done and isinstance(first, asyncio.Future)
        task = asyncio.ensure_future(_finish(coro, first))
        await asyncio.sleep(0)
        assert not task.done()
        assert q.get_nowait() == 0  # room: the put can complete
        assert await asyncio.wait_for(task, 1.0) == 70
        assert q.get_nowait() == 7

    asyncio.run(main())


def test_an_exception_after_the_first_wait_propagates() -> None:
    async def fails(fut: asyncio.Future[int]) -> None:
        value = await fut
        raise ValueError(f"bad {value}")

    async def main() -> None:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        coro = fails(fut)
        done, first = _start(coro)
        assert not done and first is fut
        task = asyncio.ensure_future(_finish(coro, first))
        fut.set_result(3)
        with pytest.raises(ValueError, match="bad 3"):
            await task

    asyncio.run(main())


def test_a_failed_future_is_seen_by_the_coroutine_itself() -> None:
    async def handles(fut: asyncio.Future[int]) -> str:
        try:
            await fut
        except KeyError:
            return "handled"
        return "not reached"

    async def main() -> None:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        coro = handles(fut)
        _, first = _start(coro)
        task = asyncio.ensure_future(_finish(coro, first))
        fut.set_exception(KeyError("x"))
        assert await task == "handled"

    asyncio.run(main())


def test_cancelling_the_task_cancels_the_coroutine() -> None:
    seen: list[str] = []

    async def blocked(q: asyncio.Queue[int]) -> None:
        try:
            await q.put(1)
        except asyncio.CancelledError:
            seen.append("cancelled inside")
            raise

    async def main() -> None:
        q: asyncio.Queue[int] = asyncio.Queue(maxsize=1)
        q.put_nowait(0)
        coro = blocked(q)
        _, first = _start(coro)
        task = asyncio.ensure_future(_finish(coro, first))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen == ["cancelled inside"]
        assert q.qsize() == 1  # the blocked put did not happen

    asyncio.run(main())
