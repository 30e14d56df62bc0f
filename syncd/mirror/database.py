"""Opening the mirror database and keeping its schema at head (SQLite or PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import structlog
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from syncd import faults
from syncd.errors import ConfigError, StorageError
from syncd.redact import redact_text

log = structlog.get_logger(__name__)

_MIGRATIONS_LOCK = 0x73796E6364  # "syncd": PostgreSQL advisory lock for concurrent upgrades


def migrations_dir() -> Path:
    """The Alembic scripts: shipped inside the wheel, or at the top of a checkout."""
    packaged = Path(__file__).resolve().parent.parent / "_migrations"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "migrations"


def async_url(url: str) -> URL:
    """Pick the async driver for a plain sqlite:// or postgresql:// URL."""
    try:
        parsed = make_url(url.replace("postgres://", "postgresql://", 1))
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise ConfigError(f"database.url: not a database URL: {redact_text(url)}") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite" and parsed.get_driver_name() != "aiosqlite":
        return parsed.set(drivername="sqlite+aiosqlite")
    if backend == "postgresql" and parsed.get_driver_name() != "asyncpg":
        return parsed.set(drivername="postgresql+asyncpg")
    return parsed


class Database:
    """The mirror's engine; `write()` gives a transaction that takes the write lock at once."""

    def __init__(self, url: str, *, busy_timeout: float = 30.0) -> None:
        self.url = async_url(url)
        self.dialect = self.url.get_backend_name()
        if self.dialect == "sqlite":
            self.engine = _sqlite_engine(self.url, busy_timeout)
        else:
            self.engine = create_async_engine(self.url, pool_pre_ping=True)
        faults.install(self.engine.sync_engine)  # a test hook; inert unless armed
        self._unpooled: AsyncEngine | None = None

    @property
    def display_url(self) -> str:
        return self.url.render_as_string(hide_password=True)

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """One write transaction. On SQLite it begins IMMEDIATE so concurrent writers
        queue on the busy timeout instead of failing when a read upgrades to a write."""
        try:
            async with self.engine.connect() as plain:
                conn = plain
                if self.dialect == "sqlite":
                    conn = await plain.execution_options(syncd_begin="BEGIN IMMEDIATE")
                async with conn.begin():
                    yield conn
        except (SQLAlchemyError, OSError) as err:
            # asyncpg raises plain OSError (refused, unreachable) before SQLAlchemy wraps it
            raise StorageError(f"database write failed: {_describe(err)}") from err

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A read-only connection."""
        try:
            async with self.engine.connect() as conn:
                yield conn
        except (SQLAlchemyError, OSError) as err:
            # asyncpg raises plain OSError (refused, unreachable) before SQLAlchemy wraps it
            raise StorageError(f"database read failed: {_describe(err)}") from err

    @asynccontextmanager
    async def dedicated(self) -> AsyncIterator[AsyncConnection]:
        """A connection of its own in autocommit, outside the pool, really closed at the end.

        For session state that must end with the block, or with the process: a PostgreSQL
        advisory lock (syncd.mirror.lock). It never takes a slot of the pool the passes
        write through, and no transaction stays open while it is held.
        """
        if self._unpooled is None:
            self._unpooled = create_async_engine(self.url, poolclass=NullPool)
        try:
            plain = await self._unpooled.connect()
        except (SQLAlchemyError, OSError) as err:
            raise StorageError(f"database connection failed: {_describe(err)}") from err
        try:
            yield await plain.execution_options(isolation_level="AUTOCOMMIT")
        except (SQLAlchemyError, OSError) as err:
            raise StorageError(f"database read failed: {_describe(err)}") from err
        finally:
            # Shielded: a cancelled caller must not leave the session (and its locks) open.
            # A connection already lost has nothing left to release.
            with contextlib.suppress(SQLAlchemyError, OSError):
                await asyncio.shield(plain.close())

    async def upgrade(self, revision: str = "head") -> None:
        """Bring the schema to `revision`; safe when several processes start at once."""
        async with self.write() as conn:
            if self.dialect == "postgresql":
                await conn.execute(text(f"SELECT pg_advisory_xact_lock({_MIGRATIONS_LOCK})"))
            await conn.run_sync(_run_alembic, "upgrade", revision)

    async def current(self) -> str | None:
        """The schema revision the database is at (None for an empty database)."""
        async with self.read() as conn:
            return await conn.run_sync(
                lambda sync: MigrationContext.configure(sync).get_current_revision()
            )

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self._unpooled is not None:
            await self._unpooled.dispose()


def head_revision() -> str | None:
    """The newest migration shipped with this syncd."""
    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


def _alembic_config(connection: Connection | None = None) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.attributes["connection"] = connection
    return cfg


def _run_alembic(connection: Connection, action: str, revision: str) -> None:
    cfg = _alembic_config(connection)
    if action == "upgrade":
        command.upgrade(cfg, revision)
    else:  # pragma: no cover - only upgrade is exposed
        command.downgrade(cfg, revision)


def _sqlite_engine(url: URL, busy_timeout: float) -> AsyncEngine:
    database = url.database
    if database and database != ":memory:" and not database.startswith("file:"):
        folder = Path(database).expanduser().parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError(
                f"cannot create the database folder {folder}: {err.strerror or err}"
            ) from None
    engine = create_async_engine(url, connect_args={"timeout": busy_timeout})

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin
        # (SQLAlchemy's documented recipe), and set the pragmas every connection needs.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(conn.get_execution_options().get("syncd_begin", "BEGIN"))

    return engine


def _describe(err: SQLAlchemyError | OSError) -> str:
    """The driver's own message without the SQL statement and its parameters."""
    orig = getattr(err, "orig", None)
    return redact_text(f"{type(orig or err).__name__}: {orig or err}".splitlines()[0])[:300]
