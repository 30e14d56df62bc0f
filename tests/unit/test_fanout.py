"""fan_out: every scope ends as exactly one item, whatever its fetch raises.

Why: a worker that died on an unexpected exception used to leave the pass waiting
forever for its result (a hung `syncd sync`, a source the daemon never ran again).
"""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from syncd.errors import AuthError, UpstreamError
from syncd.records import ScopeFailed, Snapshot
from syncd.sources.fanout import fan_out


async def fetch(item: str) -> Snapshot | None:
    if item == "recursion":
        raise RecursionError("maximum recursion depth exceeded")
    if item == "upstream":
        raise UpstreamError("HTTP 502")
    if item == "nothing":
        return None
    return Snapshot(scope=item)


async def collect(items: list[str], **kwargs: object) -> list[Snapshot | ScopeFailed]:
    return [
        item
        async for item in fan_out(items, fetch, scope_of=lambda i: i, **kwargs)  # type: ignore[arg-type]
    ]


async def test_every_failure_becomes_its_scope_failure() -> None:
    with capture_logs() as logs:
        results = await asyncio.wait_for(
            collect(["a", "recursion", "upstream", "nothing", "b"], concurrency=2), timeout=5
        )
    ok = sorted(r.scope for r in results if isinstance(r, Snapshot))
    failed = {r.scope: type(r.error) for r in results if isinstance(r, ScopeFailed)}
    assert ok == ["a", "b"]
    assert failed == {"recursion": RecursionError, "upstream": UpstreamError}
    # Only the bug-shaped failure is logged with a traceback.
    internal = [e for e in logs if e["event"] == "scope.internal_error"]
    assert [e["scope"] for e in internal] == ["recursion"]


async def test_fatal_errors_end_the_pass_and_cancel_the_rest() -> None:
    started: list[str] = []
    never = asyncio.Event()

    async def slow_or_fatal(item: str) -> Snapshot:
        started.append(item)
        if item == "bad-key":
            raise AuthError("HTTP 401")
        await never.wait()
        return Snapshot(scope=item)

    with pytest.raises(AuthError):
        async for _ in fan_out(
            ["bad-key", "x", "y"], slow_or_fatal, scope_of=lambda i: i, fatal=(AuthError,)
        ):
            pass
    assert sorted(started) == ["bad-key", "x", "y"]


async def test_concurrency_is_bounded() -> None:
    running = 0
    peak = 0

    async def counted(item: str) -> Snapshot:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0)  # yield, so every admitted fetch is running at once
        running -= 1
        return Snapshot(scope=item)

    results = [r async for r in fan_out(list("abcdefg"), counted, scope_of=str, concurrency=3)]
    assert len(results) == 7
    assert peak == 3
