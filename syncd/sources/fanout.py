"""Fetch many scopes of one source concurrently and yield each result as it is ready.

Every scope ends as exactly one item: its Snapshot, or a ScopeFailed carrying
whatever went wrong, so one broken scope can never stall or sink the pass
(ARCHITECTURE.md §1 rule 6). Only errors the caller names as fatal end the pass.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import structlog

from syncd.errors import SyncdError
from syncd.records import ScopeFailed, Snapshot

log = structlog.get_logger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class _Fatal:
    error: Exception


async def fan_out(
    items: Sequence[T],
    fetch: Callable[[T], Awaitable[Snapshot | ScopeFailed | None]],
    *,
    scope_of: Callable[[T], str],
    concurrency: int | None = None,
    fatal: tuple[type[Exception], ...] = (),
) -> AsyncIterator[Snapshot | ScopeFailed]:
    """Run `fetch` for every item (at most `concurrency` at once when given).

    A fetch returning None yields nothing. An exception of a `fatal` type is raised
    from the iterator after the other fetches are cancelled; any other exception
    becomes that scope's ScopeFailed (an unexpected one is logged with its traceback,
    since it is a bug rather than an upstream problem).
    """
    queue: asyncio.Queue[Snapshot | ScopeFailed | _Fatal | None] = asyncio.Queue()
    slots = asyncio.Semaphore(concurrency) if concurrency else contextlib.nullcontext()

    async def run(item: T) -> None:
        result: Snapshot | ScopeFailed | _Fatal | None
        try:
            async with slots:
                result = await fetch(item)
        except fatal as err:
            result = _Fatal(err)
        except Exception as err:
            if not isinstance(err, SyncdError):
                log.error("scope.internal_error", scope=scope_of(item), exc_info=True)
            result = ScopeFailed(scope_of(item), err)
        await queue.put(result)

    tasks = [asyncio.create_task(run(item)) for item in items]
    try:
        for _ in tasks:
            result = await queue.get()
            if isinstance(result, _Fatal):
                raise result.error
            if result is not None:
                yield result
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
