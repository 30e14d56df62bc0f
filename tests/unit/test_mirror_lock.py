"""The per-source pass lock: exclusive per source, waits once, dies with its holder.

Why: holding it is what lets a pass close runs left `running` by a dead process
(syncd.mirror.lock); a lock that two passes could hold at once, or that outlived a
dead holder, would close a live run or stall a source forever.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
from sqlalchemy import text
from structlog.testing import capture_logs

from syncd.engine import Engine
from syncd.mirror import Database
from syncd.mirror.lock import NAMESPACE, POLL, pg_lock_key, source_lock
from tests.conftest import Sandbox


async def test_a_second_holder_waits_for_the_first(db: Database) -> None:
    order: list[str] = []

    async def second() -> None:
        async with source_lock(db, "poles") as exclusive:
            assert exclusive
            order.append("second holds")

    with capture_logs() as logs:
        async with source_lock(db, "poles") as exclusive:
            waiter = asyncio.ensure_future(second())
            await asyncio.sleep(POLL * 6)
            order.append("first releases")
        await asyncio.wait_for(waiter, 5)

    assert exclusive
    assert order == ["first releases", "second holds"]
    waiting = [e for e in logs if e["event"] == "sync.waiting"]
    assert len(waiting) == 1 and waiting[0]["source"] == "poles"


async def test_other_sources_do_not_wait(db: Database) -> None:
    with capture_logs() as logs:
        async with source_lock(db, "poles"), asyncio.timeout(2), source_lock(db, "sar") as other:
            assert other
    assert not [e for e in logs if e["event"] == "sync.waiting"]


@pytest.mark.parametrize("url", ["sqlite+aiosqlite:///:memory:", "sqlite+aiosqlite://"])
async def test_a_mirror_without_a_lock_proves_nothing(url: str) -> None:
    db = Database(url)
    try:
        async with source_lock(db, "poles") as exclusive:
            assert not exclusive
    finally:
        await db.dispose()


def test_pg_keys_are_signed_32_bit() -> None:
    keys = [pg_lock_key(name) for name in ("poles", "sar", "twin", "x" * 64)]
    assert all(-(2**31) <= k < 2**31 for k in keys)
    assert len(set(keys)) == len(keys)
    assert pg_lock_key("poles") == pg_lock_key("poles")


@pytest.mark.postgres
async def test_pg_lock_is_released_when_its_session_dies(pg_url: str) -> None:
    """A holder whose connection is killed (as a SIGKILLed process's is) frees the source."""
    db = Database(pg_url)
    try:
        held, release = asyncio.Event(), asyncio.Event()

        async def holder() -> None:
            async with source_lock(db, "poles"):
                held.set()
                await release.wait()

        task = asyncio.ensure_future(holder())
        await asyncio.wait_for(held.wait(), 5)
        async with db.read() as conn:
            killed = await conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks"
                    " WHERE locktype = 'advisory' AND classid = :ns AND granted"
                ),
                {"ns": NAMESPACE},
            )
            assert killed.scalars().all() == [True]
        async with asyncio.timeout(5), source_lock(db, "poles") as exclusive:
            assert exclusive
        release.set()
        await asyncio.wait_for(task, 5)  # closing a dead session raises nothing
    finally:
        await db.dispose()


async def test_an_unreachable_postgres_fails_the_pass_without_raising(sandbox: Sandbox) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens once it is closed
    db = Database(f"postgresql+asyncpg://postgres@127.0.0.1:{port}/x")
    try:
        with capture_logs() as logs:
            outcome = await Engine(db).sync(sandbox.caltopo_settings())
    finally:
        await db.dispose()
    assert outcome.status == "failed" and outcome.run_id is None
    assert "database connection failed" in (outcome.error or "")
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["sync.failed"]
    assert sandbox.caltopo.request_log == []
