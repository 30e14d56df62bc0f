"""Shared fixtures: mirror databases (SQLite file, PostgreSQL), the sandbox on loopback."""

from __future__ import annotations

import gc
import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
import structlog
from aiohttp.test_utils import TestServer
from sqlalchemy import select
from sqlalchemy.engine import make_url

from syncd.engine import Engine
from syncd.logging import configure_logging
from syncd.mirror import Database
from syncd.mirror.models import cursors, features, runs
from syncd.sandbox import caltopo as caltopo_sandbox
from syncd.sandbox import kartorium as kartorium_sandbox
from syncd.sandbox import katapult as katapult_sandbox
from syncd.sandbox.server import Worlds, create_app
from syncd.sources.caltopo import CalTopoSettings
from syncd.sources.kartorium import KartoriumSettings
from syncd.sources.katapult import KatapultSettings

PG_URL = os.environ.get("SYNCD_TEST_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")


@pytest.fixture(autouse=True)
def _json_logs_to_stdout() -> Iterator[None]:
    configure_logging("debug", "json")
    yield
    structlog.contextvars.clear_contextvars()


async def _pg_admin() -> asyncpg.Connection:
    url = make_url(PG_URL)
    return await asyncpg.connect(
        host=url.host, port=url.port or 5432, user=url.username, database=url.database, timeout=5
    )


@asynccontextmanager
async def fresh_pg_database() -> AsyncIterator[str]:
    """A new, empty PostgreSQL database (dropped afterwards); skips when the server is absent."""
    try:
        admin = await _pg_admin()
    except (OSError, asyncpg.PostgresError) as err:
        if os.environ.get("SYNCD_REQUIRE_PG"):
            pytest.fail(f"PostgreSQL required (SYNCD_REQUIRE_PG) but unreachable: {err}")
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}: {err}")
    name = f"syncd_test_{uuid.uuid4().hex[:12]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    async with fresh_pg_database() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def db(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Database]:
    """An upgraded mirror database, once on SQLite and once on PostgreSQL."""
    async with AsyncExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite+aiosqlite:///{tmp_path}/mirror.db"
        else:
            url = await stack.enter_async_context(fresh_pg_database())
        database = Database(url)
        stack.push_async_callback(database.dispose)
        await database.upgrade()
        yield database


@pytest.fixture
async def sqlite_db(tmp_path: Any) -> AsyncIterator[Database]:
    """An upgraded SQLite mirror (for tests of behaviour that does not depend on the backend)."""
    database = Database(f"sqlite+aiosqlite:///{tmp_path}/mirror.db")
    await database.upgrade()
    yield database
    await database.dispose()


@dataclass
class Sandbox:
    """The simulators served over real HTTP on 127.0.0.1."""

    worlds: Worlds
    url: str

    @property
    def caltopo(self) -> caltopo_sandbox.CalTopoWorld:
        return self.worlds.caltopo

    def caltopo_settings(self, name: str = "sar", **overrides: Any) -> CalTopoSettings:
        world = self.caltopo
        values: dict[str, Any] = {
            "name": name,
            "type": "caltopo",
            "base_url": f"{self.url}{caltopo_sandbox.PREFIX}",
            "team_id": world.team_id,
            "credential_id": world.credential_id,
            "credential_secret": world.credential_secret,
            "retry_backoff": 0.001,
            "timeout": 5,
        }
        values.update(overrides)
        return CalTopoSettings.model_validate(values)

    @property
    def kartorium(self) -> kartorium_sandbox.KartoriumWorld:
        return self.worlds.kartorium

    def kartorium_settings(self, name: str = "twin", **overrides: Any) -> KartoriumSettings:
        values: dict[str, Any] = {
            "name": name,
            "type": "kartorium",
            "base_url": f"{self.url}{kartorium_sandbox.API}",
            "api_key": kartorium_sandbox.DEMO_KEY,
            "retry_backoff": 0.001,
            "timeout": 5,
        }
        values.update(overrides)
        return KartoriumSettings.model_validate(values)

    @property
    def katapult(self) -> katapult_sandbox.KatapultWorld:
        return self.worlds.katapult

    def katapult_settings(self, name: str = "poles", **overrides: Any) -> KatapultSettings:
        values: dict[str, Any] = {
            "name": name,
            "type": "katapult",
            "base_url": f"{self.url}{katapult_sandbox.API}",
            "api_key": self.katapult.api_key,
            "retry_backoff": 0.001,
            "timeout": 5,
            # This sandbox shares the client's event loop: while the loop runs a
            # synchronous stretch of a mirror apply (PostgreSQL: up to ~10 ms), a sent
            # request waits to be stamped, which a remote server never sees. The margin
            # covers that; tests/bench/katapult_pacing.py measures the default 2 ms
            # margin against a simulator in its own process.
            "pacing_margin_ms": 5,
        }
        values.update(overrides)
        return KatapultSettings.model_validate(values)


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    """An empty-world sandbox; tests build the world they need.

    The simulators stamp a request's arrival on the client's own event loop, so a pause
    of that loop while a request is in flight moves its stamp (see the pacing margin in
    `katapult_settings`). A full garbage collection over the heap earlier tests left
    behind pauses it 45-60 ms, enough for Katapult's 50 ms rule to answer a spurious
    429; with that heap frozen for the test, collections only walk what it allocates.
    """
    gc.collect()
    gc.freeze()
    worlds = Worlds()
    server = TestServer(create_app(worlds), host="127.0.0.1")
    await server.start_server()
    try:
        yield Sandbox(worlds=worlds, url=str(server.make_url("")).rstrip("/"))
    finally:
        await server.close()
        gc.unfreeze()


@pytest.fixture
def engine(db: Database) -> Engine:
    return Engine(db)


async def mirror_rows(db: Database, source: str | None = None) -> list[dict[str, Any]]:
    """Every features row, with geometry and properties decoded."""
    query = select(features).order_by(features.c.id)
    if source is not None:
        query = query.where(features.c.source == source)
    async with db.read() as conn:
        rows = [dict(r) for r in (await conn.execute(query)).mappings()]
    for row in rows:
        row["geometry"] = json.loads(row["geometry"]) if row["geometry"] else None
        row["properties"] = json.loads(row["properties"])
    return rows


async def stored_cursors(db: Database, source: str) -> dict[str, str]:
    async with db.read() as conn:
        rows = await conn.execute(
            select(cursors.c.scope, cursors.c.cursor).where(cursors.c.source == source)
        )
        return {scope: cursor for scope, cursor in rows}


async def run_rows(db: Database) -> list[dict[str, Any]]:
    async with db.read() as conn:
        return [dict(r) for r in (await conn.execute(select(runs).order_by(runs.c.id))).mappings()]
