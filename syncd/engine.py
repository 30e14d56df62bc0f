"""One sync of one source: open a run, fetch scope by scope, apply each, close the run.

A failing scope is logged and skipped (the run ends `partial`); a failing source
ends its own run `failed` and never touches another source (ARCHITECTURE.md §1 rule 6).
Exactly one canonical line closes each run: `sync.finished` or `sync.failed`. A run
whose process died cannot close itself; the next pass of its source, holding the
source's lock (syncd.mirror.lock), closes it `failed` (`run.interrupted`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import structlog

from syncd.errors import SourceError, StorageError, SyncdError
from syncd.http import HttpClient, RetryPolicy
from syncd.mirror import Database, DeleteGuard, Mirror
from syncd.mirror.apply import ApplyResult, RowCounts
from syncd.mirror.lock import source_lock
from syncd.mirror.store import INTERRUPTED, finish_run, load_cursors, start_run
from syncd.records import ScopeFailed, Snapshot
from syncd.settings import SourceSettings
from syncd.sources import SOURCE_TYPES

log = structlog.get_logger(__name__)


@dataclass
class RunOutcome(RowCounts):
    """How one sync of one source ended."""

    source: str = ""
    status: str = "running"
    run_id: int | None = None
    held: int = 0
    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    """HTTP answers by status code (0: no answer), from the run's HttpClient."""
    retries: int = 0
    ratelimit_waits: int = 0
    stopped: bool = False
    """The run ended early because the daemon is shutting down."""
    duration_ms: int = 0
    failed_scopes: list[str] = field(default_factory=list)
    error: str | None = None

    def counts(self) -> dict[str, int]:
        """The counters of the canonical `sync.finished` / `sync.failed` line."""
        counts = self.row_counts()
        del counts["skipped"]
        return {**counts, "held": self.held, "requests": self.requests}


class Engine:
    """Runs syncs against one mirror database."""

    def __init__(
        self,
        db: Database,
        *,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
        clock: Callable[[], datetime] | None = None,
        stop: asyncio.Event | None = None,
    ) -> None:
        self.db = db
        self.mirror = Mirror(db, clock=clock)
        self._clock = clock or (lambda: datetime.now(UTC))
        self._session_factory = session_factory
        self.stop = stop or asyncio.Event()
        """Set on shutdown: runs stop between scopes, never inside an apply."""

    async def sync(
        self, settings: SourceSettings, *, full: bool = False, allow_mass_delete: bool = False
    ) -> RunOutcome:
        """One pass over every scope of the source; never raises for a source's failure.

        Passes of one source never overlap on a mirror: a second process waits
        (syncd.mirror.lock), so nothing is fetched or applied twice.
        """
        try:
            async with source_lock(self.db, settings.name) as exclusive:
                return await self._sync(
                    settings, full=full, allow_mass_delete=allow_mass_delete, exclusive=exclusive
                )
        except StorageError as err:  # the lock could not be taken: no run was opened
            outcome = RunOutcome(source=settings.name, status="failed", error=err.message)
            structlog.contextvars.bind_contextvars(source=settings.name)
            await self._close(outcome, time.monotonic())
            structlog.contextvars.unbind_contextvars("source")
            return outcome

    async def _sync(
        self, settings: SourceSettings, *, full: bool, allow_mass_delete: bool, exclusive: bool
    ) -> RunOutcome:
        outcome = RunOutcome(source=settings.name)
        started = time.monotonic()
        structlog.contextvars.bind_contextvars(source=settings.name)
        try:
            await self._start(outcome, full, exclusive)
            structlog.contextvars.bind_contextvars(run_id=outcome.run_id)
            log.info("sync.started", full=full)
            await self._pass(settings, outcome, full=full, allow=allow_mass_delete)
            outcome.status = (
                "partial" if outcome.failed_scopes or outcome.held or outcome.stopped else "ok"
            )
            if outcome.stopped:
                outcome.error = "stopped by shutdown before every scope was synced"
            elif outcome.failed_scopes:
                outcome.error = f"{len(outcome.failed_scopes)} scope(s) failed: " + ", ".join(
                    outcome.failed_scopes[:5]
                )
        except SyncdError as err:
            outcome.status, outcome.error = "failed", err.message
        except asyncio.CancelledError:
            outcome.status, outcome.error = "failed", "cancelled (shutdown)"
            await self._finish(outcome, started)
            raise
        except Exception as err:  # a bug: keep the traceback, keep the other sources going
            outcome.status, outcome.error = "failed", f"internal error: {type(err).__name__}: {err}"
            log.exception("sync.internal_error")
        await self._finish(outcome, started)
        structlog.contextvars.unbind_contextvars("source", "run_id")
        return outcome

    async def _finish(self, outcome: RunOutcome, started: float) -> None:
        """Close the run row even if cancelled meanwhile: a run must never stay `running`."""
        closing = asyncio.ensure_future(self._close(outcome, started))
        try:
            await asyncio.shield(closing)
        except asyncio.CancelledError:
            await closing  # finish the bookkeeping, then let the cancellation through
            raise

    async def _start(self, outcome: RunOutcome, full: bool, exclusive: bool) -> None:
        """Open the run row; if cancelled meanwhile, still learn its id so it gets closed.

        `exclusive`: this pass holds the source's lock, so rows of the source still
        `running` were left by a process that died mid-run; they are closed with it.
        """
        opening = asyncio.ensure_future(
            start_run(
                self.db, outcome.source, self._clock(), full=full, close_interrupted=exclusive
            )
        )
        try:
            opened = await asyncio.shield(opening)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                outcome.run_id = (await opening).id
            raise
        outcome.run_id = opened.id
        if opened.interrupted:
            log.warning("run.interrupted", run_ids=opened.interrupted, error=INTERRUPTED)

    async def _pass(
        self, settings: SourceSettings, outcome: RunOutcome, *, full: bool, allow: bool
    ) -> None:
        kind = SOURCE_TYPES[settings.type]
        guard = DeleteGuard(
            max_fraction=settings.max_delete_fraction,
            min_rows=settings.mass_delete_min_rows,
            allow=allow or settings.allow_mass_delete,
        )
        http = client_for(
            settings, session=self._session_factory() if self._session_factory else None
        )
        try:
            async with http:
                source = kind.create(settings, http)
                cursors = await load_cursors(self.db, settings.name)
                async for item in _until_stopped(source.snapshots(cursors, full=full), self.stop):
                    if item is None:
                        outcome.stopped = True
                        log.info("sync.stopping", reason="shutdown")
                        break
                    if isinstance(item, ScopeFailed):
                        _scope_failed(outcome, item.scope, item.error)
                        continue
                    try:
                        result = await _uncancellable(
                            self.mirror.apply(
                                settings.name, item, guard=guard, run_id=outcome.run_id
                            )
                        )
                    except SourceError as err:
                        # A streamed answer that broke while being applied: rolled back
                        # whole, so the scope failed like any fetch (rule 6).
                        _scope_failed(outcome, item.scope, err)
                        continue
                    if result.held is not None:
                        outcome.held += result.held.would_delete
                        log.warning(
                            "sync.deletions_held",
                            scope=result.held.scope,
                            would_delete=result.held.would_delete,
                            live=result.held.live,
                            max_delete_fraction=guard.max_fraction,
                            hint=f"syncd sync --source {settings.name} --allow-mass-delete",
                        )
                        continue
                    outcome.add(result)
                    log.debug("scope.applied", scope=item.scope, **result.row_counts())
        finally:
            outcome.requests = http.requests
            outcome.statuses = Counter(http.statuses)
            outcome.retries = http.retries
            outcome.ratelimit_waits = http.ratelimit_waits

    async def _close(self, outcome: RunOutcome, started: float) -> None:
        outcome.duration_ms = round((time.monotonic() - started) * 1000)
        if outcome.run_id is not None:
            try:
                await finish_run(
                    self.db,
                    outcome.run_id,
                    self._clock(),
                    status=outcome.status,
                    requests=outcome.requests,
                    held=outcome.held,
                    error=outcome.error,
                )
            except StorageError as err:
                outcome.status = "failed"
                outcome.error = outcome.error or err.message
        fields: dict[str, Any] = {
            "status": outcome.status,
            "duration_ms": outcome.duration_ms,
            **outcome.counts(),
        }
        if outcome.failed_scopes:
            fields["failed_scopes"] = len(outcome.failed_scopes)
        if outcome.status == "failed":
            log.error("sync.failed", error=outcome.error, **fields)
        else:
            log.info("sync.finished", **fields)


def client_for(
    settings: SourceSettings,
    *,
    max_retries: int | None = None,
    session: aiohttp.ClientSession | None = None,
) -> HttpClient:
    """The HTTP client a source's settings call for (auth, limits, retries, timeout)."""
    kind = SOURCE_TYPES[settings.type]
    retries = settings.max_retries if max_retries is None else max_retries
    return HttpClient(
        source=settings.name,
        timeout=settings.timeout,
        retry=RetryPolicy(max_retries=retries, base_delay=settings.retry_backoff),
        auth=kind.auth(settings),
        limiter=kind.limiter(settings),
        concurrency=settings.concurrency,
        session=session,
    )


async def _until_stopped(
    items: AsyncIterator[Snapshot | ScopeFailed], stop: asyncio.Event
) -> AsyncIterator[Snapshot | ScopeFailed | None]:
    """The source's items until `stop` is set, then one None; a hung fetch does not delay it.

    The pending fetch is cancelled and the source's generator closed, which cancels its
    own in-flight requests; nothing of an unapplied scope has been written.
    """
    waiter = asyncio.ensure_future(stop.wait())
    fetch: asyncio.Future[Snapshot | ScopeFailed] | None = None
    try:
        while True:
            if stop.is_set():
                yield None
                return
            fetch = asyncio.ensure_future(anext(items))
            await asyncio.wait({fetch, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if not fetch.done():
                fetch.cancel()
                await asyncio.gather(fetch, return_exceptions=True)
                yield None
                return
            try:
                item = fetch.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        # Also on cancellation: a generator can only be closed once no fetch runs in it.
        pending = [f for f in (waiter, fetch) if f is not None and not f.done()]
        for future in pending:
            future.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()


async def _uncancellable(apply: Coroutine[Any, Any, ApplyResult]) -> ApplyResult:
    """Run one Mirror.apply to its commit even if the run is cancelled meanwhile.

    A cancellation (the shutdown grace ran out) waits for the transaction to end, then
    propagates: the scope is either fully committed or not at all, never half-written.
    """
    task = asyncio.ensure_future(apply)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.gather(task, return_exceptions=True)
        raise


def _scope_failed(outcome: RunOutcome, scope: str, error: Exception) -> None:
    outcome.failed_scopes.append(scope)
    log.warning("scope.failed", scope=scope, error=_describe(error))


def _describe(error: Exception) -> str:
    if isinstance(error, SyncdError):
        return error.message
    return f"{type(error).__name__}: {error}"
