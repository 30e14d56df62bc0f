"""Run bookkeeping, cursor reads and the status report, on the mirror's own tables."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select, update

from syncd.mirror.database import Database
from syncd.mirror.models import cursors, features, runs


async def load_cursors(db: Database, source: str) -> dict[str, str]:
    """Every scope's stored cursor for a source."""
    async with db.read() as conn:
        rows = await conn.execute(
            select(cursors.c.scope, cursors.c.cursor).where(cursors.c.source == source)
        )
        return {scope: cursor for scope, cursor in rows}


INTERRUPTED = "interrupted: the process ended before the run finished"
"""The error of a run closed by a later pass because its own process died mid-run."""


@dataclass(frozen=True)
class OpenedRun:
    """A new `running` row, and the rows left `running` that were closed with it."""

    id: int
    interrupted: list[int]


async def start_run(
    db: Database, source: str, now: datetime, *, full: bool, close_interrupted: bool
) -> OpenedRun:
    """Open a `running` row; its counters grow in each snapshot's own transaction.

    With `close_interrupted` (the caller holds the source's pass lock, so no other pass
    of it runs: syncd.mirror.lock), the source's rows still `running` were left by a
    process that ended mid-run; they are closed `failed` in the same transaction.
    """
    async with db.write() as conn:
        interrupted: list[int] = []
        if close_interrupted:
            closed = await conn.execute(
                update(runs)
                .where(runs.c.source == source, runs.c.status == "running")
                .values(status="failed", finished_at=now, error=INTERRUPTED)
                .returning(runs.c.id)
            )
            interrupted = sorted(int(i) for i in closed.scalars())
        result = await conn.execute(
            insert(runs)
            .values(
                source=source,
                started_at=now,
                status="running",
                full=full,
                requests=0,
                inserted=0,
                updated=0,
                unchanged=0,
                deleted=0,
                restored=0,
                held=0,
            )
            .returning(runs.c.id)
        )
        return OpenedRun(int(result.scalar_one()), interrupted)


async def finish_run(
    db: Database,
    run_id: int,
    now: datetime,
    *,
    status: str,
    requests: int,
    held: int,
    error: str | None,
) -> dict[str, Any]:
    """Close the run row and return it as a dict."""
    async with db.write() as conn:
        await conn.execute(
            update(runs)
            .where(runs.c.id == run_id)
            .values(finished_at=now, status=status, requests=requests, held=held, error=error)
        )
        row = (await conn.execute(select(runs).where(runs.c.id == run_id))).mappings().one()
        return dict(row)


@dataclass(frozen=True)
class SourceStatus:
    """What `syncd status` shows for one source."""

    source: str
    last_run: dict[str, Any] | None
    last_success_at: datetime | None
    last_error: str | None
    scopes: int
    oldest_cursor_at: datetime | None
    newest_cursor_at: datetime | None
    live: int
    deleted: int


async def source_status(db: Database, source: str) -> SourceStatus:
    """Last run, cursor ages, last error and row counts of one source."""
    r, c, f = runs.c, cursors.c, features.c
    async with db.read() as conn:
        last = (
            (
                await conn.execute(
                    select(runs).where(r.source == source).order_by(r.id.desc()).limit(1)
                )
            )
            .mappings()
            .first()
        )
        last_ok = (
            await conn.execute(
                select(func.max(r.finished_at)).where(r.source == source, r.status == "ok")
            )
        ).scalar()
        last_error = (
            await conn.execute(
                select(r.error)
                .where(r.source == source, r.error.is_not(None))
                .order_by(r.id.desc())
                .limit(1)
            )
        ).scalar()
        scopes, oldest, newest = (
            await conn.execute(
                select(func.count(), func.min(c.updated_at), func.max(c.updated_at)).where(
                    c.source == source
                )
            )
        ).one()
        live, deleted = (
            await conn.execute(
                select(
                    func.count(f.id).filter(f.deleted_at.is_(None)),
                    func.count(f.id).filter(f.deleted_at.is_not(None)),
                ).where(f.source == source)
            )
        ).one()
    # Aggregates bypass the UTC column type; re-read them through it.
    to_utc = cursors.c.updated_at.type.process_result_value  # type: ignore[attr-defined]
    return SourceStatus(
        source=source,
        last_run=dict(last) if last else None,
        last_success_at=to_utc(last_ok, db.engine.dialect),
        last_error=last_error,
        scopes=scopes,
        oldest_cursor_at=to_utc(oldest, db.engine.dialect),
        newest_cursor_at=to_utc(newest, db.engine.dialect),
        live=live or 0,
        deleted=deleted or 0,
    )


def _age(moment: datetime | None, now: datetime) -> float | None:
    return None if moment is None else round((now - moment).total_seconds(), 1)


def status_json(s: SourceStatus, now: datetime) -> dict[str, Any]:
    """A source's status as JSON-ready values (`syncd status --json`, `/status`)."""
    last = s.last_run
    return {
        "source": s.source,
        "last_run": None
        if last is None
        else {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in last.items()},
        "status": last["status"] if last else None,
        "last_success_at": s.last_success_at.isoformat() if s.last_success_at else None,
        "last_error": s.last_error,
        "scopes": s.scopes,
        "cursor_age_seconds": _age(s.oldest_cursor_at, now),
        "newest_cursor_age_seconds": _age(s.newest_cursor_at, now),
        "live": s.live,
        "deleted": s.deleted,
    }
