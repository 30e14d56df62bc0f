"""`Mirror.apply`: one snapshot, one transaction (ARCHITECTURE.md §1).

Inside a single write transaction it reads what the mirror holds for the snapshot's
keys, merges partial deltas with the stored rows, skips unchanged content by hash,
tombstones only what the snapshot's listings prove gone (after the mass-delete
guard), appends change rows, and stores the scope's cursor. Either all of it
commits or none of it does.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from itertools import islice
from typing import Any

import structlog
from sqlalchemy import and_, bindparam, delete, func, insert, literal, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from syncd.mirror.content import Content, content_of, merge
from syncd.mirror.database import Database
from syncd.mirror.models import UtcDateTime, changes, cursors, features, runs
from syncd.mirror.upsert import insert_ignore, upsert
from syncd.records import Key, Listing, Record, Snapshot

log = structlog.get_logger(__name__)

# Ids per IN (...) clause: below SQLite's (32766) and PostgreSQL's (32767) parameter limits;
# 500 made a 100k-object first sync spend 1.8 s in 400 lookups (tests/bench, issue 7).
_CHUNK = 5000


@dataclass(frozen=True)
class DeleteGuard:
    """Holds snapshots that would tombstone too much of a scope (ARCHITECTURE.md §1 rule 3)."""

    max_fraction: float = 0.5
    min_rows: int = 10
    allow: bool = False

    def holds(
        self, deleting: int, live: int, *, total: int | None = None, source_live: int | None = None
    ) -> bool:
        """Hold when more than `min_rows` rows would go and either the scope's own share
        (`deleting` of `live`) or, with cascades, everything that would go (`total`) as a
        share of the source's whole live mirror exceeds the fraction."""
        total = deleting if total is None else total
        if self.allow or total <= self.min_rows:
            return False
        if deleting > self.max_fraction * live:
            return True
        return source_live is not None and total > self.max_fraction * source_live


@dataclass(frozen=True)
class HeldDeletion:
    """A snapshot the guard refused: nothing of it was written."""

    scope: str
    would_delete: int
    live: int


@dataclass
class RowCounts:
    """What happened to the rows of one snapshot, or of a whole run."""

    inserted: int = 0
    updated: int = 0
    restored: int = 0
    unchanged: int = 0
    deleted: int = 0
    skipped: int = 0

    def add(self, other: RowCounts) -> None:
        for name in _COUNT_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def row_counts(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in _COUNT_FIELDS}


_COUNT_FIELDS = tuple(f.name for f in fields(RowCounts))


@dataclass
class ApplyResult(RowCounts):
    """What one applied snapshot changed."""

    scope: str = ""
    held: HeldDeletion | None = None


@dataclass
class _Stored:
    id: int
    content_hash: str
    deleted: bool
    version: int


class Mirror:
    """Writes snapshots of one database; safe to share between concurrent source runs."""

    def __init__(self, db: Database, *, clock: Callable[[], datetime] | None = None) -> None:
        self.db = db
        self._clock = clock or (lambda: datetime.now(UTC))

    async def apply(
        self,
        source: str,
        snapshot: Snapshot,
        *,
        guard: DeleteGuard | None = None,
        run_id: int | None = None,
    ) -> ApplyResult:
        """Apply one snapshot atomically; see the module docstring."""
        guard = guard or DeleteGuard()
        async with self.db.write() as conn:
            result = await _apply(conn, source, snapshot, guard, self._clock())
            if result.held is None and run_id is not None:
                await _count_into_run(conn, run_id, result)
            if result.held is not None:
                # Nothing was written; roll back explicitly so the lock goes at once.
                await conn.rollback()
        return result


async def _apply(
    conn: AsyncConnection, source: str, snapshot: Snapshot, guard: DeleteGuard, now: datetime
) -> ApplyResult:
    result = ApplyResult(scope=snapshot.scope)
    seen = _Seen(known=await _max_id(conn))
    # Records are written a chunk at a time, so a streamed answer is never held whole;
    # the guard's verdict below still rolls back all of it (one transaction).
    for chunk in _batches(snapshot.records):
        await _write_records(
            conn,
            source,
            snapshot.scope,
            chunk,
            seen=seen,
            result=result,
            now=now,
        )

    # The guard weighs the rows that were live before this snapshot.
    doomed = await _tombstones(conn, source, snapshot, seen)
    tombstones = sorted(doomed.rows.items())
    if tombstones:
        cascaded = len(tombstones) > doomed.primary
        source_live = (
            await _count_live(conn, source, seen.known) - len(seen.restored) if cascaded else None
        )
        if guard.holds(doomed.primary, doomed.live, total=len(tombstones), source_live=source_live):
            live = doomed.live if source_live is None else source_live
            held = HeldDeletion(snapshot.scope, len(tombstones), live)
            return ApplyResult(scope=snapshot.scope, held=held)

    if tombstones:
        await conn.execute(
            _TOMBSTONE,
            [{"b_id": fid, "b_version": version + 1, "b_now": now} for fid, version in tombstones],
        )
        await conn.execute(
            insert(changes),
            [_change(fid, source, "delete", version + 1, now) for fid, version in tombstones],
        )
        result.deleted = len(tombstones)
        log.info("scope.tombstoned", source=source, scope=snapshot.scope, deleted=len(tombstones))
    await _store_cursors(conn, source, snapshot, now)
    return result


async def _write_records(
    conn: AsyncConnection,
    source: str,
    scope: str,
    chunk: list[Record],
    *,
    seen: _Seen,
    result: ApplyResult,
    now: datetime,
) -> None:
    """Insert, update or restore one chunk's records; note in `seen` the older rows
    they carried.

    A key repeated within the chunk folds into one write; one repeated in a later chunk
    folds into the write the earlier chunk made (same content, version, change row).
    """
    records = _by_key(chunk)
    for key in [k for k in records if not _storable(k)]:
        del records[key]
        _skip(
            result,
            source,
            scope,
            key,
            "its identity has a NUL character, which SQL text cannot hold",
        )
    stored = await _load_stored(conn, source, records.keys())
    # A key an earlier chunk already reached is folded into that write, as a key
    # repeated within one chunk is: same content, one version, one change row.
    repeats = {row.id for row in stored.values() if row.id in seen.carried or row.id > seen.known}
    seen.carried.update(row.id for row in stored.values() if row.id <= seen.known)
    partial_ids = [
        stored[k].id for k, chain in records.items() if k in stored and chain[0].is_partial
    ]
    stored_content = await _load_content(conn, partial_ids)

    inserts: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    rewrites: list[dict[str, Any]] = []
    update_ops: list[str] = []
    for key, chain in records.items():
        row = stored.get(key)
        base = stored_content.get(row.id) if row is not None else None
        try:
            content = _fold(base, chain)
        except (ValueError, RecursionError) as err:  # NaN; nesting too deep to encode
            _skip(result, source, scope, key, str(err))
            continue
        if row is not None and row.id in repeats:
            written = row.id > seen.known or row.id in seen.written
            if row.content_hash == content.hash:
                continue
            if written:  # rewrite this snapshot's own write, at its version
                rewrites.append(_update_row(row, content, now, version=row.version))
                continue
            result.unchanged -= 1  # counted unchanged by the earlier chunk; changed now
        if row is None:
            inserts.append(_insert_row(source, key, content, now))
        elif row.deleted:
            updates.append(_update_row(row, content, now))
            update_ops.append("restore")
        elif row.content_hash != content.hash:
            updates.append(_update_row(row, content, now))
            update_ops.append("update")
        else:
            result.unchanged += 1

    if inserts:
        # A plain executemany, then their change rows by one INSERT .. SELECT of the rows
        # above the chunk's starting id: RETURNING in parameter order costs SQLAlchemy a
        # statement per row on SQLite (7x slower), reading the ids back 1 s per 100k
        # rows (tests/bench, issue 7).
        floor = await _max_id(conn)
        await conn.execute(insert(features), inserts)
        await conn.execute(_insert_changes(source, floor, now))
        result.inserted += len(inserts)
    if updates or rewrites:
        await conn.execute(_UPDATE_CONTENT, updates + rewrites)
    if updates:
        await conn.execute(
            insert(changes),
            [
                _change(u["b_id"], source, op, u["b_version"], now)
                for u, op in zip(updates, update_ops, strict=True)
            ],
        )
        seen.written.update(u["b_id"] for u in updates)
        restores = [u["b_id"] for u, op in zip(updates, update_ops, strict=True) if op == "restore"]
        seen.restored.update(restores)
        result.restored += len(restores)
        result.updated += len(updates) - len(restores)


def _skip(result: ApplyResult, source: str, scope: str, key: Key, reason: str) -> None:
    result.skipped += 1
    log.warning("record.skipped", source=source, scope=scope, kind=key[1], id=key[2], reason=reason)


@dataclass
class _Seen:
    """What the guard must know of the rows a snapshot's records reached."""

    known: int
    """The largest id before the snapshot: ids only grow (SQLite rowids, PostgreSQL
    sequences), so rows above it are the snapshot's own inserts."""
    carried: set[int] = field(default_factory=set)
    """Older rows the snapshot carried (unchanged, updated, restored): present."""
    restored: set[int] = field(default_factory=set)
    """Older rows it brought back: not live before it, so not in the guard's count."""
    written: set[int] = field(default_factory=set)
    """Older rows it updated or restored (its inserts are the rows above `known`)."""


def _insert_changes(source: str, floor: int, now: datetime) -> Any:
    """The `insert` change rows of the rows a chunk just inserted (ids above `floor`)."""
    f = features.c
    new_rows = (
        select(f.id, f.source, literal("insert"), literal(1), literal(now, UtcDateTime()))
        .where(f.source == source, f.id > floor, f.first_seen_at == now, f.version == 1)
        .order_by(f.id)
    )
    columns = ["feature_id", "source", "op", "version", "at"]
    return insert(changes).from_select(columns, new_rows)


def _batches(records: Iterable[Record]) -> Iterator[list[Record]]:
    iterator = iter(records)
    while batch := list(islice(iterator, _CHUNK)):
        yield batch


def _storable(key: Key) -> bool:
    """False for identities with a NUL: PostgreSQL text refuses it even as a query
    parameter (issue 6: one such id failed its whole source on PostgreSQL)."""
    collection, kind, external_id = key
    return "\x00" not in collection and "\x00" not in kind and "\x00" not in external_id


def _by_key(records: list[Record]) -> dict[Key, list[Record]]:
    """Group records by identity, keeping their order: a response may repeat an id."""
    grouped: dict[Key, list[Record]] = {}
    for record in records:
        grouped.setdefault(record.key, []).append(record)
    return grouped


def _fold(base: Content | None, chain: list[Record]) -> Content:
    content = base
    for record in chain:
        content = merge(content, record)
    assert content is not None
    return content


async def _load_stored(
    conn: AsyncConnection, source: str, keys: Iterable[Key]
) -> dict[Key, _Stored]:
    """Identity, hash, state and version of every stored row among `keys`, by index lookups."""
    by_group: dict[tuple[str, str], list[str]] = defaultdict(list)
    for collection, kind, external_id in keys:
        by_group[(collection, kind)].append(external_id)
    found: dict[Key, _Stored] = {}
    f = features.c
    for (collection, kind), ids in by_group.items():
        for chunk in _chunks(ids):
            rows = await conn.execute(
                select(f.id, f.external_id, f.content_hash, f.deleted_at, f.version).where(
                    f.source == source,
                    f.collection == collection,
                    f.kind == kind,
                    f.external_id.in_(chunk),
                )
            )
            for fid, external_id, content_hash, deleted_at, version in rows:
                found[(collection, kind, external_id)] = _Stored(
                    fid, content_hash, deleted_at is not None, version
                )
    return found


async def _load_content(conn: AsyncConnection, ids: list[int]) -> dict[int, Content]:
    """Stored content of the rows a partial delta must be merged with."""
    loaded: dict[int, Content] = {}
    f = features.c
    for chunk in _chunks(ids):
        rows = await conn.execute(
            select(f.id, f.name, f.geometry, f.properties, f.remote_updated_at).where(
                f.id.in_(chunk)
            )
        )
        for fid, name, geometry, properties, remote_updated_at in rows:
            loaded[fid] = content_of(name, geometry, properties, remote_updated_at)
    return loaded


@dataclass
class _Doomed:
    rows: dict[int, int]
    """id -> version of every live row the snapshot proves gone."""
    primary: int
    """How many of them the snapshot's own (non-cascade) listings and deletions prove."""
    live: int
    """Live rows those own listings and deletions speak for: the guard's denominator."""


async def _tombstones(
    conn: AsyncConnection, source: str, snapshot: Snapshot, seen: _Seen
) -> _Doomed:
    """Live rows the snapshot proves gone, with what the mass-delete guard weighs."""
    doomed: dict[int, int] = {}
    primary: set[int] = set()
    examined: set[int] = set()
    for listing in snapshot.listings:
        async for fid, key, version in _live_rows(conn, source, listing, seen.known):
            if fid in seen.restored:
                continue
            if not listing.cascade:
                examined.add(fid)
            if fid not in seen.carried and key not in listing.keys:
                doomed[fid] = version
                if not listing.cascade:
                    primary.add(fid)
    explicit = [k for k in snapshot.deleted if _storable(k)]
    if explicit:
        for row in (await _load_stored(conn, source, explicit)).values():
            # Not a row the snapshot itself carried or created: its records win.
            if not row.deleted and row.id not in seen.carried and row.id <= seen.known:
                examined.add(row.id)
                primary.add(row.id)
                doomed[row.id] = row.version
    return _Doomed(doomed, len(primary), len(examined))


async def _max_id(conn: AsyncConnection) -> int:
    return int((await conn.execute(select(func.max(features.c.id)))).scalar_one() or 0)


async def _count_live(conn: AsyncConnection, source: str, known: int) -> int:
    f = features.c
    query = select(func.count()).where(f.source == source, f.deleted_at.is_(None), f.id <= known)
    return int((await conn.execute(query)).scalar_one())


async def _live_rows(
    conn: AsyncConnection, source: str, listing: Listing, known: int
) -> AsyncIterator[tuple[int, Key, int]]:
    """Live rows of the listing's part that existed before the snapshot (id <= known)."""
    f = features.c
    query = select(f.id, f.collection, f.kind, f.external_id, f.version).where(
        f.source == source, f.deleted_at.is_(None), f.id <= known
    )
    if listing.kinds is not None:
        query = query.where(f.kind.in_(sorted(listing.kinds)))
    collections = sorted(listing.collections) if listing.collections is not None else [None]
    for chunk in _chunks(collections):
        scoped = query if chunk == [None] else query.where(f.collection.in_(chunk))
        # A server-side cursor: a 200k-object scope is streamed, not loaded whole.
        rows = await conn.stream(scoped)
        async for fid, collection, kind, external_id, version in rows:
            yield fid, (collection, kind, external_id), version


async def _store_cursors(
    conn: AsyncConnection, source: str, snapshot: Snapshot, now: datetime
) -> None:
    c = cursors.c
    if snapshot.drop_cursors:
        for chunk in _chunks(sorted(snapshot.drop_cursors)):
            await conn.execute(delete(cursors).where(c.source == source, c.scope.in_(chunk)))
    for scope, start in snapshot.new_scopes.items():
        row = {"source": source, "scope": scope, "cursor": start, "updated_at": now}
        await conn.execute(insert_ignore(conn, cursors, row, ["source", "scope"]))
    if snapshot.cursor is not None:
        row = {
            "source": source,
            "scope": snapshot.scope,
            "cursor": snapshot.cursor,
            "updated_at": now,
        }
        await conn.execute(
            upsert(conn, cursors, row, ["source", "scope"], ["cursor", "updated_at"])
        )


async def _count_into_run(conn: AsyncConnection, run_id: int, result: ApplyResult) -> None:
    r = runs.c
    await conn.execute(
        update(runs)
        .where(r.id == run_id)
        .values(
            inserted=r.inserted + result.inserted,
            updated=r.updated + result.updated,
            restored=r.restored + result.restored,
            unchanged=r.unchanged + result.unchanged,
            deleted=r.deleted + result.deleted,
        )
    )


def _insert_row(source: str, key: Key, content: Content, now: datetime) -> dict[str, Any]:
    collection, kind, external_id = key
    return {
        "source": source,
        "collection": collection,
        "kind": kind,
        "external_id": external_id,
        **content.columns(),
        "first_seen_at": now,
        "last_seen_at": now,
        "updated_at": now,
        "deleted_at": None,
        "version": 1,
    }


def _update_row(
    row: _Stored, content: Content, now: datetime, *, version: int | None = None
) -> dict[str, Any]:
    return {
        "b_id": row.id,
        "b_version": row.version + 1 if version is None else version,
        "b_now": now,
        **{f"b_{k}": v for k, v in content.columns().items()},
    }


def _change(feature_id: int, source: str, op: str, version: int, now: datetime) -> dict[str, Any]:
    return {"feature_id": feature_id, "source": source, "op": op, "version": version, "at": now}


def _chunks(items: Sequence[Any] | list[Any]) -> Iterable[list[Any]]:
    items = list(items)
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


_f = features.c
_UPDATE_CONTENT = (
    update(features)
    .where(_f.id == bindparam("b_id"))
    .values(
        name=bindparam("b_name"),
        geometry=bindparam("b_geometry"),
        properties=bindparam("b_properties"),
        content_hash=bindparam("b_content_hash"),
        remote_updated_at=bindparam("b_remote_updated_at"),
        last_seen_at=bindparam("b_now"),
        updated_at=bindparam("b_now"),
        deleted_at=None,
        version=bindparam("b_version"),
    )
)
_TOMBSTONE = (
    update(features)
    .where(and_(_f.id == bindparam("b_id"), _f.deleted_at.is_(None)))
    .values(
        deleted_at=bindparam("b_now"), updated_at=bindparam("b_now"), version=bindparam("b_version")
    )
)
