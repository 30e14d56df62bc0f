"""Alembic environment for syncd: runs on the connection syncd hands over, or standalone.

syncd itself calls Alembic with an open connection (`syncd db upgrade`, and at start);
developers may also run `alembic -x url=sqlite:///data/syncd.db upgrade head` or
`alembic revision --autogenerate` from the repository root.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import Connection, pool
from sqlalchemy.ext.asyncio import create_async_engine

from syncd.mirror.database import async_url
from syncd.mirror.models import Base

config = context.config
target_metadata = Base.metadata


def _configure_and_run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER much
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_standalone(url: str) -> None:
    engine = create_async_engine(async_url(url), poolclass=pool.NullPool)
    async with engine.begin() as conn:
        await conn.run_sync(_configure_and_run)
    await engine.dispose()


def _standalone_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url")
    if url:
        return url
    from syncd.config import load_config

    return load_config().database.url


shared = config.attributes.get("connection")
if context.is_offline_mode():
    context.configure(url=_standalone_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif shared is not None:
    _configure_and_run(shared)
else:
    asyncio.run(_run_standalone(_standalone_url()))
