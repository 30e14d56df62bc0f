"""Runs left `running` by a process that died are closed `failed` by the next pass.

Why: a `syncd sync` SIGKILLed mid-run cannot close its own run row; without this,
`syncd status` and `/status` would show that source running forever. A pass closes
them only when it can prove no other pass of the source is running: it holds the
source's lock (syncd.mirror.lock: a flock on SQLite, an advisory lock on PostgreSQL).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from sqlalchemy import update
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from syncd.engine import Engine
from syncd.mirror import Database
from syncd.mirror.models import runs
from syncd.mirror.store import INTERRUPTED, source_status, start_run, status_json
from syncd.sandbox.caltopo import Fault, populate
from tests.conftest import Sandbox, run_rows

EARLIER = datetime.now(UTC) - timedelta(hours=1)


async def left_running(db: Database, source: str) -> int:
    """A run row as a process SIGKILLed mid-pass leaves it (its counters had grown)."""
    opened = await start_run(db, source, EARLIER, full=False, close_interrupted=False)
    async with db.write() as conn:
        await conn.execute(update(runs).where(runs.c.id == opened.id).values(inserted=7))
    return opened.id


async def running(db: Database) -> list[int]:
    return [r["id"] for r in await run_rows(db) if r["status"] == "running"]


async def test_run_left_running_is_closed_failed_by_the_next_pass(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    populate(sandbox.caltopo, maps=1, objects_per_map=3, seed=2)
    first, second = await left_running(db, "sar"), await left_running(db, "sar")

    with capture_logs(processors=[merge_contextvars]) as logs:
        outcome = await engine.sync(sandbox.caltopo_settings())

    assert outcome.status == "ok", outcome.error
    by_id = {r["id"]: r for r in await run_rows(db)}
    for run_id in (first, second):
        stale = by_id[run_id]
        assert (stale["status"], stale["error"]) == ("failed", INTERRUPTED)
        assert stale["finished_at"] is not None and stale["finished_at"] > EARLIER
        assert stale["inserted"] == 7  # what it did apply stays on record
    assert by_id[outcome.run_id]["status"] == "ok"
    [event] = [e for e in logs if e["event"] == "run.interrupted"]
    assert event["source"] == "sar" and event["run_ids"] == [first, second]
    assert event["log_level"] == "warning" and event["error"] == INTERRUPTED
    assert "run_id" not in event  # the new run's id is bound only after it
    # Closed before the new run starts, in the same transaction that opens it.
    events = [e["event"] for e in logs]
    assert events.index("run.interrupted") < events.index("sync.started")
    status = status_json(await source_status(db, "sar"), datetime.now(UTC))
    assert status["status"] == "ok" and status["last_run"]["id"] == outcome.run_id


async def test_another_sources_running_row_is_untouched(
    sandbox: Sandbox, engine: Engine, db: Database
) -> None:
    populate(sandbox.caltopo, maps=1, objects_per_map=3, seed=2)
    theirs = await left_running(db, "twin")

    with capture_logs() as logs:
        outcome = await engine.sync(sandbox.caltopo_settings())

    assert outcome.status == "ok", outcome.error
    [row] = [r for r in await run_rows(db) if r["id"] == theirs]
    assert (row["status"], row["finished_at"], row["error"]) == ("running", None, None)
    assert not [e for e in logs if e["event"] == "run.interrupted"]


async def test_a_pass_still_going_is_never_closed(sandbox: Sandbox, db: Database) -> None:
    """The proof: a second pass of the source waits for the first instead of closing
    its row (on PostgreSQL too, where the lock is an advisory lock)."""
    populate(sandbox.caltopo, maps=1, objects_per_map=3, seed=2)
    settings = sandbox.caltopo_settings()
    sandbox.caltopo.add_fault(Fault("/acct/", kind="hang", delay=0.6))  # inside the timeout

    with capture_logs(processors=[merge_contextvars]) as logs:
        first = asyncio.ensure_future(Engine(db).sync(settings))
        async with asyncio.timeout(5):  # until the first pass has opened its run
            while not await running(db):  # noqa: ASYNC110 - another task writes it
                await asyncio.sleep(0.01)
        second = await Engine(db).sync(settings)
        outcomes = [await first, second]

    assert [o.status for o in outcomes] == ["ok", "ok"], [o.error for o in outcomes]
    assert [r["status"] for r in await run_rows(db)] == ["ok", "ok"]
    assert not [e for e in logs if e["event"] == "run.interrupted"]
    assert [e["source"] for e in logs if e["event"] == "sync.waiting"] == ["sar"]
