"""The daemon: one APScheduler job per enabled source, the HTTP server, graceful shutdown.

Jobs never overlap themselves (`max_instances=1`), missed runs collapse into one
(`coalesce`), every source runs once at start-up, and a jitter keeps sources with
equal intervals from firing together. A source whose runs fail backs off: its next
run is pushed to `interval * 2**failures` (capped by `daemon.max_backoff`) and comes
back to its interval after a run that is not `failed`.

SIGTERM/SIGINT stop scheduling and ask running syncs to stop between scopes (the
engine's stop event); an apply in progress always finishes its transaction. After
`daemon.shutdown_grace` (or a second signal) what is left is cancelled and the exit
status is 1. SIGHUP does not reload the config (see README, "Signals").
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog
from apscheduler.events import EVENT_JOB_MAX_INSTANCES, JobSubmissionEvent
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from syncd import __version__
from syncd.config import Config
from syncd.engine import Engine, RunOutcome
from syncd.metrics import Metrics
from syncd.mirror import Database
from syncd.settings import SourceSettings

log = structlog.get_logger(__name__)

EXIT_OK, EXIT_FORCED = 0, 1
CANCEL_WAIT = 5.0
"""Seconds cancelled syncs get to unwind (an apply finishing its transaction) before
they are abandoned: a driver call stuck on a database lock cannot be interrupted."""


@dataclass
class SourceState:
    """What the daemon knows about one source beyond the runs table."""

    settings: SourceSettings
    consecutive_failures: int = 0
    running: bool = False
    last_outcome: RunOutcome | None = None
    backoff_until: datetime | None = None


def backoff_delay(interval: float, failures: int, cap: float) -> float:
    """Seconds before the next run after `failures` failed runs in a row (0: none)."""
    if failures <= 0:
        return 0.0
    return float(min(interval * 2 ** min(failures, 32), max(cap, interval)))


class Daemon:
    """Schedules every enabled source and serves health, readiness, status and metrics."""

    def __init__(self, config: Config, db: Database) -> None:
        self.config = config
        self.db = db
        self.stop = asyncio.Event()
        self.engine = Engine(db, stop=self.stop)
        self.metrics = Metrics()
        self.scheduler = AsyncIOScheduler(timezone=UTC)
        self.started_at = datetime.now(UTC)
        self.sources = {s.name: SourceState(settings=s) for s in config.sources if s.enabled}
        self._in_flight: set[asyncio.Task[object]] = set()
        self._force = asyncio.Event()
        self.abandoned = 0
        """Syncs still stuck after cancellation; the process must exit without them."""
        for name in self.sources:
            self.metrics.register_source(name)
        # A run still going when the next is due is skipped by design (max_instances=1):
        # say so as a syncd event instead of APScheduler's warning.
        logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
        self.scheduler.add_listener(self._skipped, EVENT_JOB_MAX_INSTANCES)

    def _skipped(self, event: JobSubmissionEvent) -> None:
        log.info("sync.skipped", source=event.job_id, reason="the previous sync is still running")

    @property
    def alive(self) -> bool:
        """The scheduler runs and the daemon is not shutting down."""
        return bool(self.scheduler.running) and not self.stop.is_set()

    def next_run_at(self, name: str) -> datetime | None:
        """When the source's job fires next (None when not scheduled)."""
        job = self.scheduler.get_job(name)
        moment = getattr(job, "next_run_time", None) if job is not None else None
        return moment if isinstance(moment, datetime) else None

    async def run_source(self, name: str) -> None:
        """The job of one source: one sync, then bookkeeping, metrics and back-off."""
        if self.stop.is_set():
            return
        state = self.sources[name]
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        state.running = True
        try:
            outcome = await self.engine.sync(state.settings)
        finally:
            state.running = False
            self._in_flight.discard(task)
        state.last_outcome = outcome
        self._after_run(state, outcome)

    def _after_run(self, state: SourceState, outcome: RunOutcome) -> None:
        name, interval = state.settings.name, state.settings.interval
        if outcome.status == "failed" and not outcome.stopped:
            state.consecutive_failures += 1
            delay = backoff_delay(
                interval, state.consecutive_failures, self.config.daemon.max_backoff
            )
            state.backoff_until = datetime.now(UTC) + timedelta(seconds=delay)
            if not self.stop.is_set() and self.scheduler.get_job(name) is not None:
                self.scheduler.modify_job(name, next_run_time=state.backoff_until)
            log.warning(
                "source.backoff",
                source=name,
                consecutive_failures=state.consecutive_failures,
                retry_in_s=round(delay, 3),
                interval_s=interval,
                error=outcome.error,
            )
        elif outcome.status != "failed":
            if state.consecutive_failures:
                log.info(
                    "source.recovered",
                    source=name,
                    after_failures=state.consecutive_failures,
                    status=outcome.status,
                )
            state.consecutive_failures = 0
            state.backoff_until = None
        self.metrics.observe(outcome, consecutive_failures=state.consecutive_failures)

    def _schedule(self) -> None:
        now = datetime.now(UTC)
        for name, state in self.sources.items():
            interval = state.settings.interval
            self.scheduler.add_job(
                self.run_source,
                "interval",
                args=[name],
                id=name,
                name=name,
                seconds=interval,
                jitter=min(interval * 0.1, 30),
                max_instances=1,
                coalesce=True,
                next_run_time=now,
                misfire_grace_time=None,
            )

    def _on_stop_signal(self, signum: int) -> None:
        if self.stop.is_set():
            log.warning("daemon.forced", signal=signal.Signals(signum).name)
            self._force.set()
            return
        log.info("daemon.stopping", signal=signal.Signals(signum).name)
        self.stop.set()

    async def run(self) -> int:
        """Serve and schedule until SIGTERM/SIGINT; return the exit status."""
        from syncd.server import start_server

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_stop_signal, signum)
        loop.add_signal_handler(
            signal.SIGHUP,
            lambda: log.warning(
                "daemon.reload_unsupported", hint="restart syncd to apply config changes"
            ),
        )
        server = None
        try:
            if self.config.server.enabled:
                server = await start_server(self, self.config.server.host, self.config.server.port)
            self._schedule()
            self.scheduler.start()
            log.info(
                "daemon.started",
                version=__version__,
                database=self.db.display_url,
                server=server.url if server else None,
                shutdown_grace_s=self.config.daemon.shutdown_grace,
                sources=[
                    {
                        "name": s.settings.name,
                        "type": s.settings.type,
                        "interval_s": s.settings.interval,
                    }
                    for s in self.sources.values()
                ],
            )
            await self.stop.wait()
            return await self._shutdown()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
            if server is not None:
                await server.close()

    async def _shutdown(self) -> int:
        """Stop scheduling; let in-flight syncs end between scopes; cancel after the grace."""
        # Pause, not shut down: APScheduler's shutdown cancels running jobs outright.
        if self.scheduler.running:
            self.scheduler.pause()
        exit_code = EXIT_OK
        pending = set(self._in_flight)
        if pending:
            drained = asyncio.ensure_future(asyncio.wait(pending))
            forced = asyncio.ensure_future(self._force.wait())
            try:
                await asyncio.wait(
                    {drained, forced},
                    timeout=self.config.daemon.shutdown_grace,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                drained.cancel()
                forced.cancel()
            pending = {t for t in pending if not t.done()}
            if pending:
                # Cancelling waits for an apply in progress to commit (engine._uncancellable).
                for task in pending:
                    task.cancel()
                _, stuck = await asyncio.wait(pending, timeout=CANCEL_WAIT)
                self.abandoned = len(stuck)
                exit_code = EXIT_FORCED
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        log.info(
            "daemon.stopped",
            exit_code=exit_code,
            cancelled=len(pending),
            abandoned=self.abandoned,
        )
        return exit_code


async def run_daemon(config: Config, db: Database) -> int:
    """`syncd run` after the config is loaded and the database migrated."""
    daemon = Daemon(config, db)
    code = await daemon.run()
    if daemon.abandoned:
        # A sync stuck inside the database driver (e.g. waiting on a lock) would hold the
        # process past its grace. Uncommitted work is rolled back by the database itself.
        sys.stdout.flush()
        os._exit(code)
    return code
