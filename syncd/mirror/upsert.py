"""Dialect-neutral INSERT ... ON CONFLICT for SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.dml import Insert


def _insert(conn: AsyncConnection, table: Table) -> Any:
    return (postgresql if conn.dialect.name == "postgresql" else sqlite).insert(table)


def upsert(
    conn: AsyncConnection,
    table: Table,
    row: Mapping[str, Any],
    keys: Sequence[str],
    update_columns: Sequence[str],
) -> Insert:
    """INSERT the row, or UPDATE `update_columns` where `keys` already exist."""
    statement = _insert(conn, table).values(**row)
    upserting: Insert = statement.on_conflict_do_update(
        index_elements=list(keys),
        set_={column: statement.excluded[column] for column in update_columns},
    )
    return upserting


def insert_ignore(
    conn: AsyncConnection, table: Table, row: Mapping[str, Any], keys: Sequence[str]
) -> Insert:
    """INSERT the row unless `keys` already exist."""
    ignoring: Insert = (
        _insert(conn, table).values(**row).on_conflict_do_nothing(index_elements=list(keys))
    )
    return ignoring
