"""The mirror's schema (ARCHITECTURE.md §5, contract): the single definition Alembic compares with.

Hot paths use these tables through SQLAlchemy Core; the ORM classes exist so the
schema is written once.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only autoincrements an INTEGER PRIMARY KEY; PostgreSQL gets 64-bit ids.
Id = BigInteger().with_variant(Integer(), "sqlite")


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        if value.tzinfo is not UTC:  # the common case skips a conversion per value and row
            value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any] | None:
        """The converter, remembering its last answer: an apply stamps every row it writes
        with one `now` (3 columns of each row and the change row), and converting it anew
        each time was a quarter of a 100k-object first sync (tests/bench, issue 7)."""
        process = super().bind_processor(dialect)
        if process is None:
            return None
        convert = process
        last: list[tuple[Any, Any]] = [(None, None)]  # one cell: swapped whole, thread-safe

        def remembered(value: Any) -> Any:
            if value is None:  # deleted_at of every live row
                return None
            seen, result = last[0]
            if value is not seen:
                result = convert(value)
                last[0] = (value, result)
            return result

        return remembered

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        moment = datetime.fromisoformat(value) if isinstance(value, str) else value
        assert isinstance(moment, datetime)
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Feature(Base):
    """One row per upstream object ever seen; deleted ones keep their row (soft delete)."""

    __tablename__ = "features"
    __table_args__ = (UniqueConstraint("source", "collection", "kind", "external_id"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(64))
    collection: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(Text)
    external_id: Mapped[str] = mapped_column(Text)
    name: Mapped[str | None] = mapped_column(Text)
    geometry: Mapped[str | None] = mapped_column(Text)
    properties: Mapped[str] = mapped_column(Text)
    content_hash: Mapped[str] = mapped_column(String(64))
    remote_updated_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    first_seen_at: Mapped[datetime] = mapped_column(UtcDateTime)
    last_seen_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
    deleted_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    version: Mapped[int] = mapped_column(Integer)


class Change(Base):
    """Append-only change feed; consumers tail it by `seq`."""

    __tablename__ = "changes"
    # AUTOINCREMENT: SQLite must never reuse a seq, or a consumer would miss changes.
    __table_args__ = (Index(None, "feature_id"), {"sqlite_autoincrement": True})

    seq: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    feature_id: Mapped[int] = mapped_column(Id, ForeignKey("features.id"))
    source: Mapped[str] = mapped_column(String(64))
    op: Mapped[str] = mapped_column(String(8))
    version: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(UtcDateTime)


class Cursor(Base):
    """The cursor of each scope, written in the transaction of the data it covers."""

    __tablename__ = "cursors"

    source: Mapped[str] = mapped_column(String(64), primary_key=True)
    scope: Mapped[str] = mapped_column(Text, primary_key=True)
    cursor: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class Run(Base):
    """One sync of one source."""

    __tablename__ = "runs"
    __table_args__ = (
        Index(None, "source", "id"),
        # The rows every pass looks for (runs left `running` by a dead process,
        # syncd.mirror.store.start_run): found without reading the source's history.
        Index(
            "ix_runs_running",
            "source",
            sqlite_where=text("status = 'running'"),
            postgresql_where=text("status = 'running'"),
        ),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    status: Mapped[str] = mapped_column(String(16))
    requests: Mapped[int] = mapped_column(Integer, default=0)
    inserted: Mapped[int] = mapped_column(Integer, default=0)
    updated: Mapped[int] = mapped_column(Integer, default=0)
    unchanged: Mapped[int] = mapped_column(Integer, default=0)
    deleted: Mapped[int] = mapped_column(Integer, default=0)
    restored: Mapped[int] = mapped_column(Integer, default=0)
    held: Mapped[int] = mapped_column(Integer, default=0)
    """Deletions held back by the mass-delete guard."""
    full: Mapped[bool] = mapped_column(default=False)
    error: Mapped[str | None] = mapped_column(Text)


features = cast(Table, Feature.__table__)
changes = cast(Table, Change.__table__)
cursors = cast(Table, Cursor.__table__)
runs = cast(Table, Run.__table__)
