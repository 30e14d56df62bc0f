"""The daemon loop: one APScheduler job per enabled source, stopped by SIGTERM/SIGINT.

Jobs never overlap themselves (`max_instances=1`), missed runs collapse into one
(`coalesce`), every source runs once at start-up, and a jitter keeps sources with
equal intervals from firing together.
"""

from __future__ import annotations

import asyncio
import signal
from datetime import UTC, datetime

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from syncd.config import Config
from syncd.engine import Engine
from syncd.mirror import Database
from syncd.settings import SourceSettings

log = structlog.get_logger(__name__)

SHUTDOWN_GRACE = 20.0


async def run_daemon(config: Config, db: Database, *, grace: float = SHUTDOWN_GRACE) -> int:
    """Schedule every enabled source until a stop signal; return the exit status."""
    engine = Engine(db)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    in_flight: set[asyncio.Task[object]] = set()

    async def run_source(settings: SourceSettings) -> None:
        task = asyncio.current_task()
        assert task is not None
        in_flight.add(task)
        try:
            await engine.sync(settings)
        finally:
            in_flight.discard(task)

    scheduler = AsyncIOScheduler(timezone=UTC)
    sources = [s for s in config.sources if s.enabled]
    for settings in sources:
        scheduler.add_job(
            run_source,
            "interval",
            args=[settings],
            id=settings.name,
            seconds=settings.interval,
            jitter=min(settings.interval * 0.1, 30),
            max_instances=1,
            coalesce=True,
            next_run_time=datetime.now(UTC),
            misfire_grace_time=None,
        )
    scheduler.start()
    log.info(
        "daemon.started",
        sources=[{"name": s.name, "type": s.type, "interval_s": s.interval} for s in sources],
    )
    await stop.wait()
    scheduler.shutdown(wait=False)
    exit_code = 0
    if in_flight:
        # Let in-flight syncs finish their current transaction; cancel after the grace.
        _, pending = await asyncio.wait(list(in_flight), timeout=grace)
        if pending:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            exit_code = 1
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(signum)
    log.info("daemon.stopped", exit_code=exit_code)
    return exit_code
