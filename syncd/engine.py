"""One sync of one source: open a run, fetch scope by scope, apply each, close the run.

A failing scope is logged and skipped (the run ends `partial`); a failing source
ends its own run `failed` and never touches another source (ARCHITECTURE.md §1 rule 6).
Exactly one canonical line closes each run: `sync.finished` or `sync.failed`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import structlog

from syncd.errors import StorageError, SyncdError
from syncd.http import HttpClient, RetryPolicy
from syncd.mirror import ApplyResult, Database, DeleteGuard, Mirror
from syncd.mirror.lock import source_lock
from syncd.mirror.store import finish_run, load_cursors, start_run
from syncd.records import ScopeFailed
from syncd.settings import SourceSettings
from syncd.sources import SOURCE_TYPES

log = structlog.get_logger(__name__)


@dataclass
class RunOutcome:
    """How one sync of one source ended."""

    source: str
    status: str = "running"
    run_id: int | None = None
    inserted: int = 0
    updated: int = 0
    restored: int = 0
    unchanged: int = 0
    deleted: int = 0
    held: int = 0
    skipped: int = 0
    requests: int = 0
    duration_ms: int = 0
    failed_scopes: list[str] = field(default_factory=list)
    error: str | None = None

    def add(self, result: ApplyResult) -> None:
        self.inserted += result.inserted
        self.updated += result.updated
        self.restored += result.restored
        self.unchanged += result.unchanged
        self.deleted += result.deleted
        self.skipped += result.skipped

    def counts(self) -> dict[str, int]:
        return {
            "inserted": self.inserted,
            "updated": self.updated,
            "restored": self.restored,
            "unchanged": self.unchanged,
            "deleted": self.deleted,
            "held": self.held,
            "requests": self.requests,
        }


class Engine:
    """Runs syncs against one mirror database."""

    def __init__(
        self,
        db: Database,
        *,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.db = db
        self.mirror = Mirror(db, clock=clock)
        self._clock = clock or (lambda: datetime.now(UTC))
        self._session_factory = session_factory

    async def sync(
        self, settings: SourceSettings, *, full: bool = False, allow_mass_delete: bool = False
    ) -> RunOutcome:
        """One pass over every scope of the source; never raises for a source's failure.

        Passes of one source never overlap on a SQLite file: a second process waits
        (syncd.mirror.lock), so nothing is fetched or applied twice.
        """
        async with source_lock(self.db, settings.name):
            return await self._sync(settings, full=full, allow_mass_delete=allow_mass_delete)

    async def _sync(
        self, settings: SourceSettings, *, full: bool, allow_mass_delete: bool
    ) -> RunOutcome:
        outcome = RunOutcome(source=settings.name)
        started = time.monotonic()
        structlog.contextvars.bind_contextvars(source=settings.name)
        try:
            outcome.run_id = await start_run(self.db, settings.name, self._clock(), full=full)
            structlog.contextvars.bind_contextvars(run_id=outcome.run_id)
            log.info("sync.started", full=full)
            await self._pass(settings, outcome, full=full, allow=allow_mass_delete)
            outcome.status = "partial" if outcome.failed_scopes or outcome.held else "ok"
            if outcome.failed_scopes:
                outcome.error = f"{len(outcome.failed_scopes)} scope(s) failed: " + ", ".join(
                    outcome.failed_scopes[:5]
                )
        except SyncdError as err:
            outcome.status, outcome.error = "failed", err.message
        except asyncio.CancelledError:
            outcome.status, outcome.error = "failed", "cancelled (shutdown)"
            await asyncio.shield(self._close(outcome, started))
            raise
        except Exception as err:  # a bug: keep the traceback, keep the other sources going
            outcome.status, outcome.error = "failed", f"internal error: {type(err).__name__}: {err}"
            log.exception("sync.internal_error")
        await self._close(outcome, started)
        structlog.contextvars.unbind_contextvars("source", "run_id")
        return outcome

    async def _pass(
        self, settings: SourceSettings, outcome: RunOutcome, *, full: bool, allow: bool
    ) -> None:
        kind = SOURCE_TYPES[settings.type]
        guard = DeleteGuard(
            max_fraction=settings.max_delete_fraction,
            min_rows=settings.mass_delete_min_rows,
            allow=allow or settings.allow_mass_delete,
        )
        http = HttpClient(
            source=settings.name,
            timeout=settings.timeout,
            retry=RetryPolicy(max_retries=settings.max_retries, base_delay=settings.retry_backoff),
            auth=kind.auth(settings),
            limiter=kind.limiter(settings),
            concurrency=settings.concurrency,
            session=self._session_factory() if self._session_factory else None,
        )
        try:
            async with http:
                source = kind.create(settings, http)
                cursors = await load_cursors(self.db, settings.name)
                async for item in source.snapshots(cursors, full=full):
                    if isinstance(item, ScopeFailed):
                        outcome.failed_scopes.append(item.scope)
                        log.warning("scope.failed", scope=item.scope, error=_describe(item.error))
                        continue
                    result = await self.mirror.apply(
                        settings.name, item, guard=guard, run_id=outcome.run_id
                    )
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
                    log.debug("scope.applied", scope=item.scope, **_result_counts(result))
        finally:
            outcome.requests = http.requests

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


def _describe(error: Exception) -> str:
    if isinstance(error, SyncdError):
        return error.message
    return f"{type(error).__name__}: {error}"


def _result_counts(result: ApplyResult) -> dict[str, int]:
    return {
        "inserted": result.inserted,
        "updated": result.updated,
        "restored": result.restored,
        "unchanged": result.unchanged,
        "deleted": result.deleted,
    }
