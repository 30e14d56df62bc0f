"""Migrations: an empty database upgraded to head matches the models (SQLite and PostgreSQL).

Why: the models are the schema's single definition; a migration that drifts from them
would give users a different mirror than the tests exercise (STYLE.md §11).
"""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from syncd.mirror import Database
from syncd.mirror.database import head_revision
from syncd.mirror.models import Base


async def test_upgrade_matches_models(db: Database) -> None:
    async with db.read() as conn:
        diff = await conn.run_sync(
            lambda sync: compare_metadata(
                MigrationContext.configure(sync, opts={"compare_type": True}), Base.metadata
            )
        )
        tables = await conn.run_sync(lambda sync: set(inspect(sync).get_table_names()))
    assert diff == []
    assert {"features", "changes", "cursors", "runs", "alembic_version"} <= tables
    assert await db.current() == head_revision()


async def test_upgrade_is_idempotent(db: Database) -> None:
    await db.upgrade()
    await db.upgrade()
    assert await db.current() == head_revision()


async def test_sqlite_runs_in_wal_mode(sqlite_db: Database) -> None:
    async with sqlite_db.read() as conn:
        mode = (await conn.execute(text("PRAGMA journal_mode"))).scalar()
        timeout = (await conn.execute(text("PRAGMA busy_timeout"))).scalar()
    assert mode == "wal"
    assert timeout == 30000
