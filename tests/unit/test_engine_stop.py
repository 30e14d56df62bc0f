"""Shutdown inside a sync: stop between scopes, and never abandon an apply half-way.

Why: SIGTERM must end a long sync quickly (a hung upstream request must not hold the
daemon) while a scope's transaction, once begun, ends as a whole (ARCHITECTURE §1.1).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from syncd.engine import _uncancellable, _until_stopped
from syncd.mirror import ApplyResult
from syncd.records import Snapshot


async def test_stop_interrupts_a_hung_fetch_and_closes_the_source() -> None:
    stop = asyncio.Event()
    hung = asyncio.Event()
    closed = asyncio.Event()

    async def source() -> AsyncIterator[Snapshot]:
        try:
            yield Snapshot(scope="a")
            hung.set()
            await asyncio.Event().wait()  # an upstream that never answers
            yield Snapshot(scope="b")
        finally:
            closed.set()

    seen: list[str | None] = []

    async def consume() -> None:
        async for item in _until_stopped(source(), stop):
            seen.append(None if item is None else item.scope)
            if item is None:
                break

    consumer = asyncio.create_task(consume())
    await hung.wait()
    stop.set()
    await asyncio.wait_for(consumer, 5)
    assert seen == ["a", None]
    await asyncio.wait_for(closed.wait(), 5)


async def test_cancelling_during_an_apply_waits_for_it_to_finish() -> None:
    started, release = asyncio.Event(), asyncio.Event()
    finished: list[bool] = []

    async def apply() -> ApplyResult:
        started.set()
        await release.wait()  # the transaction is in progress
        finished.append(True)
        return ApplyResult(scope="a")

    task = asyncio.create_task(_uncancellable(apply()))
    await started.wait()
    task.cancel()
    await asyncio.sleep(0)  # let the cancellation be delivered (not a wait for work)
    assert not task.done()  # still waiting for the transaction
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished == [True]
